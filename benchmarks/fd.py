"""Our Fréchet distance vs the scipy ``sqrtm`` route of pytorch-fid / ADM (JSON out).

Features: random Gaussians of dimension 2048 (Inception pool-3), ``--n`` samples per set
(fewer than 2048 gives rank-deficient covariances, where ``sqrtm`` is known to return
complex or NaN parts). Reports seconds (median of ``--repeats``), both values and their
relative difference.

    python benchmarks/fd.py --out runs/bench/fd.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from timing import median_seconds

from latentforge.metrics.frechet import FeatureStats, frechet_distance


def scipy_fd(a: FeatureStats, b: FeatureStats) -> float:
    """The usual route: sqrtm of the covariance product, real part, trace."""
    from scipy import linalg

    covmean = linalg.sqrtm(a.sigma @ b.sigma)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--n", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/fd.json"))
    args = ap.parse_args()
    rows = []
    for n in args.n:
        rng = np.random.default_rng(n)
        a = FeatureStats.of(rng.normal(size=(n, args.dim)))
        b = FeatureStats.of(rng.normal(size=(n, args.dim)) * 1.05 + 0.01)
        ours, ref = frechet_distance(a, b), scipy_fd(a, b)
        rows.append(
            {
                "dim": args.dim,
                "n": n,
                "ours_s": median_seconds(lambda a=a, b=b: frechet_distance(a, b), args.repeats, 0),
                "scipy_sqrtm_s": median_seconds(lambda a=a, b=b: scipy_fd(a, b), args.repeats, 0),
                "ours": ours,
                "scipy_sqrtm": ref,
                "relative_difference": abs(ours - ref) / abs(ref),
            }
        )
    text = json.dumps({"rows": rows}, indent=1)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
