"""Progress lines of long stages: durations a person reads at a glance."""

from __future__ import annotations


def format_seconds(seconds: float) -> str:
    """``3h02m``, ``3m49s`` or ``42s``."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"
