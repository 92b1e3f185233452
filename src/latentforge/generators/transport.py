"""Interpolant transport: paths, prediction targets, time sampling, shift, training loss.

Time convention (used everywhere in latentforge): **t = 0 is noise, t = 1 is data**,

    x_t = alpha(t) * x1 + sigma(t) * x0,     x0 ~ N(0, I) noise, x1 data,

as in SiT (Ma et al. 2024) and LightningDiT (Yao et al. 2025). Papers and checkpoints
that put data at t = 0 (e.g. rectified-flow code where t = 1 is noise) convert with
:func:`flip_time` (times) and :func:`flip_velocity` (their velocity output). Paths:
``linear`` (alpha = t, sigma = 1 - t), ``gvp``
(alpha = sin(pi t / 2), sigma = cos(pi t / 2)) and ``vp`` (variance preserving with a
linear beta schedule in [0.1, 20]). Samplers only ever see velocities: :meth:`Transport.velocity`
turns any prediction type into dx_t/dt.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from latentforge.config import TransportConfig


def flip_time(t: torch.Tensor) -> torch.Tensor:
    """Convert times between the t=0-noise convention and the t=0-data one."""
    return 1.0 - t


def flip_velocity(v: torch.Tensor) -> torch.Tensor:
    """Convert a velocity between the two conventions: with t' = 1 - t, dx/dt' = -dx/dt.

    A rectified-flow model ``f(x, t')`` (t' = 1 noise, predicting noise - data) runs here as
    ``flip_velocity(f(x, flip_time(t)))``. Noise and score predictions do not change sign.
    """
    return -v


def shift_t(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Timestep shift in our convention (t = 1 data): t' = s t / (1 + (s - 1) t).

    s < 1 spends more steps near noise. LightningDiT's ``timestep_shift: 0.3`` is exactly
    this map and equals SD3's shift 1/0.3 in the t = 1 noise convention (Esser et al. 2024).
    """
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


SHIFT_BASE_DIM = 4096  # RAE's base dimension: latents of 4096 numbers need no shift


def dimension_shift(latent_shape: tuple[int, ...], base_dim: int = SHIFT_BASE_DIM) -> float:
    """RAE's dimension-dependent shift (Zheng et al. 2025; SD3's resolution-dependent shift,
    Esser et al. 2024) as our ``shift``. RAE uses s = sqrt(D / base_dim), D = C*H*W (C*N for
    1-D tokens), in its t = 1 noise convention: t' = s t / (1 + (s - 1) t), s > 1 moves
    times toward noise. In ours (t = 1 data) the same map is :func:`shift_t` with 1 / s.
    DINOv2-B latents (768 x 16 x 16): s = 6.93, our shift 0.144."""
    return 1.0 / math.sqrt(math.prod(latent_shape) / base_dim)


def resolve_shift(shift: float | str, latent_shape: tuple[int, ...] | None) -> float:
    """A configured shift as a number: ``auto`` is :func:`dimension_shift` of the latent
    shape (a derived value: the caller logs it; the config keeps ``auto``)."""
    if shift != "auto":
        return float(shift)
    if latent_shape is None:
        raise ValueError("shift 'auto' needs the latent shape (C, H, W) or (C, N)")
    return dimension_shift(tuple(latent_shape))


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (x.dim() - 1)))


SAMPLE_EPS = 1e-3  # SiT's sample_eps: how far sampling stays from a singular end


