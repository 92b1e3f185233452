"""One report per run: metrics table, sample grid, reconstructions, loss curves.

Writes ``report.md`` (images beside it) and a self-contained ``report.html`` into the
report stage directory, and copies both to the top of the run directory.
"""

from __future__ import annotations

import base64
import html
import json
import shutil
from pathlib import Path

METRIC_NOTES = {
    "fd_shapesnet": "Fréchet distance of embedded-classifier features, samples vs real (lower is better; not FID)",
    "fd_shapesnet_real_baseline": "same distance for held-out real images vs the same reference (the floor)",
    "class_accuracy": "embedded classifier agrees with the requested class (chance = 1/classes)",
    "rfd_shapesnet": "Fréchet distance, held-out reconstructions vs held-out images",
    "psnr": "reconstruction PSNR on held-out images (dB)",
    "fid": "Fréchet Inception distance (torch-fidelity InceptionV3), samples vs fid_reference",
    "recon_class_accuracy": "embedded classifier on held-out reconstructions: the ceiling of class_accuracy",
}


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


def metrics_rows(metrics: dict) -> list[tuple[str, str, str]]:
    rows = []
    for key, value in metrics.items():
        if isinstance(value, list):
            continue
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        rows.append((key, text, METRIC_NOTES.get(key, "")))
    return rows


def write_report(pipeline, out: Path) -> dict:
    cfg = pipeline.cfg
    metrics = json.loads(Path(pipeline.paths()["metrics"]).read_text())
    curves = {
        kind: json.loads((pipeline.stage_dir(kind) / "curve.json").read_text())
        for kind in ("tokenizer", "generator")
    }
    plot_curves(curves, out / "curves.png")
    shutil.copy(pipeline.stage_dir("sample") / "grid.png", out / "grid.png")
    shutil.copy(pipeline.stage_dir("evaluate") / "recon.png", out / "recon.png")
    times = {
        s: pipeline.done_info(s).get("seconds", 0.0)
        for s in ("tokenizer", "extract", "generator", "sample", "evaluate")
    }
    title = f"latentforge report: {cfg.tokenizer.name} + {cfg.generator.name} on {cfg.data.name}"
    rows = metrics_rows(metrics)
    md = [
        f"# {title}",
        "",
        f"Run directory: `{pipeline.run_dir}`",
        "",
        "## Metrics",
        "",
        "| metric | value | meaning |",
        "|---|---|---|",
    ]
    md += [f"| {k} | {v} | {n} |" for k, v, n in rows]
    md += [
        "",
        "## Class-conditional samples (one row per class)",
        "",
        "![samples](grid.png)",
        "",
        "## Reconstructions (held-out image, then its reconstruction)",
        "",
        "![recon](recon.png)",
        "",
        "## Training curves",
        "",
        "![curves](curves.png)",
        "",
        "## Stage times (s)",
        "",
        "| stage | seconds |",
        "|---|---|",
    ]
    md += [f"| {s} | {t:.1f} |" for s, t in times.items()]
    md += ["", "Resolved config: `config.yaml` in the run directory."]
    (out / "report.md").write_text("\n".join(md) + "\n")
    (out / "report.html").write_text(render_html(title, rows, times, out))
    for name in ("report.md", "report.html", "grid.png", "recon.png", "curves.png"):
        shutil.copy(out / name, pipeline.run_dir / name)
    return {"report": str(pipeline.run_dir / "report.html")}


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (
        f'<img src="data:image/png;base64,{data}" style="image-rendering:pixelated;max-width:100%">'
    )


def render_html(title: str, rows, times: dict, out: Path) -> str:
    table = "".join(
        f"<tr><td><code>{html.escape(k)}</code></td><td>{html.escape(v)}</td><td>{html.escape(n)}</td></tr>"
        for k, v, n in rows
    )
    timing = "".join(f"<tr><td>{s}</td><td>{t:.1f}</td></tr>" for s, t in times.items())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:left}}</style></head>
<body><h1>{html.escape(title)}</h1>
<h2>Metrics</h2><table><tr><th>metric</th><th>value</th><th>meaning</th></tr>{table}</table>
<h2>Class-conditional samples (one row per class)</h2>{_img(out / "grid.png")}
<h2>Reconstructions (held-out image, then its reconstruction)</h2>{_img(out / "recon.png")}
<h2>Training curves</h2>{_img(out / "curves.png")}
<h2>Stage times (s)</h2><table>{timing}</table></body></html>
"""
