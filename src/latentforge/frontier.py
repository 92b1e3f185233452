"""The reconstruction-vs-generation frontier of a set of trials: the Pareto front, a plot
and the tables a sweep leaves (``results.json``, ``results.csv``, ``frontier.png``,
``sweep.md``, with the rank correlations of the trials' latent diagnostics with the
objective). Plain Python and matplotlib: no Ray."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

from latentforge.metrics.diagnostics import spearman  # noqa: E402
from latentforge.metrics.table import diagnostic_of  # noqa: E402

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


def row_groups(row: dict, dims: list[str]) -> tuple[str, str]:
    """(colour, marker) labels of a trial: in a sweep across variants, its latent ``size``
    and its ``family``; else :func:`point_groups`."""
    if dims and dims[0] == "variant" and "family" in row:
        return f"latent {row['size']}", row["family"]
    return point_groups(row["point"], dims)


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
    marker = the second's (across variants: colour = latent size, marker = family),
    hollow = stopped early by ASHA (those stopped after extraction have no objective and
    are not drawn); the Pareto front of the finished
    trials as a line. The generation axis is logarithmic when its values span more than
    10x (one failed point would otherwise flatten the rest)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    groups = [row_groups(r, dims) for r in rows]
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


def diagnostic_keys(rows: list[dict]) -> list[str]:
    """The latent diagnostics the trials reported (the metric table's, and their values
    per noise size), in the order they first appear."""
    keys = {k: None for r in rows for k in r["metrics"] if diagnostic_of(k) is not None}
    return list(keys)


STAGES = ("tokenizer", "extract", "generator", "sample", "evaluate")
LABELS = ("family", "latent")  # a trial's labels, when the sweep gave them


def write_tables(out: Path, rows: list[dict], x: str, y: str) -> None:
    """``results.json`` (everything) and ``results.csv`` (one row per trial: family and
    latent shape, point, rung, objective, frontier axis, class accuracy, stage seconds,
    latent diagnostics)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1, default=str))
    keys = sorted({k for r in rows for k in r["point"]})
    labels = [k for k in LABELS if any(k in r for r in rows)]
    diagnostics = diagnostic_keys(rows)
    timed = any(r.get("stage_seconds") for r in rows)
    seconds = [f"{s}_seconds" for s in STAGES] if timed else []
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [*labels, *keys, "rung", "stopped_early", x, y, "class_accuracy", *seconds]
            + [*diagnostics, "error"]
        )
        for r in rows:
            m, t = r["metrics"], r.get("stage_seconds") or {}
            w.writerow(
                [r.get(k) for k in labels]
                + [r["point"].get(k) for k in keys]
                + [r.get("rung"), r.get("stopped_early", False)]
                + [m.get(x), m.get(y), m.get("class_accuracy")]
                + ([round(t.get(s, 0.0), 1) for s in STAGES] if timed else [])
                + [m.get(k) for k in diagnostics]
                + [r["error"] or ""]
            )


MIN_TRIALS = 3  # fewest trials a rank correlation is computed over


def objective_history(row: dict, y: str) -> dict[int, float]:
    """A trial's objective at each rung it reached (``objective_by_rung``; without it, the
    last reported value at the trial's rung)."""
    history = row.get("objective_by_rung") or {}
    if not history and y in row["metrics"]:
        history = {row.get("rung") or 1: row["metrics"][y]}
    return {int(k): float(v) for k, v in history.items()}


def diagnostic_correlations(rows: list[dict], y: str) -> list[dict]:
    """Spearman's rank correlation (:func:`~latentforge.metrics.diagnostics.spearman`) of
    each latent diagnostic with the objective ``y`` over the trials that report both, at
    every rung (ASHA stops trials at different rungs; the diagnostics are a trial's
    extraction's, the same at every rung): ``diagnostic``, ``rung``, ``rho`` and ``trials``
    where at least :data:`MIN_TRIALS` trials have both (and the ranks are not constant)."""
    histories = [objective_history(r, y) for r in rows]
    rungs = sorted({rung for h in histories for rung in h})
    out = []
    for key in diagnostic_keys(rows):
        for rung in rungs:
            pairs = [
                (r["metrics"][key], h[rung])
                for r, h in zip(rows, histories, strict=True)
                if isinstance(r["metrics"].get(key), (int, float)) and rung in h
            ]
            if len(pairs) < MIN_TRIALS:
                continue
            rho = spearman([p[0] for p in pairs], [p[1] for p in pairs])
            if rho is not None:
                out.append({"diagnostic": key, "rung": rung, "rho": rho, "trials": len(pairs)})
    return out


def correlation_markdown(correlations: list[dict], y: str) -> str:
    """``sweep.md``'s section on the latent diagnostics: one row per diagnostic, one column
    per rung, ``rho (n trials)``; empty without correlations."""
    if not correlations:
        return ""
    rungs = sorted({c["rung"] for c in correlations})
    cells = {(c["diagnostic"], c["rung"]): c for c in correlations}
    lines = [
        "",
        f"## Latent diagnostics vs {y}",
        "",
        f"Spearman rank correlation (ties averaged) of each diagnostic of a trial's latents "
        f"with its {y} at a rung, over the n trials that reached it (at least {MIN_TRIALS}). "
        "|rho| near 1: the diagnostic ranks the trials as generation does; with a "
        "lower-is-better objective, a useful higher-is-better diagnostic has rho < 0.",
        "",
        "| diagnostic | better | " + " | ".join(f"rung {r}" for r in rungs) + " |",
        "|---|---|" + "---|" * len(rungs),
    ]
    for key in dict.fromkeys(c["diagnostic"] for c in correlations):
        way = {"max": "higher", "min": "lower"}.get(diagnostic_of(key).direction or "", "-")
        row = [
            f"{cells[key, r]['rho']:+.2f} (n={cells[key, r]['trials']})"
            if (key, r) in cells
            else ""
            for r in rungs
        ]
        lines.append(f"| {key} | {way} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def summary_markdown(name: str, rows: list[dict], x: str, y: str, front: list[dict]) -> str:
    """``sweep.md``: the plot, then one row per trial (family and latent shape when the
    sweep gave them, its point, the rung it reached, seconds per stage, the metrics)."""
    labelled = any("family" in r for r in rows)
    head = "| family | latent " if labelled else ""
    lines = [
        f"# Sweep {name}",
        "",
        "![frontier](frontier.png)",
        "",
        f"{head}| point | rung | seconds (tok / extract / gen / sample / eval) | {x} | {y} "
        "| class_accuracy | on the front |",
        "|---" * (7 + 2 * labelled) + "|",
    ]
    for r in rows:
        m, t = r["metrics"], r.get("stage_seconds") or {}
        rung = f"{r.get('rung')}" + (" (stopped)" if r.get("stopped_early") else "")
        cells = [f"{r.get('family', '')} | {r.get('latent', '')} | "] if labelled else [""]
        secs = " / ".join(f"{t[s]:.0f}" if s in t else "-" for s in STAGES) if t else "n/a"
        lines.append(
            f"| {cells[0]}`{json.dumps(r['point'])}` | {rung} | {secs} | {m.get(x, 'n/a')} | "
            f"{m.get(y, r['error'] or 'n/a')} | {m.get('class_accuracy', 'n/a')} | "
            f"{'yes' if any(r is f for f in front) else ''} |"
        )
    total = sum((r.get("stage_seconds") or {}).get(s, 0.0) for r in rows for s in STAGES)
    if total:
        lines += ["", f"Stage seconds of all trials (tokenizer to evaluate): {total:.0f}."]
    return "\n".join(lines) + "\n"
