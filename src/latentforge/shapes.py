"""The embedded ``shapes`` dataset: deterministic, procedural, class-conditional images.

Pure NumPy. Image ``i`` of seed ``s`` is drawn from its own generator
``np.random.default_rng([s, i])``, so any subset, shard or order of indices renders the
same pixels. The class is ``i % num_classes`` (class-balanced). Shapes are drawn with
random colour, scale, position and rotation over a textured background (gradient plus
stripes, checkerboard or smooth noise), anti-aliased by 3x3 supersampling of the mask.

Two layouts: the default (``SCALE``, ``JITTER``) draws large shapes near the centre, any
rotation; ``WIDE_SCALE``/``WIDE_JITTER`` draws them anywhere and down to half that size.
The embedded assets are trained on the wide layout, which contains the default one, so
they also judge data of narrower layouts. Why the default is the narrower one: a class
is then a larger share of each image, and a DiT trained for minutes on 2 CPU cores
learns class-conditional shapes from it (with the wide layout the demo's samples reach a
class accuracy of 0.19, with the default one several times that).

The classes differ in how the shape is built (one part or several, a hole, arms, a
concavity, elongation), not in the sharpness of corners. Until 2026-11-30 the set had a
square, a triangle and a hexagon instead of ``bar``, ``dots`` and ``bars``: at 32x32
through the demo's 8x8 latents those three differ from a circle and from each other only
by corners a few pixels deep, which the tokenizer rounds off (a triangle's reconstruction
was classified right 24% of the time) and the demo's DiT never drew: with 4x the demo's
generator compute (400k images) they stayed at 0.0-0.2 class accuracy while the other
classes reached 0.5-1.0, and rounded squares and hexagons were taken for circles.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

CLASS_NAMES = (
    "circle",
    "bar",
    "dots",
    "star",
    "cross",
    "ring",
    "bars",
    "crescent",
    "arrow",
    "heart",
)
NUM_CLASSES = len(CLASS_NAMES)
HOLDOUT_OFFSET = 1 << 30  # the held-out split renders indices HOLDOUT_OFFSET + i
SUPERSAMPLE = 3
SCALE = (0.34, 0.42)  # shape radius as a fraction of the image side
JITTER = 0.3  # share of the free range around the centre that positions may use
WIDE_SCALE = (0.22, 0.42)
WIDE_JITTER = 1.0
WIDE = {"scale": WIDE_SCALE, "jitter": WIDE_JITTER}  # render_shapes(..., **WIDE)


def label_of(indices: Iterable[int], num_classes: int = NUM_CLASSES) -> np.ndarray:
    return np.asarray(list(indices), dtype=np.int64) % num_classes


def _star(x, y) -> np.ndarray:
    r = np.hypot(x, y)
    theta = np.arctan2(y, x) - np.pi / 2
    # radius of a 5-pointed star outline as a function of angle, between 0.42 and 1.0
    frac = np.abs(((theta * 5 / (2 * np.pi)) % 1.0) - 0.5) * 2  # 1 at the tips, 0 between
    return r <= 0.42 + 0.58 * frac**1.5


def _mask(label: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean mask of shape ``label`` in unit coordinates (shape fits the unit disc)."""
    name = CLASS_NAMES[label % NUM_CLASSES]
    r = np.hypot(x, y)
    if name == "circle":
        return r <= 0.9
    if name == "bar":
        return (np.abs(x) <= 0.95) & (np.abs(y) <= 0.34)
    if name == "dots":  # three separate discs on a triangle
        angles = np.pi / 2 + 2 * np.pi / 3 * np.arange(3)
        return np.any(
            [np.hypot(x - 0.58 * np.cos(a), y - 0.58 * np.sin(a)) <= 0.36 for a in angles], axis=0
        )
    if name == "star":
        return _star(x, y)
    if name == "cross":
        return ((np.abs(x) <= 0.28) & (np.abs(y) <= 0.9)) | (
            (np.abs(y) <= 0.28) & (np.abs(x) <= 0.9)
        )
    if name == "ring":
        return (r <= 0.92) & (r >= 0.55)
    if name == "bars":  # two parallel bars
        return (np.abs(x) <= 0.78) & (np.abs(y) >= 0.18) & (np.abs(y) <= 0.58)
    if name == "crescent":
        return (r <= 0.9) & (np.hypot(x - 0.42, y - 0.12) > 0.72)
    if name == "arrow":
        shaft = (np.abs(y) <= 0.2) & (x >= -0.9) & (x <= 0.15)
        head = (x >= 0.05) & (x <= 0.95) & (np.abs(y) <= (0.95 - x) * 0.8)
        return shaft | head
    # heart: two lobes and a point
    lobes = (np.hypot(x - 0.36, y + 0.3) <= 0.42) | (np.hypot(x + 0.36, y + 0.3) <= 0.42)
    point = (y >= -0.35) & (np.abs(x) <= (0.9 - y) * 0.62) & (y <= 0.9)
    return lobes | point


