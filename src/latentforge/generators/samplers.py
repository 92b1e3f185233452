"""Samplers: Euler / Heun ODE, Euler-Maruyama SDE, classifier-free guidance (once, here).

Time runs from t = 0 (noise) to t = 1 (data) (see ``transport.py``). Guidance
(Ho & Salimans 2022) covers **all** channels by default; ``cfg_channels=3`` reproduces the
legacy DiT/SiT/LightningDiT behaviour that guides only the first three channels, kept only
to reproduce published numbers. The CFG interval (Kynkäänniemi et al. 2024) is given in
our time convention: guidance is on while ``lo <= t <= hi``; outside it no unconditional
pass is run, and the NFE count returned is the true number of network evaluations per
sample (a guided step counts 2).

Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of
Itself"; RAE guides DiT^DH-XL with a DiT^DH-S this way) replaces the unconditional pass by
a weaker ``guide`` network evaluated with the same labels:
v = v_guide + w (v_model - v_guide), within the same interval. The guide runs as its own
pass at the model's batch size, so a guide equal to the model reproduces the unguided
sample exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal

import numpy as np
import torch
from torch import nn
from torchdiffeq import odeint

from latentforge.generators.transport import Transport, shift_t


def noise_for_seeds(seeds: Sequence[int], shape: tuple[int, ...], device="cpu") -> torch.Tensor:
    """Per-sample noise: sample i depends only on seeds[i] (edm2's StackedRandomGenerator)."""
    out = torch.empty((len(seeds), *shape))
    for i, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(int(seed))
        out[i] = torch.randn(shape, generator=g)
    return out.to(device)


class SeedStreams:
    """Per-sample random streams for the SDE's per-step noise: sample i draws only from a
    generator seeded by seeds[i] (mixed with a stream tag, so it is not the initial noise's
    stream), so its noise does not depend on the batch it is sampled in."""

    def __init__(self, seeds: Sequence[int]):
        self.gens = []
        for seed in seeds:
            state = np.random.SeedSequence([int(seed), 0x5DE]).generate_state(1, np.uint64)
            self.gens.append(torch.Generator().manual_seed(int(state[0])))

    def randn(self, shape: tuple[int, ...], device, dtype) -> torch.Tensor:
        out = torch.stack([torch.randn(shape, generator=g) for g in self.gens])
        return out.to(device=device, dtype=dtype)


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """Labels 0, 1, ..., C-1, 0, 1, ...: equal counts per class when C divides n."""
    return torch.arange(n) % num_classes


class JointClassToken(nn.Module):
    """REG sampling: the latent and the VFM class token integrate as one flat state
    (B, prod(latent_shape) + cls_dim), so every sampler and the guidance (which then covers
    the class token too) work unchanged. ``split`` recovers (latents, class tokens)."""

    def __init__(self, model: nn.Module, latent_shape: tuple[int, ...], cls_dim: int):
        super().__init__()
        self.model, self.latent_shape, self.cls_dim = model, tuple(latent_shape), cls_dim
        self.numel = math.prod(self.latent_shape)

    def split(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return state[:, : self.numel].reshape(-1, *self.latent_shape), state[:, self.numel :]

    def forward(self, state: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, cls = self.split(state)
        out, cls_out = self.model(x, t, y, cls=cls)
        return torch.cat([out.flatten(1), cls_out], dim=1)


class Guided:
    """Velocity field with classifier-free guidance or autoguidance (``guide``); counts
    network evaluations."""

    def __init__(
        self,
        model,
        transport: Transport,
        y,
        null_class: int,
        scale: float,
        interval: tuple[float, float],
        channels: int | None,
        guide=None,
    ):
        self.model, self.transport, self.y, self.guide = model, transport, y, guide
        self.null = torch.full_like(y, null_class)
        self.scale, self.interval, self.channels = scale, interval, channels
        self.nfe = 0

    def guided_at(self, t: float) -> bool:
        return self.scale != 1.0 and self.interval[0] <= t <= self.interval[1]

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
        if not self.guided_at(t):
            self.nfe += 1
            return self.transport.velocity(self.model(x, tt, self.y), x, tt)
        self.nfe += 2
        if self.guide is not None:  # autoguidance: the weaker model, same labels
            cond = self.transport.velocity(self.model(x, tt, self.y), x, tt)
            uncond = self.transport.velocity(self.guide(x, tt, self.y), x, tt)
        else:
            both = self.model(
                torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([self.y, self.null])
            )
            v = self.transport.velocity(both, torch.cat([x, x]), torch.cat([tt, tt]))
            cond, uncond = v.chunk(2)
        guided = uncond + self.scale * (cond - uncond)
        if self.channels is None:
            return guided
        out = cond.clone()  # legacy: only the first `channels` channels are guided
        out[:, : self.channels] = guided[:, : self.channels]
        return out


def time_grid(
    steps: int,
    shift: float,
    device,
    span: tuple[float, float] = (0.0, 1.0),
    last_step: float = 0.0,
) -> torch.Tensor:
    """``steps + 1`` shifted times from span[0] (noise side) to span[1]. With ``last_step``
    (SiT's ``last_step_size``), the last step spans that much time and the others are the
    shifted grid over the rest: SiT / MAETok's SDE grid with 0.04 is
    ``linspace(0, 0.96, steps)`` then 1."""
    lo, hi = span
    if last_step:
        if not 0 < last_step < hi - lo or steps < 2:
            raise ValueError(
                f"sde_last_step {last_step}: needs 0 < it < {hi - lo:g} and 2 or more steps"
            )
        head = time_grid(steps - 1, shift, device, (lo, hi - last_step))
        return torch.cat([head, head.new_tensor([hi])])
    grid = shift_t(torch.linspace(0.0, 1.0, steps + 1, device=device, dtype=torch.float64), shift)
    return lo + (hi - lo) * grid


@dataclass(frozen=True)
class SamplerOptions:
    """How :func:`sample` integrates (see its docstring)."""

    steps: int = 50
    method: Literal["euler", "heun", "euler_maruyama", "dopri5"] = "euler"
    cfg_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    cfg_channels: int | None = None
    timestep_shift: float = 1.0
    atol: float = 1e-6
    rtol: float = 1e-3
    sde_diffusion: float = 1.0  # the SDE's diffusion scale (em_step; SiT and MAETok: 2)
    sde_last_step: float = 0.0  # length of the last step (time_grid; SiT and MAETok: 0.04)


@torch.no_grad()
def sample(
    model,
    transport: Transport,
    noise: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int = 50,
    method: Literal["euler", "heun", "euler_maruyama", "dopri5"] = "euler",
    cfg_scale: float = 1.0,
    cfg_interval: tuple[float, float] = (0.0, 1.0),
    cfg_channels: int | None = None,
    timestep_shift: float = 1.0,
    null_class: int,
    generator: torch.Generator | None = None,
    noise_seeds: Sequence[int] | None = None,
    micro_batch: int | None = None,
    atol: float = 1e-6,
    rtol: float = 1e-3,
    guide: nn.Module | None = None,
    sde_diffusion: float = 1.0,
    sde_last_step: float = 0.0,
) -> tuple[torch.Tensor, int]:
    """Integrate from noise (t = 0) to data (t = 1).

    Args: noise (B, *latent_shape), y (B,) class ids. Returns (samples, NFE per sample).
    The integration runs over ``transport.sample_range()``: [0, 1] for velocity prediction
    on linear / gvp, otherwise a little away from the end where the path is singular.
    ``euler_maruyama`` draws its per-step noise from ``noise_seeds`` (one seed per sample:
    each sample's noise is its own, whatever the batch split) or else from ``generator``
    (one stream for the batch: deterministic, but dependent on how the batch is split).
    ``dopri5`` is torchdiffeq's adaptive Dormand-Prince solver (``atol``/``rtol``; the
    official small-scale ablations use 1e-6/1e-3); ``steps`` and the shift do not apply,
    and its step sizes follow the error of the whole (micro-)batch.
    With ``micro_batch`` the network always sees chunks of exactly that many samples (the
    last one padded), so results are bit-identical however the caller splits the batch,
    as long as splits fall on multiples of ``micro_batch`` (BLAS kernels may otherwise
    reduce in a batch-size-dependent order). With ``guide`` (a network of the model's
    signature, e.g. a smaller or earlier checkpoint) the guidance is autoguidance: the
    guide's conditional velocity takes the place of the unconditional one.
    """
    check_arguments(model, noise, method, cfg_channels, generator, noise_seeds, guide)
    opts = SamplerOptions(
        steps,
        method,
        cfg_scale,
        tuple(cfg_interval),
        cfg_channels,
        timestep_shift,
        atol,
        rtol,
        sde_diffusion,
        sde_last_step,
    )
    run = partial(
        integrate, model, transport, null_class=null_class, opts=opts, rng=generator, guide=guide
    )
    if not micro_batch:
        return run(noise, y, noise_seeds)
    return in_micro_batches(run, noise, y, noise_seeds, micro_batch)


def in_micro_batches(run, noise, y, noise_seeds, micro_batch: int) -> tuple[torch.Tensor, int]:
    """``run(noise, y, seeds)`` on chunks of exactly ``micro_batch`` samples (the last one
    padded); the samples concatenated, and the NFE per sample."""
    outs, nfe = [], 0
    for i in range(0, noise.shape[0], micro_batch):
        n, yy = noise[i : i + micro_batch], y[i : i + micro_batch]
        ss = None if noise_seeds is None else list(noise_seeds[i : i + micro_batch])
        pad = micro_batch - n.shape[0]
        if pad:
            n = torch.cat([n, n.new_zeros((pad, *n.shape[1:]))])
            yy = torch.cat([yy, yy.new_zeros(pad)])
            ss = None if ss is None else ss + [0] * pad
        x, nfe = run(n, yy, ss)
        outs.append(x[: micro_batch - pad])
    return torch.cat(outs), nfe


def check_arguments(model, noise, method, cfg_channels, generator, noise_seeds, guide) -> None:
    """:func:`sample`'s arguments fit together, else a ValueError saying how."""
    if cfg_channels is not None and isinstance(model, JointClassToken):
        raise ValueError("cfg_channels (legacy partial guidance) does not apply to REG states")
    if cfg_channels is not None and guide is not None:
        raise ValueError("cfg_channels (legacy partial guidance) does not apply to autoguidance")
    if method == "euler_maruyama" and noise_seeds is None and generator is None:
        raise ValueError("euler_maruyama needs noise_seeds (one per sample) or a generator")
    if noise_seeds is not None and len(noise_seeds) != noise.shape[0]:
        raise ValueError(f"{len(noise_seeds)} noise_seeds for {noise.shape[0]} samples")


def integrate(
    model,
    transport: Transport,
    noise: torch.Tensor,
    y: torch.Tensor,
    noise_seeds: Sequence[int] | None,
    *,
    null_class: int,
    opts: SamplerOptions,
    rng: torch.Generator | None,
    guide: nn.Module | None = None,
) -> tuple[torch.Tensor, int]:
    """One batch of :func:`sample`, in eval mode (the model's mode is restored; a guide
    stays in eval mode)."""
    was_training = model.training
    model.eval()
    if guide is not None:
        guide.eval()
    field = Guided(
        model,
        transport,
        y.to(noise.device),
        null_class,
        opts.cfg_scale,
        opts.cfg_interval,
        opts.cfg_channels,
        guide,
    )
    try:
        if opts.method == "dopri5":
            return adaptive(field, transport, noise, opts), field.nfe
        sde = opts.method == "euler_maruyama"
        streams = SeedStreams(noise_seeds) if sde and noise_seeds else None
        return fixed_steps(field, transport, noise, opts, streams or rng), field.nfe
    finally:
        model.train(was_training)


def adaptive(field: Guided, transport: Transport, noise: torch.Tensor, opts: SamplerOptions):
    """torchdiffeq's Dormand-Prince over the sampling range."""
    if opts.timestep_shift != 1.0:
        raise ValueError("dopri5 chooses its own steps: timestep_shift must be 1")
    span = torch.tensor(transport.sample_range(), dtype=noise.dtype, device=noise.device)
    x = odeint(
        lambda t, x: field(x, float(t)),
        noise,
        span,
        method="dopri5",
        atol=opts.atol,
        rtol=opts.rtol,
    )
    return x[-1]


def fixed_steps(field: Guided, transport: Transport, x: torch.Tensor, opts: SamplerOptions, rng):
    """Euler, Heun or Euler-Maruyama over the shifted time grid; ``rng`` (SDE noise):
    :class:`SeedStreams` or a ``torch.Generator``."""
    steps = opts.steps
    span = transport.sample_range()
    ts = time_grid(steps, opts.timestep_shift, "cpu", span, opts.sde_last_step)  # host scalars
    for i in range(steps):
        t0, t1 = float(ts[i]), float(ts[i + 1])
        h = t1 - t0
        v0 = field(x, t0)
        if opts.method == "euler":
            x = x + h * v0
        elif opts.method == "heun":
            x_pred = x + h * v0
            x = x + h * 0.5 * (v0 + field(x_pred, t1)) if i < steps - 1 else x_pred
        elif opts.method == "euler_maruyama":
            x = em_step(x, v0, t0, h, transport, rng, i == steps - 1, opts.sde_diffusion)
        else:
            raise ValueError(f"unknown sampler {opts.method!r}")
    return x


def em_step(
    x, v, t: float, h: float, transport: Transport, rng, last: bool, scale: float = 1.0
) -> torch.Tensor:
    """One Euler-Maruyama step of the reverse SDE dx = [v + w(t)/2 * s(x, t)] dt + sqrt(w(t)) dW,
    with diffusion w(t) = scale * sigma(t) and the score recovered from v; the last step
    adds no noise (SiT's "Mean" last step). SiT's "sigma" form (willisma/SiT
    ``transport/integrators.py``: drift v + sigma s, noise sqrt(2 sigma dt)) is scale 2, as
    are REPA's and MAETok's samplers (w = 2 t in their t = 1 noise convention, linear path).
    ``rng``: :class:`SeedStreams` (per-sample noise) or a ``torch.Generator``."""
    a, s, da, ds = (c.item() for c in transport.coefficients(torch.tensor([t], dtype=x.dtype)))
    # for x_t = a x1 + s x0: score = (a v - da x) / (s (da s - a ds)), valid for 0 < t < 1
    denom = s * (da * s - a * ds)
    score = (a * v - da * x) / denom if denom > 1e-8 else torch.zeros_like(x)
    w = scale * s
    drift = v + 0.5 * w * score
    x = x + h * drift
    if last:
        return x
    if isinstance(rng, SeedStreams):
        noise = rng.randn(tuple(x.shape[1:]), x.device, x.dtype)
    else:
        where = rng.device if rng is not None else x.device  # a CPU generator for CUDA x
        noise = torch.randn(x.shape, generator=rng, device=where).to(x.device, x.dtype)
    return x + (w * h) ** 0.5 * noise
