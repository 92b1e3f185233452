"""One report per run: metrics table, latent diagnostics, sample grid, reconstructions,
loss curves.

Writes ``report.md`` (images beside it) and a self-contained ``report.html`` into the
report stage directory, and copies both to the top of the run directory.
"""

from __future__ import annotations

import base64
import html
import json
import shutil
from pathlib import Path

from latentforge.metrics.diagnostics import BOOKKEEPING
from latentforge.metrics.table import note

TABLES = ("class_confusion",)  # metrics.json entries rendered as their own tables
# a metric's companions in metrics.json, shown in its row rather than as rows of their own
COMPANIONS = ("_num_samples", "_extractor", "_reference", "_std", "_sizes", "_splits")


def plot_curves(curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = {
        k: [c for c in ("loss", "recon", "vf", "kl", "mse", "cos") if curve and c in curve[0]]
        for k, curve in curves.items()
    }
    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 3.6), squeeze=False)
    for ax, (name, curve) in zip(axes[0], curves.items(), strict=True):
        x = [p["nimg"] for p in curve]
        for key in keys[name]:
            ax.plot(x, [p[key] for p in curve], label=key)
        ax.set_yscale("log")
        ax.set_xlabel("images seen")
        ax.set_title(f"{name} training")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _text(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join("n/a" if v is None else _text(v) for v in value)
    return str(value)


def metrics_rows(metrics: dict) -> list[tuple[str, str, str, str, str, str]]:
    """(metric, value, samples, extractor, reference, meaning) rows; each metric's
    companions (``<metric>_num_samples``, ``_extractor``, ``_reference``, ``_std``,
    ``_sizes``) fold into its row."""
    folded = {k + c for k in metrics for c in COMPANIONS if k + c in metrics}
    folded |= set(TABLES)  # shown as tables of their own
    rows = []
    for key, value in metrics.items():
        if key in folded:
            continue
        text = _text(value)
        if f"{key}_std" in metrics:
            text += f" ± {metrics[key + '_std']:.2g}"
        samples = _text(metrics.get(f"{key}_num_samples", ""))
        if f"{key}_sizes" in metrics:
            sizes = metrics[f"{key}_sizes"]
            samples += f" (fit on {len(sizes)} sizes {sizes[0]}..{sizes[-1]})"
        extractor = _text(metrics.get(f"{key}_extractor", ""))
        reference = _text(metrics.get(f"{key}_reference", ""))
        rows.append((key, text, samples, extractor, reference, note(key, metrics)))
    return rows


def confusion_table(matrix: list[list[int]]) -> list[list[str]]:
    """Header row, then one row per requested class: how many of its samples the embedded
    classifier took for each class (the diagonal: right)."""
    from latentforge.shapes import CLASS_NAMES

    def name(i: int) -> str:
        return CLASS_NAMES[i] if i < len(CLASS_NAMES) else str(i)

    head = ["requested / classified as"] + [name(j) for j in range(len(matrix[0]))]
    return [head] + [[name(i)] + [str(v) for v in row] for i, row in enumerate(matrix)]


RECON_HEADING = "Reconstructions (held-out image, then its reconstruction)"
DIAGNOSTICS_HEADING = "Latent diagnostics (of the extracted latents, before generation)"


def diagnostics_rows(extract_dir: Path | None) -> list[tuple[str, str, str, str, str, str]]:
    """:func:`metrics_rows` of the extraction's ``diagnostics.json`` (none without one)."""
    path = None if extract_dir is None else extract_dir / "diagnostics.json"
    if path is None or not path.exists():
        return []
    values = json.loads(path.read_text())
    return metrics_rows({k: v for k, v in values.items() if k not in BOOKKEEPING})


def write_report(
    cfg, run_dir: Path, stage_dirs: dict[str, Path], times: dict[str, float], out: Path
) -> dict:
    """The report of the run in ``run_dir`` from its stages' artifacts (``stage_dirs``, by
    stage name) and times (seconds, by stage), into ``out`` and the top of ``run_dir``."""
    metrics = json.loads((stage_dirs["evaluate"] / "metrics.json").read_text())
    curves = {
        kind: json.loads((stage_dirs[kind] / "curve.json").read_text())
        for kind in ("tokenizer", "generator")
    }
    plot_curves(curves, out / "curves.png")
    shutil.copy(stage_dirs["sample"] / "grid.png", out / "grid.png")
    recon = stage_dirs["evaluate"] / "recon.png"  # with reconstruction metrics only
    if recon.exists():
        shutil.copy(recon, out / "recon.png")
    title = f"latentforge report: {cfg.tokenizer.name} + {cfg.generator.name} on {cfg.data.name}"
    rows = metrics_rows(metrics)
    confusion = confusion_table(metrics["class_confusion"]) if "class_confusion" in metrics else []
    diagnostics = diagnostics_rows(stage_dirs.get("extract"))
    md = render_markdown(title, run_dir, rows, confusion, recon.exists(), times, diagnostics)
    (out / "report.md").write_text(md)
    html_text = render_html(title, rows, times, out, confusion, diagnostics)
    (out / "report.html").write_text(html_text)
    for name in ("report.md", "report.html", "grid.png", "recon.png", "curves.png"):
        if (out / name).exists():
            shutil.copy(out / name, run_dir / name)
        else:  # not this report's: an earlier run's would pass for it
            (run_dir / name).unlink(missing_ok=True)
    return {"report": str(run_dir / "report.html")}


TABLE_HEAD = [
    "| metric | value | samples | extractor | reference | meaning |",
    "|---|---|---|---|---|---|",
]


def render_markdown(
    title: str,
    run_dir: Path,
    rows: list,
    confusion: list,
    recon: bool,
    times: dict,
    diagnostics: list = (),
) -> str:
    """``report.md``: metrics, confusion table, latent diagnostics, samples,
    reconstructions, curves, times."""
    md = [f"# {title}", "", f"Run directory: `{run_dir}`", "", "## Metrics", "", *TABLE_HEAD]
    md += ["| " + " | ".join(row) + " |" for row in rows]
    if confusion:
        md += ["", "## What the samples of each class were taken for", ""]
        md += ["| " + " | ".join(confusion[0]) + " |", "|---" * len(confusion[0]) + "|"]
        md += ["| " + " | ".join(row) + " |" for row in confusion[1:]]
    if diagnostics:
        md += ["", f"## {DIAGNOSTICS_HEADING}", "", *TABLE_HEAD]
        md += ["| " + " | ".join(row) + " |" for row in diagnostics]
    md += ["", "## Class-conditional samples (one row per class)", "", "![samples](grid.png)", ""]
    if recon:
        md += [f"## {RECON_HEADING}", "", "![recon](recon.png)", ""]
    md += ["## Training curves", "", "![curves](curves.png)", ""]
    md += ["## Stage times (s)", "", "| stage | seconds |", "|---|---|"]
    md += [f"| {s} | {t:.1f} |" for s, t in times.items()]
    md += ["", "Resolved config: `config.yaml` in the run directory."]
    return "\n".join(md) + "\n"


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (
        f'<img src="data:image/png;base64,{data}" style="image-rendering:pixelated;max-width:100%">'
    )


def html_rows(rows) -> str:
    return "".join(
        f"<tr><td><code>{html.escape(key)}</code></td>"
        + "".join(f"<td>{html.escape(cell)}</td>" for cell in cells)
        + "</tr>"
        for key, *cells in rows
    )


HTML_HEAD = (
    "<tr><th>metric</th><th>value</th><th>samples</th><th>extractor</th>"
    "<th>reference</th><th>meaning</th></tr>"
)


def render_html(title: str, rows, times: dict, out: Path, confusion=(), diagnostics=()) -> str:
    table = html_rows(rows)
    conf = ""
    if confusion:
        cells = ["".join(f"<th>{html.escape(c)}</th>" for c in confusion[0])]
        cells += [
            "<th>" + html.escape(r[0]) + "</th>" + "".join(f"<td>{v}</td>" for v in r[1:])
            for r in confusion[1:]
        ]
        conf = (
            "<h2>What the samples of each class were taken for</h2><table>"
            + "".join(f"<tr>{c}</tr>" for c in cells)
            + "</table>"
        )
    latent = ""
    if diagnostics:
        latent = f"<h2>{DIAGNOSTICS_HEADING}</h2><table>{HTML_HEAD}{html_rows(diagnostics)}</table>"
    timing = "".join(f"<tr><td>{s}</td><td>{t:.1f}</td></tr>" for s, t in times.items())
    recon = ""
    if (out / "recon.png").exists():
        recon = f"<h2>{RECON_HEADING}</h2>{_img(out / 'recon.png')}"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:left}}</style></head>
<body><h1>{html.escape(title)}</h1>
<h2>Metrics</h2><table>{HTML_HEAD}{table}</table>{conf}{latent}
<h2>Class-conditional samples (one row per class)</h2>{_img(out / "grid.png")}
{recon}
<h2>Training curves</h2>{_img(out / "curves.png")}
<h2>Stage times (s)</h2><table>{timing}</table></body></html>
"""
