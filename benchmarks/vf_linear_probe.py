"""Linear probe of VA-VAE latents with and without VF alignment, at equal training budget.

Trains the demo's tokenizer (``experiments/quickstart.yaml``: shapes-f4d4 at 32x32 aligned
to the embedded shapes ViT) twice in-process, with ``vf_weight`` 0.1 and 0 and otherwise
the same images, seed and optimiser, then fits a linear classifier on the standardised,
flattened EMA latents of 4,000 further images and reports its accuracy on 1,000 held-out
images, with the reconstruction PSNR (VA-VAE's claim: alignment makes latents more
semantic at a similar reconstruction). JSON out.

    python benchmarks/vf_linear_probe.py --images 24000 --out runs/vf_linear_probe.json
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timing import emit

from latentforge.config import load_experiment
from latentforge.images import images_to_float
from latentforge.models import build_tokenizer
from latentforge.shapes import HOLDOUT_OFFSET, render_shapes
from latentforge.training.loop import ema_decay_at, ema_update

ROOT = Path(__file__).resolve().parents[1]


def train(vf_weight: float, images: np.ndarray, total: int, batch: int, lr: float):
    torch.manual_seed(0)
    cfg = load_experiment(
        ROOT / "experiments" / "quickstart.yaml", [f"tokenizer.vf_weight={vf_weight}"]
    )
    model = build_tokenizer(cfg)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(0)
    nimg = step = 0
    while nimg < total:
        idx = torch.randint(0, len(images), (batch,), generator=gen).numpy()
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (nimg + 1) / 1e4)
        loss = model.loss(images_to_float(torch.from_numpy(images[idx])), nimg)["loss"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema_update(ema, model, ema_decay_at(step, 0.999))
        step, nimg = step + 1, nimg + batch
    return ema.eval()


@torch.no_grad()
def latents(model, images: np.ndarray) -> torch.Tensor:
    x = images_to_float(torch.from_numpy(images))
    return torch.cat([model.encode(x[i : i + 500]).flatten(1) for i in range(0, len(x), 500)])


def probe(train_z, train_y, test_z, test_y, steps: int = 500) -> float:
    mu, sd = train_z.mean(0), train_z.std(0) + 1e-6
    train_z, test_z = (train_z - mu) / sd, (test_z - mu) / sd
    torch.manual_seed(0)
    lin = torch.nn.Linear(train_z.shape[1], 10)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        loss = F.cross_entropy(lin(train_z), train_y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((lin(test_z).argmax(1) == test_y).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=float, default=24000, help="training images per tokenizer")
    ap.add_argument("--probe-images", type=int, default=4000)
    ap.add_argument("--holdout", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/vf_linear_probe.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train_imgs, _ = render_shapes(np.arange(20000), 32, seed=0)
    p_ids = np.arange(20000, 20000 + args.probe_images)
    p_imgs, p_lab = render_shapes(p_ids, 32, seed=0)
    h_imgs, h_lab = render_shapes(
        np.arange(HOLDOUT_OFFSET, HOLDOUT_OFFSET + args.holdout), 32, seed=0
    )
    rows = []
    for vf in (0.1, 0.0):
        t0 = time.time()
        model = train(vf, train_imgs, int(args.images), 32, 2e-3)
        with torch.no_grad():
            x = images_to_float(torch.from_numpy(h_imgs))
            rec = model.decode(model.encode(x)).clamp(-1, 1)
        psnr = float(10 * np.log10(4.0 / ((rec - x) ** 2).mean().item()))
        acc = probe(latents(model, p_imgs), torch.from_numpy(p_lab).long(),
                    latents(model, h_imgs), torch.from_numpy(h_lab).long())  # fmt: skip
        rows.append({"vf_weight": vf, "linear_probe_accuracy": acc, "psnr_db": psnr,
                     "train_seconds": time.time() - t0})  # fmt: skip
    emit({"benchmark": "vf_linear_probe", "images": int(args.images), "rows": rows}, args.out)


if __name__ == "__main__":
    main()
