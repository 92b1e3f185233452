"""The embedded ``shapes`` dataset: deterministic, procedural, class-conditional images.

Pure NumPy. Image ``i`` of seed ``s`` is drawn from its own generator
``np.random.default_rng([s, i])``, so any subset, shard or order of indices renders the
same pixels. The class is ``i % num_classes`` (class-balanced). A shape of random colour,
scale, position and rotation is drawn over a textured background (a two-colour gradient
modulated by stripes, a checkerboard or smooth noise). Each shape is a signed distance
function (negative inside) in unit coordinates, and its coverage of a pixel is the
distance clipped to a one-pixel ramp, which anti-aliases the edges at any resolution.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

CLASS_NAMES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "hexagon",
    "crescent",
    "arrow",
    "heart",
)
NUM_CLASSES = len(CLASS_NAMES)
HOLDOUT_OFFSET = 1 << 30  # the held-out split renders indices HOLDOUT_OFFSET + i

Array = np.ndarray


def label_of(indices: Iterable[int], num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Class of each index: ``index % num_classes`` (int64)."""
    return np.asarray(list(indices), dtype=np.int64) % num_classes


# --- signed distances of the shapes; every shape fits inside the unit disc -------------


def _box(x: Array, y: Array, half_w: float, half_h: float) -> Array:
    return np.maximum(np.abs(x) - half_w, np.abs(y) - half_h)


def _halfplane(x: Array, y: Array, a: float, b: float, c: float) -> Array:
    """Signed distance to the line a*x + b*y = c (inside where a*x + b*y < c)."""
    return (a * x + b * y - c) / float(np.hypot(a, b))


def _polygon(x: Array, y: Array, n: int, radius: float, phase: float = 0.0) -> Array:
    """Regular n-gon of circumradius ``radius``: the largest of its edges' distances."""
    angles = phase + (2 * np.arange(n) + 1) * np.pi / n
    normals = np.stack([np.cos(angles), np.sin(angles)]).astype(np.float32)  # (2, n)
    proj = x[..., None] * normals[0] + y[..., None] * normals[1]  # (..., n)
    return proj.max(axis=-1) - float(radius * np.cos(np.pi / n))


def _star(x: Array, y: Array, points: int = 5, inner: float = 0.45) -> Array:
    """Star polygon: fold the angle into one half-sector, where the edge is one line."""
    sector = 2 * np.pi / points
    theta = np.arctan2(y, x) - np.pi / 2  # a tip points along +y before rotation
    folded = np.abs(np.mod(theta, sector) - sector / 2)  # 0 at a valley, sector/2 at a tip
    r = np.hypot(x, y)
    u, v = r * np.cos(sector / 2 - folded), r * np.sin(sector / 2 - folded)  # tip on +u
    # the edge from the tip (1, 0) to the valley inner * (cos(sector/2), sin(sector/2))
    vx, vy = float(inner * np.cos(sector / 2) - 1.0), float(inner * np.sin(sector / 2))
    return (vy * (u - 1.0) - vx * v) / float(np.hypot(vx, vy))


def _circle(x: Array, y: Array) -> Array:
    return np.hypot(x, y) - 0.9


def _square(x: Array, y: Array) -> Array:
    return _box(x, y, 0.68, 0.68)


def _triangle(x: Array, y: Array) -> Array:
    return _polygon(x, y, 3, 1.0, np.pi / 2)


def _cross(x: Array, y: Array) -> Array:
    return np.minimum(_box(x, y, 0.28, 0.9), _box(x, y, 0.9, 0.28))


def _ring(x: Array, y: Array) -> Array:
    return np.abs(np.hypot(x, y) - 0.73) - 0.19


def _hexagon(x: Array, y: Array) -> Array:
    return _polygon(x, y, 6, 0.95)


def _crescent(x: Array, y: Array) -> Array:
    return np.maximum(np.hypot(x, y) - 0.9, 0.72 - np.hypot(x - 0.42, y - 0.12))


def _arrow(x: Array, y: Array) -> Array:
    shaft = _box(x + 0.375, y, 0.525, 0.2)
    head = np.maximum(0.05 - x, _halfplane(x, np.abs(y), 0.8, 1.0, 0.76))
    return np.minimum(shaft, head)


def _heart(x: Array, y: Array) -> Array:
    lobes = np.hypot(np.abs(x) - 0.36, y + 0.3) - 0.42
    point = np.maximum(-0.35 - y, _halfplane(np.abs(x), y, 1.0, 0.62, 0.558))
    return np.minimum(lobes, point)


_SDF: dict[str, Callable[[Array, Array], Array]] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "star": _star,
    "cross": _cross,
    "ring": _ring,
    "hexagon": _hexagon,
    "crescent": _crescent,
    "arrow": _arrow,
    "heart": _heart,
}


# --- rendering ------------------------------------------------------------------------


