"""The stage table: what each stage of an experiment is, in one place.

A :class:`Stage` declares its name, CLI verb, upstream stage, the config parts in its hash
(besides its upstream's hash), its preflight checks, its run and its extras (outputs in no
hash that a done stage still owes: the extraction's latent diagnostics). The pipeline driver
(:mod:`latentforge.platform.pipeline`), the CLI's verbs, the report and the sweep's stage
accounting all read :data:`STAGES`.

Compute settings (``ray.*``, batch sizes of inference) are in no hash: they do not change
results. Optional keys left unset (None) are left out of hashes, so adding one keeps
earlier stage hashes valid.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from latentforge import models
from latentforge.config import ConfigError, ExperimentConfig, to_dict
from latentforge.platform import evaluate as evaluation
from latentforge.platform import extract as extraction
from latentforge.platform.data import listing_seed, load_images
from latentforge.platform.diagnose import check_diagnostics, run_diagnostics
from latentforge.platform.sample import run_sampling
from latentforge.platform.train import scaling, train_stage
from latentforge.report import write_report
from latentforge.tokenizers.vfm import check_vfm_spec

if TYPE_CHECKING:
    from latentforge.platform.pipeline import Run


@dataclass(frozen=True)
class Stage:
    """One stage of an experiment."""

    name: str
    verb: str  # its CLI verb
    summary: str  # one line, for ``latentforge --help``
    upstream: str | None
    hash_parts: Callable[[ExperimentConfig], list]  # config parts in its hash
    check: Callable[[ExperimentConfig], None]  # preflight: raises naming the key
    run: Callable[[Run, Path], dict]  # writes the artifacts into the directory given
    resumes_in_place: bool = False  # an unfinished directory is resumed, not wiped
    # outputs in no hash that a done stage still owes (extract's diagnostics): run after
    # the stage and whenever it is found cached; complete ones return at once
    extras: Callable[[Run, Path], dict] | None = None


TOKENIZER_TRAIN_KEYS = (
    "tokenizer_images",
    "tokenizer_lr",
    "tokenizer_batch_size",
    "tokenizer_betas",
    "tokenizer_lr_decay",
    "tokenizer_final_lr",
)
GENERATOR_TRAIN_KEYS = (
    "generator_images",
    "generator_lr",
    "generator_betas",
    "generator_batch_size",
    "ema_decay",
    "generator_init",
    "generator_lr_decay",
    "generator_final_lr",
    "generator_decay_start_images",
    "generator_decay_end_images",
)
SHARED_TRAIN_KEYS = ("weight_decay", "warmup_images", "grad_clip", "seed")


def set_fields(obj: Any, keys: tuple[str, ...]) -> dict:
    """The named fields of ``obj`` that are set (not None)."""
    return {k: getattr(obj, k) for k in keys if getattr(obj, k) is not None}


# ----------------------------------------------------------------------------- hash parts


def tokenizer_hash_parts(cfg: ExperimentConfig) -> list:
    keys = TOKENIZER_TRAIN_KEYS + SHARED_TRAIN_KEYS
    return [cfg.data, cfg.tokenizer, set_fields(cfg.train, keys)]


def extract_hash_parts(cfg: ExperimentConfig) -> list:
    ex = cfg.extract
    options = (("resize", ex.vfm_resize), ("weights", ex.vfm_weights))
    vfm = [ex.vfm, *(f"{k}={v}" for k, v in options if v)] if ex.vfm else []
    return [ex.dtype, ex.flip, *vfm]


def generator_hash_parts(cfg: ExperimentConfig) -> list:
    generator = to_dict(cfg.generator)
    if "grad_checkpointing" in generator:  # compute only: the same gradients
        generator["grad_checkpointing"] = False
    for key in ("weights", "latent_stats"):  # unset: earlier hashes stay valid
        if generator.get(key) is None:
            generator.pop(key, None)
    return [generator, set_fields(cfg.train, GENERATOR_TRAIN_KEYS + SHARED_TRAIN_KEYS)]


def sample_hash_parts(cfg: ExperimentConfig) -> list:
    sample = to_dict(dataclasses.replace(cfg.sample, batch_size=0))
    for key in ("guide_weights", "guide_generator"):  # unset: earlier hashes stay valid
        if not sample[key]:
            del sample[key]
    for key, default in (("sde_diffusion", 1.0), ("sde_last_step", 0.0)):  # likewise
        if sample[key] == default:
            del sample[key]
    return [sample]


def evaluate_hash_parts(cfg: ExperimentConfig) -> list:
    # the rule choosing real images is part of what the metrics mean (evaluate.real_images)
    rules = [evaluation.REAL_IMAGES_RULE]
    rules += ["is: adm 5k chunks"] if "is" in cfg.evaluate.metrics else []
    return [dataclasses.replace(cfg.evaluate, batch_size=0), *rules]


# ----------------------------------------------------------------------------- checks


def check_tokenizer(cfg: ExperimentConfig) -> None:
    models.check_model_configs(cfg, generator=False)
    scaling(cfg)
    models.check_published_files(cfg, "tokenizer")
    models.check_training_files(cfg)


def check_extract(cfg: ExperimentConfig) -> None:
    models.check_model_configs(cfg, generator=False)
    check_vfm_spec("extract.vfm", cfg.extract.vfm, cfg.extract.vfm_weights)
    check_diagnostics(cfg)


def check_generator(cfg: ExperimentConfig) -> None:
    models.check_model_configs(cfg, generator=True)
    scaling(cfg)
    models.check_published_files(cfg, "generator")


def check_sample(cfg: ExperimentConfig) -> None:
    models.check_model_configs(cfg, generator=True)
    models.check_guide(cfg)


def check_evaluate(cfg: ExperimentConfig) -> None:
    models.check_model_configs(cfg, generator=False)
    evaluation.check_metrics(list(cfg.evaluate.metrics))
    evaluation.check_inputs(cfg, set(cfg.evaluate.metrics))
    check_vfm_spec("evaluate.fd_vfm", cfg.evaluate.fd_vfm, cfg.evaluate.fd_vfm_weights)


def no_check(cfg: ExperimentConfig) -> None:
    return None


# ----------------------------------------------------------------------------- runs


def store_published(out: Path, sd: dict, weights: str) -> dict:
    """A training stage's artifacts for published weights: they are both the model and its
    EMA, with no curve and no images seen."""
    for name in ("model.safetensors", "ema.safetensors"):
        save_file(sd, str(out / name))
    (out / "curve.json").write_text("[]")
    info = {"nimg": 0, "weights": str(weights)}
    (out / "state.json").write_text(json.dumps(info))
    return info


def run_tokenizer(run: Run, out: Path) -> dict:
    cfg = run.cfg
    if cfg.train.tokenizer_images == 0:  # the tokenizer is tokenizer.weights as published
        if not cfg.tokenizer.weights:
            raise ConfigError("train.tokenizer_images=0 needs tokenizer.weights (no training)")
        model = models.build_tokenizer(cfg)
        return store_published(out, models.state_dict_of(model), cfg.tokenizer.weights)
    seed = listing_seed(cfg.data, cfg.train.seed)
    source = load_images(cfg.data, "train", seed=seed)
    dataset = source.dataset.select_columns(["image", "label"])
    res = cfg.data.resolution
    nbytes = None if source.rows is None else source.rows * (res * res * 3 + 8)
    info = train_stage(run, "tokenizer", dataset, nbytes, out)
    info["num_skipped"] = source.num_skipped()
    return info


def run_extract(run: Run, out: Path) -> dict:
    stats = extraction.extract(run.cfg, run.paths()["tokenizer"], out)
    return {"count": stats["count"], "num_skipped": stats["num_skipped"]}


def extract_diagnostics(run: Run, out: Path) -> dict:
    """The latent diagnostics of ``extract.diagnostics`` into ``out/diagnostics.json``."""
    return run_diagnostics(run.cfg, run.paths(), out, run.log)


def run_generator(run: Run, out: Path) -> dict:
    cfg = run.cfg
    if cfg.train.generator_images == 0:  # the generator is generator.weights as published
        return published_generator(run, out)
    stats = run.stats()
    # config errors surface here, in one line, not from inside the Ray Train workers
    with torch.device("meta"):
        try:
            models.build_generator(cfg, stats)
            repa, reg = models.repa_dim(cfg, stats) > 0, models.reg_dim(cfg, stats) > 0
        except (KeyError, ValueError) as e:
            raise ConfigError(f"generator: {e}") from None
    latents = run.stage_dir("extract")
    seed = listing_seed(cfg.data, cfg.train.seed)
    dataset = extraction.latent_dataset(latents, vfm=repa, cls=reg, seed=seed)
    nbytes = extraction.latent_nbytes(latents, vfm=repa, cls=reg)
    return train_stage(run, "generator", dataset, nbytes, out, stats)


def published_generator(run: Run, out: Path) -> dict:
    """``train.generator_images: 0``: the generator is ``generator.weights`` as published
    (loaded strictly by the family's loader)."""
    cfg = run.cfg
    if not cfg.generator.weights:
        raise ConfigError("train.generator_images=0 needs generator.weights (no training)")
    model = models.build_generator(cfg, run.stats())
    try:
        models.load_published_generator(model, cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return store_published(out, models.state_dict_of(model), cfg.generator.weights)


def run_sample(run: Run, out: Path) -> dict:
    return run_sampling(run.cfg, run.paths(), run.stats(), out)


def run_evaluate(run: Run, out: Path) -> dict:
    result = evaluation.run_evaluation(run.cfg, run.paths(), out)
    scalars = {k: v for k, v in result["metrics"].items() if not isinstance(v, list)}
    run.log("[evaluate] " + json.dumps(scalars))
    return result


def run_report(run: Run, out: Path) -> dict:
    times = {  # a published generator may have skipped the extraction
        s.name: run.done_info(s.name).get("seconds", 0.0)
        for s in TRAINING_AND_EVAL
        if run.is_done(s.name)
    }
    dirs = {s.name: run.stage_dir(s.name) for s in STAGES}
    return write_report(run.cfg, run.run_dir, dirs, times, out)


STAGES: tuple[Stage, ...] = (
    Stage(
        "tokenizer",
        "train-tokenizer",
        "train the tokenizer (Ray Train) or store its published weights",
        None,
        tokenizer_hash_parts,
        check_tokenizer,
        run_tokenizer,
    ),
    Stage(
        "extract",
        "extract",
        "encode the image set into latent shards and their statistics (Ray Data)",
        "tokenizer",
        extract_hash_parts,
        check_extract,
        run_extract,
        resumes_in_place=True,
        extras=extract_diagnostics,
    ),
    Stage(
        "generator",
        "train-generator",
        "train the diffusion transformer on the latents (Ray Train)",
        "extract",
        generator_hash_parts,
        check_generator,
        run_generator,
    ),
    Stage(
        "sample",
        "sample",
        "sample class-conditional images (Ray tasks) into samples.npz and grid.png",
        "generator",
        sample_hash_parts,
        check_sample,
        run_sample,
        resumes_in_place=True,
    ),
    Stage(
        "evaluate",
        "evaluate",
        "compute the generation and reconstruction metrics into metrics.json",
        "sample",
        evaluate_hash_parts,
        check_evaluate,
        run_evaluate,
    ),
    Stage(
        "report",
        "report",
        "write report.html / report.md with metrics, samples, reconstructions and curves",
        "evaluate",
        lambda cfg: [],
        no_check,
        run_report,
    ),
)
BY_NAME = {s.name: s for s in STAGES}
BY_VERB = {s.verb: s for s in STAGES}
NAMES = tuple(s.name for s in STAGES)
TRAINING_AND_EVAL = tuple(s for s in STAGES if s.name != "report")