def _background(rng: np.random.Generator, res: int) -> np.ndarray:
    """Float (res, res, 3) in [0, 1]: a two-colour gradient times a low-contrast texture."""
    c0, c1 = rng.uniform(0.0, 1.0, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    u = (np.arange(res) + 0.5) / res
    gy, gx = np.meshgrid(u, u, indexing="ij")
    g = gx * np.cos(angle) + gy * np.sin(angle)
    g = (g - g.min()) / max(g.max() - g.min(), 1e-6)
    base = c0 * (1 - g[..., None]) + c1 * g[..., None]
    kind = rng.integers(3)
    freq = rng.uniform(3, 9)
    if kind == 0:  # stripes
        a = rng.uniform(0, np.pi)
        tex = np.sin(2 * np.pi * freq * (gx * np.cos(a) + gy * np.sin(a)))
    elif kind == 1:  # checkerboard
        tex = np.sign(np.sin(2 * np.pi * freq * gx) * np.sin(2 * np.pi * freq * gy))
    else:  # smooth noise: a few random plane waves
        tex = np.zeros_like(gx)
        for _ in range(4):
            k = rng.normal(size=2) * freq
            tex += np.sin(2 * np.pi * (k[0] * gx + k[1] * gy) + rng.uniform(0, 2 * np.pi))
        tex /= 2.0
    contrast = rng.uniform(0.05, 0.2)
    return np.clip(base * (1 + contrast * tex[..., None]), 0, 1)


def _render_one(
    index: int, res: int, seed: int, num_classes: int, scale_range, jitter: float
) -> np.ndarray:
    rng = np.random.default_rng([seed, int(index)])
    label = int(index) % num_classes
    image = _background(rng, res)
    scale = rng.uniform(*scale_range)  # shape radius as a fraction of the image side
    cx, cy = rng.uniform(scale, 1 - scale, size=2)
    if jitter != 1.0:  # (1.0 keeps the wide layout's positions bit for bit)
        cx, cy = 0.5 + jitter * (cx - 0.5), 0.5 + jitter * (cy - 0.5)
    rot = rng.uniform(0, 2 * np.pi)
    fg = rng.uniform(0.0, 1.0, size=3)
    # keep the shape visible: push its colour away from the background mean
    bg_mean = image.mean(axis=(0, 1))
    if np.abs(fg - bg_mean).sum() < 0.6:
        fg = np.where(bg_mean > 0.5, fg * 0.35, 0.65 + fg * 0.35)
    # supersample only the pixel box around the shape (every shape fits its unit disc)
    lo = np.clip(np.floor((np.array([cy, cx]) - scale) * res).astype(int) - 1, 0, res)
    hi = np.clip(np.ceil((np.array([cy, cx]) + scale) * res).astype(int) + 1, 0, res)
    ss = SUPERSAMPLE
    uy = (np.arange(lo[0] * ss, hi[0] * ss) + 0.5) / (res * ss)
    ux = (np.arange(lo[1] * ss, hi[1] * ss) + 0.5) / (res * ss)
    py, px = np.meshgrid(uy, ux, indexing="ij")
    dx, dy = (px - cx) / scale, (py - cy) / scale
    x = dx * np.cos(rot) + dy * np.sin(rot)
    y = -dx * np.sin(rot) + dy * np.cos(rot)
    mask = _mask(label, x, y).astype(np.float32)
    h, w = hi - lo
    alpha = mask.reshape(h, ss, w, ss).mean(axis=(1, 3))[..., None]
    box = image[lo[0] : hi[0], lo[1] : hi[1]]
    image[lo[0] : hi[0], lo[1] : hi[1]] = box * (1 - alpha) + fg * alpha
    return np.round(image * 255).astype(np.uint8)


def render_shapes(
    indices: Iterable[int],
    resolution: int = 64,
    seed: int = 0,
    num_classes: int = NUM_CLASSES,
    scale: tuple[float, float] = SCALE,
    jitter: float = JITTER,
) -> tuple[np.ndarray, np.ndarray]:
    """Render images ``indices`` of the ``shapes`` set; ``scale`` (radius range, fraction of
    the side) and ``jitter`` (0: centred, 1: anywhere the shape fits) set the layout.

    Returns uint8 images (N, H, W, 3) and int64 labels (N,).
    """
    if not 2 <= num_classes <= NUM_CLASSES:
        raise ValueError(f"num_classes must be in [2, {NUM_CLASSES}], got {num_classes}")
    lo, hi = scale
    if not 0.05 <= lo <= hi <= 0.5 or not 0.0 <= jitter <= 1.0:
        raise ValueError(
            f"shapes layout: need 0.05 <= scale <= 0.5 and jitter in [0, 1], "
            f"got scale={scale}, jitter={jitter}"
        )
    idx = np.asarray(list(indices), dtype=np.int64)
    images = np.empty((len(idx), resolution, resolution, 3), dtype=np.uint8)
    for k, i in enumerate(idx):
        images[k] = _render_one(int(i), resolution, seed, num_classes, (lo, hi), jitter)
    return images, idx % num_classes