def _texture(rng: np.random.Generator, u: Array) -> Array:
    """A zero-mean texture in about [-1, 1] on the grid ``u`` x ``u``: (res, res)."""
    kind = rng.integers(3)
    freq = rng.uniform(3.0, 9.0)
    if kind == 0:  # stripes at a random angle
        a = rng.uniform(0.0, np.pi)
        ca, sa = 2 * np.pi * freq * np.cos(a), 2 * np.pi * freq * np.sin(a)
        return np.sin(u[None, :] * float(ca) + u[:, None] * float(sa))
    if kind == 1:  # checkerboard
        s = np.sign(np.sin(2 * np.pi * freq * u))
        return s[:, None] * s[None, :]
    tex = np.zeros((len(u), len(u)), dtype=np.float32)  # smooth noise: random plane waves
    for _ in range(4):
        kx, ky = (2 * np.pi * freq * rng.normal(size=2)).tolist()
        tex += np.sin(kx * u[None, :] + ky * u[:, None] + rng.uniform(0, 6.3))
    return tex / 2.0


def _background(rng: np.random.Generator, res: int) -> tuple[Array, Array]:
    """A two-colour gradient times a low-contrast texture: float32 (res, res, 3) in [0, 1],
    and the gradient's mean colour (3,)."""
    c0, c1 = rng.uniform(0.0, 1.0, size=(2, 3)).astype(np.float32)
    angle = rng.uniform(0.0, 2 * np.pi)
    u = ((np.arange(res) + 0.5) / res).astype(np.float32)
    g = u[None, :] * float(np.cos(angle)) + u[:, None] * float(np.sin(angle))  # (H, W)
    g = (g - g.min()) / max(float(g.max() - g.min()), 1e-6)
    base = c0 + (c1 - c0) * g[..., None]
    contrast = np.float32(rng.uniform(0.05, 0.2))
    image = np.clip(base * (1 + contrast * _texture(rng, u))[..., None], 0.0, 1.0)
    return image, c0 + (c1 - c0) * g.mean()


def _render_one(index: int, res: int, seed: int, num_classes: int) -> tuple[Array, Array]:
    """uint8 image (res, res, 3) and the shape's float32 pixel coverage (res, res)."""
    rng = np.random.default_rng([seed, index])
    image, bg_mean = _background(rng, res)
    scale = rng.uniform(0.22, 0.42)  # shape radius as a fraction of the image side
    cx, cy = rng.uniform(scale, 1 - scale, size=2)
    rot = rng.uniform(0.0, 2 * np.pi)
    fg = rng.uniform(0.0, 1.0, size=3).astype(np.float32)
    if np.abs(fg - bg_mean).sum() < 0.6:  # keep the shape visible against its background
        fg = np.where(bg_mean > 0.5, fg * 0.35, 0.65 + fg * 0.35).astype(np.float32)
    # evaluate the distance only in the pixel box around the shape (it fits its unit disc)
    y0, x0 = (max(int((c - scale) * res) - 1, 0) for c in (cy, cx))
    y1, x1 = (min(int(np.ceil((c + scale) * res)) + 1, res) for c in (cy, cx))
    py = ((np.arange(y0, y1, dtype=np.float32) + 0.5) / res - cy) / scale
    px = ((np.arange(x0, x1, dtype=np.float32) + 0.5) / res - cx) / scale
    cos, sin = np.float32(np.cos(rot)), np.float32(np.sin(rot))
    x = px[None, :] * cos + py[:, None] * sin  # (h, w) shape-frame coordinates
    y = py[:, None] * cos - px[None, :] * sin
    dist = _SDF[CLASS_NAMES[index % num_classes]](x, y)
    # coverage: distance in pixels through a one-pixel ramp centred on the edge
    coverage = np.zeros((res, res), dtype=np.float32)
    coverage[y0:y1, x0:x1] = np.clip(0.5 - dist * np.float32(scale * res), 0.0, 1.0)
    box = image[y0:y1, x0:x1]
    image[y0:y1, x0:x1] = box + (fg - box) * coverage[y0:y1, x0:x1, None]
    return (image * 255 + 0.5).astype(np.uint8), coverage


def render_shapes(
    indices: Iterable[int], resolution: int = 64, seed: int = 0, num_classes: int = NUM_CLASSES
) -> tuple[np.ndarray, np.ndarray]:
    """Render images ``indices`` of the ``shapes`` set; image i depends only on (seed, i).

    Returns uint8 images (N, H, W, 3) and int64 labels (N,).
    """
    if not 2 <= num_classes <= NUM_CLASSES:
        raise ValueError(f"num_classes must be in [2, {NUM_CLASSES}], got {num_classes}")
    idx = np.asarray(list(indices), dtype=np.int64).reshape(-1)
    images = np.empty((len(idx), resolution, resolution, 3), dtype=np.uint8)
    for k, i in enumerate(idx.tolist()):
        images[k] = _render_one(i, resolution, seed, num_classes)[0]
    return images, idx % num_classes


def render_masks(
    indices: Iterable[int], resolution: int = 64, seed: int = 0, num_classes: int = NUM_CLASSES
) -> np.ndarray:
    """The shape's coverage of each pixel of ``render_shapes(...)``: float32 (N, H, W) in
    [0, 1] (ground truth for segmentation-style supervision or checks)."""
    idx = np.asarray(list(indices), dtype=np.int64).reshape(-1)
    masks = np.empty((len(idx), resolution, resolution), dtype=np.float32)
    for k, i in enumerate(idx.tolist()):
        masks[k] = _render_one(i, resolution, seed, num_classes)[1]
    return masks