class Transport:
    """One implementation of the interpolant: coefficients, targets, loss, velocity.

    Where the path makes a target or the conversion to a velocity singular, times stay
    away from that end (SiT's ``train_eps`` / ``sample_eps``, Ma et al. 2024): sigma(1) = 0
    makes the score target -x0 / sigma and, on ``vp``, the velocity's d sigma / dt infinite;
    alpha(0) = 0 on ``linear`` / ``gvp`` makes a noise or score prediction say nothing about
    the data at t = 0. Velocity prediction on ``linear`` / ``gvp`` is regular everywhere.
    """

    def __init__(self, cfg: TransportConfig, latent_shape: tuple[int, ...] | None = None):
        """``latent_shape`` resolves ``train_shift: auto`` (into ``self.train_shift``)."""
        if cfg.train_eps < 0 or cfg.train_eps >= 0.5:
            raise ValueError(f"train_eps must be in [0, 0.5), got {cfg.train_eps}")
        self.cfg = cfg
        self.train_shift = resolve_shift(cfg.train_shift, latent_shape)
        velocity = cfg.prediction == "velocity"
        if cfg.train_eps > 0:
            self.train_eps = cfg.train_eps
        elif cfg.path == "vp":
            self.train_eps = 1e-5
        else:
            self.train_eps = 0.0 if velocity else 1e-3

    def sample_range(self) -> tuple[float, float]:
        """The times a sampler integrates between: [0, 1] where the velocity field is
        regular at both ends, else ``SAMPLE_EPS`` away from the singular end."""
        velocity = self.cfg.prediction == "velocity"
        lo = 0.0 if velocity or self.cfg.path == "vp" else max(SAMPLE_EPS, self.train_eps)
        hi = 1.0 - max(SAMPLE_EPS, self.train_eps) if self.cfg.path == "vp" else 1.0
        return lo, hi

    # alpha(t), sigma(t) and their time derivatives -------------------------------
    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        path = self.cfg.path
        if path == "linear":
            return t, 1 - t, torch.ones_like(t), -torch.ones_like(t)
        if path == "gvp":
            a, s = torch.sin(t * math.pi / 2), torch.cos(t * math.pi / 2)
            return a, s, math.pi / 2 * s, -math.pi / 2 * a
        # vp: log alpha(t) = -1/4 (1-t)^2 (bmax - bmin) - 1/2 (1-t) bmin (t = 1 data)
        bmin, bmax = 0.1, 20.0
        u = 1 - t
        log_a = -0.25 * u**2 * (bmax - bmin) - 0.5 * u * bmin
        a = torch.exp(log_a)
        s = torch.sqrt(1 - a**2)
        da = a * (0.5 * u * (bmax - bmin) + 0.5 * bmin)
        ds = -a * da / s
        return a, s, da, ds

    def sample_t(
        self, batch: int, device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Training times: uniform or logit-normal (Esser et al. 2024), then shifted."""
        if self.cfg.t_sampling == "uniform":
            t = torch.rand(batch, device=device, generator=generator)
        else:
            n = torch.randn(batch, device=device, generator=generator)
            t = torch.sigmoid(n * self.cfg.lognorm_std + self.cfg.lognorm_mean)
        t = shift_t(t, self.train_shift)
        eps = self.train_eps
        return t.clamp(eps, 1 - eps) if eps > 0 else t

    def target(self, x0, x1, t) -> torch.Tensor:
        a, s, da, ds = (_bcast(c, x1) for c in self.coefficients(t))
        if self.cfg.prediction == "velocity":
            return da * x1 + ds * x0
        if self.cfg.prediction == "noise":
            return x0
        return -x0 / s  # score of p(x_t | x1)

    def loss(
        self, model, x1, y, generator: torch.Generator | None = None, features=None, cls=None
    ) -> dict[str, torch.Tensor]:
        """MSE to the target, plus the velocity-direction (cosine over channels) loss, plus
        REPA's alignment loss when ``repa_weight > 0``, plus REG's class-token loss when
        ``reg_weight > 0``.

        ``features``: the frozen VFM's patch features of the clean images, (B, D, h, w);
        resized (area / bilinear) to the model's token grid when it differs.
        ``cls``: the VFM's (normalised) class token of the clean images, (B, D), for REG;
        it is noised with the same t and path as x1 and its target is weighted by
        ``reg_weight``. Returns ``loss`` (to back-propagate), ``mse``, ``cos``, ``repa``
        and ``reg`` (detached).
        """
        t = self.sample_t(x1.shape[0], x1.device, generator)
        x0 = torch.randn(x1.shape, device=x1.device, generator=generator, dtype=x1.dtype)
        a, s, _, _ = (_bcast(c, x1) for c in self.coefficients(t))
        xt = a * x1 + s * x0
        kwargs = {}
        if self.cfg.reg_weight > 0:
            if cls is None:
                raise ValueError("transport.reg_weight > 0 needs the VFM class token of x1")
            cls0 = torch.randn(cls.shape, device=cls.device, generator=generator, dtype=cls.dtype)
            ac, sc, _, _ = (_bcast(c, cls) for c in self.coefficients(t))
            kwargs["cls"] = ac * cls + sc * cls0
        repa_on = self.cfg.repa_weight > 0
        if repa_on and features is None:
            raise ValueError("transport.repa_weight > 0 needs the VFM features of x1")
        outs = model(xt, t, y, return_repa=True, **kwargs) if repa_on else model(xt, t, y, **kwargs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        pred = outs[0]
        repa = repa_loss(outs[-1], features, getattr(model, "grid", None)) if repa_on else None
        reg = None
        if kwargs:
            reg = (outs[1].float() - self.target(cls0, cls, t).float()).pow(2).mean()
        tgt = self.target(x0, x1, t)
        mse = (pred.float() - tgt.float()).pow(2).mean()
        # eps 1e-2 on the prediction's norm: the zero-initialised backbone outputs exactly 0
        # at step 0, where the plain cosine's gradient (1/|pred|) is ~1e8
        cos = (
            1
            - (F.normalize(pred.float(), dim=1, eps=1e-2) * F.normalize(tgt.float(), dim=1)).sum(1)
        ).mean()
        loss = mse + self.cfg.cos_loss_weight * cos if self.cfg.cos_loss_weight else mse
        out = {"mse": mse.detach(), "cos": cos.detach()}
        if repa is not None:
            loss = loss + self.cfg.repa_weight * repa
            out["repa"] = repa.detach()
        if reg is not None:
            loss = loss + self.cfg.reg_weight * reg
            out["reg"] = reg.detach()
        out["loss"] = loss
        return out

    def velocity(self, pred: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """dx/dt from the model's prediction at (x, t), whatever the prediction type."""
        if self.cfg.prediction == "velocity":
            return pred
        a, s, da, ds = (_bcast(c, x) for c in self.coefficients(t))
        noise = pred if self.cfg.prediction == "noise" else -pred * s
        x1 = (x - s * noise) / a.clamp(min=1e-5)
        return da * x1 + ds * noise


def repa_loss(
    projected: torch.Tensor, features: torch.Tensor, grid: tuple[int, int] | None = None
) -> torch.Tensor:
    """REPA's alignment loss: minus the mean over tokens of cos(projected, features).

    Shapes: projected (B, T, D) in row-major token order on ``grid`` (h, w) (a square grid
    when None); features (B, D, h', w'), resized to ``grid`` (area pooling when shrinking,
    bilinear otherwise) when the grids differ.
    """
    n = projected.shape[1]
    if grid is None:
        side = int(round(n**0.5))
        grid = (side, side)
    if tuple(features.shape[-2:]) != tuple(grid):
        shrink = features.shape[-2] >= grid[0] and features.shape[-1] >= grid[1]
        mode = "area" if shrink else "bilinear"
        features = F.interpolate(features.float(), size=grid, mode=mode)
    target = features.flatten(2).transpose(1, 2).to(projected.dtype)  # (B, T, D)
    return -F.cosine_similarity(projected, target, dim=-1).mean()
