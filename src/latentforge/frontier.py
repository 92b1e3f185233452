"""The reconstruction-vs-generation frontier of a set of trials: the Pareto front, a plot
and the tables a sweep leaves (``results.json``, ``results.csv``, ``frontier.png``,
``sweep.md``). Plain Python and matplotlib: no Ray."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def pareto_front(
    rows: list[dict], x: str, y: str, mode: str = "min", x_mode: str = "min"
) -> list[dict]:
    """Trials not dominated on (``x`` reconstruction, better in ``x_mode``; ``y`` objective,
    in ``mode``): no other trial is at least as good on both and better on one. Sorted by
    ``x`` ascending."""
    sign, sx = (1 if mode == "min" else -1), (1 if x_mode == "min" else -1)
    pts = [(sx * r["metrics"][x], sign * r["metrics"][y], r) for r in rows if x in r["metrics"]]

    def dominated(a, b) -> bool:  # b dominates a
        return b[0] <= a[0] and b[1] <= a[1] and (b[0] < a[0] or b[1] < a[1])

    front = [p for p in pts if not any(dominated(p, q) for q in pts)]
    return [p[2] for p in sorted(front, key=lambda p: sx * p[0])]


def point_groups(point: dict, dims: list[str]) -> tuple[str, str]:
    """(colour, marker) labels of a trial's point: the value of the sweep's first search
    dimension and of its second (``n/a`` where the sweep has fewer), e.g.
    ``tokenizer.latent_channels=8`` and ``tokenizer.vf_weight=0.1``."""
    labels = [f"{dim.rsplit('.', 1)[-1]}={point[dim]}" for dim in dims[:2] if dim in point]
    labels += ["n/a"] * (2 - len(labels))
    return labels[0], labels[1]


def legend_label(colour: str, marker: str) -> str:
    return ", ".join(label for label in (colour, marker) if label != "n/a") or "trials"


def _numeric_order(label: str) -> tuple:
    value = label.partition("=")[2]
    try:
        return (0, float(value), label)
    except ValueError:
        return (1, 0.0, label)


def plot_frontier(
    rows: list[dict], x: str, y: str, path: Path, front: list[dict], dims: list[str]
) -> None:
    """One point per trial: colour = the first search dimension's value (in numeric order),
    marker = the second's, hollow = stopped early by ASHA; the Pareto front of the finished
    trials as a line. The generation axis is logarithmic when its values span more than
    10x (one failed point would otherwise flatten the rest)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    groups = [point_groups(r["point"], dims) for r in rows]
    colour_labels = sorted({g[0] for g in groups}, key=_numeric_order)
    n = max(len(colour_labels) - 1, 1)
    colours = {c: plt.cm.viridis(i / n) for i, c in enumerate(colour_labels)}
    marker_labels = sorted({g[1] for g in groups}, key=_numeric_order)
    markers = {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(marker_labels)}
    seen = set()
    for r, (colour, marker) in zip(rows, groups, strict=True):
        if x not in r["metrics"]:
            continue
        ax.scatter(
            r["metrics"][x],
            r["metrics"][y],
            marker=markers[marker],
            s=46,
            facecolors="none" if r.get("stopped_early") else colours[colour],
            edgecolors=colours[colour],
            label=None if (colour, marker) in seen else legend_label(colour, marker),
        )
        seen.add((colour, marker))
    if front:
        fx, fy = [r["metrics"][x] for r in front], [r["metrics"][y] for r in front]
        ax.plot(fx, fy, color="tab:red", lw=1.2, ls="--", label="Pareto front")
    ys = [r["metrics"][y] for r in rows if x in r["metrics"] and y in r["metrics"]]
    if ys and min(ys) > 0 and max(ys) > 10 * min(ys):
        ax.set_yscale("log")
    ax.set_xlabel(f"{x} (reconstruction)")
    ax.set_ylabel(f"{y} (generation)")
    ax.set_title("reconstruction vs generation frontier (hollow: stopped early)")
    ax.grid(alpha=0.3)
    if seen:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_tables(out: Path, rows: list[dict], x: str, y: str) -> None:
    """``results.json`` (everything) and ``results.csv`` (one row per trial: point, rung,
    objective, frontier axis, class accuracy)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1, default=str))
    keys = sorted({k for r in rows for k in r["point"]})
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*keys, "rung", "stopped_early", x, y, "class_accuracy", "error"])
        for r in rows:
            m = r["metrics"]
            w.writerow(
                [r["point"].get(k) for k in keys]
                + [r.get("rung"), r.get("stopped_early", False)]
                + [m.get(x), m.get(y), m.get("class_accuracy"), r["error"] or ""]
            )


def summary_markdown(name: str, rows: list[dict], x: str, y: str, front: list[dict]) -> str:
    """``sweep.md``: the plot, then one row per trial with the rung it reached."""
    lines = [
        f"# Sweep {name}",
        "",
        "![frontier](frontier.png)",
        "",
        f"| point | rung | {x} | {y} | class_accuracy | on the front |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["metrics"]
        rung = f"{r.get('rung')}" + (" (stopped)" if r.get("stopped_early") else "")
        lines.append(
            f"| `{json.dumps(r['point'])}` | {rung} | {m.get(x, 'n/a')} | "
            f"{m.get(y, r['error'] or 'n/a')} | {m.get('class_accuracy', 'n/a')} | "
            f"{'yes' if any(r is f for f in front) else ''} |"
        )
    return "\n".join(lines) + "\n"
