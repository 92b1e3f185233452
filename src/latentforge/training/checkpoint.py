"""Training checkpoints: a directory of safetensors weights of the unwrapped model (+ EMA),
the optimizer state (loadable with ``weights_only=True``), ``state.json`` (images seen)
and ``curve.json`` (the loss curve so far); a tokenizer trained with a GAN adds its
discriminator (``discriminator.safetensors``, kept out of the tokenizer's weights) and
that optimizer's state (``optimizer_disc.pt``)."""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from latentforge.models import state_dict_of

if TYPE_CHECKING:
    from latentforge.training.loop import Job


def save_checkpoint(path: str, job: Job, ema, opt, state: dict, curve: list, opt_d=None) -> None:
    save_file(state_dict_of(job.model), os.path.join(path, "model.safetensors"))
    if ema is not None:
        save_file(state_dict_of(ema), os.path.join(path, "ema.safetensors"))
    torch.save(opt.state_dict(), os.path.join(path, "optimizer.pt"))
    if job.discriminator is not None:
        save_file(state_dict_of(job.discriminator), os.path.join(path, "discriminator.safetensors"))
        torch.save(opt_d.state_dict(), os.path.join(path, "optimizer_disc.pt"))
    Path(path, "state.json").write_text(json.dumps(state))
    Path(path, "curve.json").write_text(json.dumps(curve))


def load_checkpoint(path: str, job: Job, ema, opt, opt_d=None) -> tuple[dict, list]:
    job.model.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
    if ema is not None:
        ema.load_state_dict(load_file(os.path.join(path, "ema.safetensors")))
    # on the CPU first (a GPU-saved state would otherwise land on cuda:0 on every rank, or
    # fail on a CPU-only run); load_state_dict moves it to the parameters' device
    load = partial(torch.load, map_location="cpu", weights_only=True)
    opt.load_state_dict(load(os.path.join(path, "optimizer.pt")))
    if job.discriminator is not None:
        disc = load_file(os.path.join(path, "discriminator.safetensors"))
        job.discriminator.load_state_dict(disc)
        opt_d.load_state_dict(load(os.path.join(path, "optimizer_disc.pt")))
    state = json.loads(Path(path, "state.json").read_text())
    curve = json.loads(Path(path, "curve.json").read_text())
    return state, curve
