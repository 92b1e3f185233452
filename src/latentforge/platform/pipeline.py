"""The experiment pipeline: tokenizer -> extract -> generator -> sample -> evaluate -> report.

Each stage writes its artifacts to ``run_dir/<stage>/<hash>/`` where the hash covers the
stage's own config and its upstream stage's hash. A stage whose ``done.json`` exists is
skipped, so rerunning an experiment re-runs nothing, and changing a generator key re-runs
only the generator and what follows it. Compute settings (``ray.*``, batch sizes of
inference) are not part of any hash: they do not change results.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from latentforge.config import (
    ConfigError,
    ExperimentConfig,
    config_hash,
    resolve_run_dir,
    to_dict,
    to_yaml,
)

STAGES = ("tokenizer", "extract", "generator", "sample", "evaluate", "report")
UPSTREAM = dict(zip(STAGES[1:], STAGES[:-1], strict=True))
VERB_OF = {
    "tokenizer": "train-tokenizer",
    "extract": "extract",
    "generator": "train-generator",
    "sample": "sample",
    "evaluate": "evaluate",
    "report": "report",
}
TOKENIZER_TRAIN_KEYS = (
    "tokenizer_images",
    "tokenizer_lr",
    "tokenizer_batch_size",
    "tokenizer_betas",
)
GENERATOR_TRAIN_KEYS = (
    "generator_images",
    "generator_lr",
    "generator_betas",
    "generator_batch_size",
    "ema_decay",
    "generator_init",
)
# how evaluation picks real images (evaluate.real_images): in its cache keys and its hash
REAL_IMAGES_RULE = "real-images: hashed subset"
SHARED_TRAIN_KEYS = ("weight_decay", "warmup_images", "grad_clip", "seed")


class StageNotReady(RuntimeError):
    """A stage was asked for whose upstream artifacts do not exist yet."""


def _pick(obj, keys) -> dict:
    """The named fields; optional ones left unset (None) are omitted, so adding one keeps
    earlier stage hashes valid."""
    return {k: getattr(obj, k) for k in keys if getattr(obj, k) is not None}


def stage_hashes(cfg: ExperimentConfig) -> dict[str, str]:
    """Hash of every stage: its own config plus the hash of the stage before it."""
    train = cfg.train
    h = {}
    h["tokenizer"] = config_hash(
        "tokenizer", cfg.data, cfg.tokenizer, _pick(train, TOKENIZER_TRAIN_KEYS + SHARED_TRAIN_KEYS)
    )
    ec = cfg.extract  # absent (unset) options leave earlier hashes valid
    options = (("resize", ec.vfm_resize), ("weights", ec.vfm_weights))
    vfm = [ec.vfm, *(f"{k}={v}" for k, v in options if v)] if ec.vfm else []
    h["extract"] = config_hash("extract", h["tokenizer"], cfg.extract.dtype, cfg.extract.flip, *vfm)
    generator = to_dict(cfg.generator)
    if "grad_checkpointing" in generator:  # compute only: the same gradients
        generator["grad_checkpointing"] = False
    for key in ("weights", "latent_stats"):  # unset: earlier hashes stay valid
        if generator.get(key) is None:
            generator.pop(key, None)
    h["generator"] = config_hash(
        "generator",
        h["extract"],
        generator,
        _pick(train, GENERATOR_TRAIN_KEYS + SHARED_TRAIN_KEYS),
    )
    sample = dataclasses.replace(cfg.sample, batch_size=0)
    h["sample"] = config_hash("sample", h["generator"], sample)
    evaluate = dataclasses.replace(cfg.evaluate, batch_size=0)
    # the rule choosing real images is part of what the metrics mean (evaluate.real_images)
    rules = [REAL_IMAGES_RULE]
    rules += ["is: adm 5k chunks"] if "is" in cfg.evaluate.metrics else []
    h["evaluate"] = config_hash("evaluate", h["sample"], evaluate, *rules)
    h["report"] = config_hash("report", h["evaluate"])
    return h


class Pipeline:
    """Runs the stages of one experiment, skipping those already done."""

    def __init__(self, cfg: ExperimentConfig, log: Callable[[str], None] = print):
        self.log = log
        self.run_dir = resolve_run_dir(cfg.run_dir, "experiment")
        # absolute from here on: Ray workers resolve paths against their own cwd
        self.cfg = dataclasses.replace(cfg, run_dir=str(self.run_dir))
        self.hashes = stage_hashes(self.cfg)

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage / self.hashes[stage]

    def is_done(self, stage: str) -> bool:
        return (self.stage_dir(stage) / "done.json").exists()

    def done_info(self, stage: str) -> dict:
        return json.loads((self.stage_dir(stage) / "done.json").read_text())

    def plan(self) -> list[dict]:
        return [
            {
                "stage": s,
                "hash": self.hashes[s],
                "done": self.is_done(s),
                "dir": str(self.stage_dir(s)),
            }
            for s in STAGES
        ]

    def preflight(self, stages: tuple[str, ...] = STAGES) -> None:
        """Check what a stage would only meet after the ones before it ran, possibly for
        hours: named model configs, metric names, weights and reference files of the
        ``stages`` still to run. Raises :class:`ConfigError` naming the key."""
        cfg, todo = self.cfg, {s for s in stages if not self.is_done(s)}
        try:
            if todo - {"report"}:
                check_model_configs(cfg, generator=bool(todo & {"generator", "sample"}))
            if todo & {"tokenizer", "generator"}:
                from latentforge.platform.train import scaling

                scaling(cfg)
            if "tokenizer" in todo:
                weights = getattr(cfg.tokenizer, "weights", None)
                if weights and not Path(weights).expanduser().is_file():
                    from latentforge.tokenizers.vavae import PUBLISHED_HINT

                    hint = f" ({PUBLISHED_HINT})" if cfg.tokenizer.name == "vavae" else ""
                    raise ConfigError(f"tokenizer.weights: {weights} does not exist{hint}")
                check_vfm(
                    "tokenizer.vfm",
                    getattr(cfg.tokenizer, "vfm", None),
                    getattr(cfg.tokenizer, "vfm_weights", None),
                )
            if "extract" in todo:
                check_vfm("extract.vfm", cfg.extract.vfm, cfg.extract.vfm_weights)
            if "generator" in todo:
                for key in ("weights", "latent_stats"):
                    file = getattr(cfg.generator, key, None)
                    if file and not Path(file).expanduser().is_file():
                        from latentforge.generators.lightningdit import PUBLISHED_GENERATOR_HINT

                        raise ConfigError(
                            f"generator.{key}: {file} does not exist ({PUBLISHED_GENERATOR_HINT})"
                        )
            if "evaluate" in todo:
                from latentforge.platform.evaluate import check_inputs, check_metrics

                check_metrics(list(cfg.evaluate.metrics))
                check_inputs(cfg, set(cfg.evaluate.metrics))
                check_vfm("evaluate.fd_vfm", cfg.evaluate.fd_vfm, cfg.evaluate.fd_vfm_weights)
        except (KeyError, ValueError, FileNotFoundError) as e:
            if isinstance(e, ConfigError):
                raise
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            raise ConfigError(msg) from None

    def save_config(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))

    def run(self, stages: tuple[str, ...] = STAGES, upstream: bool = False) -> dict:
        """Run ``stages`` in order. With ``upstream``, missing earlier stages run too."""
        self.preflight(STAGES if upstream else tuple(stages))
        self.save_config()
        wanted = list(stages)
        if upstream:
            first = min(STAGES.index(s) for s in stages)
            wanted = sorted(set(wanted) | set(STAGES[:first]), key=STAGES.index)
        if self.published_generator() and "generator" in wanted and not self.is_done("extract"):
            # a published generator with its own latent statistics samples without latents
            self.log("[extract] not needed: generator.weights with generator.latent_stats")
            wanted = [s for s in wanted if s != "extract"]
        for stage in wanted:
            self.run_stage(stage)
        return {s: self.done_info(s) for s in wanted}

    def published_generator(self) -> bool:
        """``train.generator_images: 0`` with ``generator.weights`` and
        ``generator.latent_stats``: the generator stage needs no extracted latents."""
        g = self.cfg.generator
        return self.cfg.train.generator_images == 0 and bool(
            getattr(g, "weights", None) and getattr(g, "latent_stats", None)
        )

    def run_stage(self, stage: str) -> dict:
        if self.is_done(stage):
            self.log(f"[{stage}] cached: {self.stage_dir(stage)}")
            return self.done_info(stage)
        before = UPSTREAM.get(stage)
        if stage == "generator" and self.published_generator():
            before = "tokenizer"  # its latent shape; the statistics come with the weights
        if before and not self.is_done(before):
            raise StageNotReady(
                f"{stage} needs the {before} stage's artifacts ({self.stage_dir(before)}); "
                f"run `latentforge {VERB_OF[before]}` (or `latentforge run`) first"
            )
        out = self.stage_dir(stage)
        if out.exists() and stage not in ("extract", "sample"):
            # a stage that did not finish: training resumes from Ray storage; extraction
            # and sampling resume from their finished shards / chunks in place
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(self.cfg))
        self.log(f"[{stage}] running -> {out}")
        t0 = time.time()
        info = getattr(self, f"_{stage}")(out) or {}
        info.update({"stage": stage, "hash": self.hashes[stage], "seconds": time.time() - t0})
        tmp = out / "done.json.tmp"
        tmp.write_text(json.dumps(info, indent=1))
        os.replace(tmp, out / "done.json")
        self.log(f"[{stage}] done in {info['seconds']:.1f} s")
        return info

    # ----------------------------------------------------------------- stages

    def paths(self) -> dict[str, str]:
        return {
            "tokenizer": str(self.stage_dir("tokenizer") / "model.safetensors"),
            "latents": str(self.stage_dir("extract")),
            "generator": str(self.stage_dir("generator") / "ema.safetensors"),
            "samples": str(self.stage_dir("sample")),
            "metrics": str(self.stage_dir("evaluate") / "metrics.json"),
        }

    def stats(self) -> dict:
        """The latent statistics: the extraction's, with ``generator.latent_stats`` (the
        normalisation published weights were trained with) replacing mean / std; a
        published generator with its statistics needs no extraction (shape from config)."""
        path = self.stage_dir("extract") / "stats.json"
        if path.exists():
            stats = json.loads(path.read_text())
        elif self.published_generator():
            stats = {"latent_shape": list(latent_shape_of(self.cfg))}
        else:
            raise StageNotReady(f"no latent statistics yet: {path} (run `latentforge extract`)")
        file = getattr(self.cfg.generator, "latent_stats", None)
        if file:
            from latentforge.generators.lightningdit import read_latent_stats

            stats.update(read_latent_stats(file, stats["latent_shape"][0]))
            stats["stats_source"] = str(file)
        return stats

    def _train(self, kind: str, dataset, out: Path, stats: dict | None = None) -> dict:
        from latentforge.platform.train import run_trainer

        ckpt = run_trainer(self.cfg, kind, f"{kind}-{self.hashes[kind]}", dataset, stats)
        with ckpt.as_directory() as d:
            for name in ("model.safetensors", "ema.safetensors", "curve.json", "state.json"):
                shutil.copy(Path(d, name), out / name)
            if Path(d, "discriminator.safetensors").exists():  # for a next GAN stage
                shutil.copy(Path(d, "discriminator.safetensors"), out / "discriminator.safetensors")
        info = json.loads((out / "state.json").read_text())
        info["checkpoint"] = ckpt.path  # the full training state, for train.generator_init
        return info

    def training_data(self, kind: str, dataset, nbytes: int | None):
        """``dataset`` ready for ``kind``'s trainer: ordered for training and materialised,
        or left to stream, as ``ray.training_data`` decides; returns it and the mode."""
        import ray

        from latentforge.platform.data import training_data_mode, training_rows

        rc = self.cfg.ray
        total = ray.cluster_resources()
        store = total.get("object_store_memory", 0)
        mode = training_data_mode(rc.training_data, nbytes, store, latents=kind == "generator")
        size = "size unknown" if nbytes is None else f"~{nbytes / 2**30:.2f} GiB"
        self.log(f"[{kind}] training data: {mode} ({size}; object store {store / 2**30:.1f} GiB)")
        if mode == "stream" and total.get("CPU", 0) - rc.num_workers * rc.cpus_per_worker < 1:
            self.log(
                f"[{kind}] streaming reads need a CPU beyond the Train workers': none is free "
                "now (an autoscaling cluster adds a node; on a fixed one lower "
                "ray.num_workers or ray.cpus_per_worker, or set ray.training_data=memory)"
            )
        rows = training_rows(dataset, self.cfg.data, self.cfg.train.seed, mode == "stream")
        if mode == "stream":
            return rows, mode
        # blocks in read order: Ray Data otherwise keeps them in the order its (threaded)
        # reads finish, and a rerun of the stage would train on a different order
        rows.context.execution_options.preserve_order = True
        return rows.materialize(), mode

    def _tokenizer(self, out: Path) -> dict:
        from latentforge.platform.data import listing_seed, load_images

        if self.cfg.train.tokenizer_images == 0:
            return self._published_tokenizer(out)
        seed = listing_seed(self.cfg.data, self.cfg.train.seed)
        source = load_images(self.cfg.data, "train", seed=seed)
        dataset = source.dataset.select_columns(["image", "label"])
        res = self.cfg.data.resolution
        nbytes = None if source.rows is None else source.rows * (res * res * 3 + 8)
        dataset, mode = self.training_data("tokenizer", dataset, nbytes)
        info = self._train("tokenizer", dataset, out)
        info["num_skipped"] = source.num_skipped()
        info["training_data"] = mode
        return info

    def _published_tokenizer(self, out: Path) -> dict:
        """``train.tokenizer_images: 0``: the tokenizer is ``tokenizer.weights`` as published."""

        from latentforge.platform.train import build_tokenizer, state_dict_of

        weights = getattr(self.cfg.tokenizer, "weights", None)
        if not weights:
            raise ConfigError("train.tokenizer_images=0 needs tokenizer.weights (no training)")
        return store_published(out, state_dict_of(build_tokenizer(self.cfg)), weights)

    def _extract(self, out: Path) -> dict:
        from latentforge.platform.extract import extract

        stats = extract(self.cfg, self.paths()["tokenizer"], out)
        return {"count": stats["count"], "num_skipped": stats["num_skipped"]}

    def _generator(self, out: Path) -> dict:
        import torch

        from latentforge.platform.data import listing_seed
        from latentforge.platform.extract import latent_dataset, latent_nbytes
        from latentforge.platform.train import build_generator, reg_dim, repa_dim

        if self.cfg.train.generator_images == 0:
            return self._published_generator(out)
        stats = self.stats()
        # config errors surface here, in one line, not from inside the Ray Train workers
        with torch.device("meta"):
            try:
                build_generator(self.cfg, stats)
                repa, reg = repa_dim(self.cfg, stats) > 0, reg_dim(self.cfg, stats) > 0
            except (KeyError, ValueError) as e:
                raise ConfigError(f"generator: {e}") from None
        latents = self.stage_dir("extract")
        seed = listing_seed(self.cfg.data, self.cfg.train.seed)
        dataset = latent_dataset(latents, vfm=repa, cls=reg, seed=seed)
        nbytes = latent_nbytes(latents, vfm=repa, cls=reg)
        dataset, mode = self.training_data("generator", dataset, nbytes)
        return {**self._train("generator", dataset, out, stats), "training_data": mode}

    def _published_generator(self, out: Path) -> dict:
        """``train.generator_images: 0``: the generator is ``generator.weights`` as
        published (official LightningDiT / DiT layouts load strictly)."""

        from latentforge.generators.lightningdit import load_published
        from latentforge.platform.train import build_generator, state_dict_of

        weights = getattr(self.cfg.generator, "weights", None)
        if not weights:
            raise ConfigError("train.generator_images=0 needs generator.weights (no training)")
        model = build_generator(self.cfg, self.stats())
        try:
            load_published(model, weights)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return store_published(out, state_dict_of(model), weights)

    def _sample(self, out: Path) -> dict:
        from latentforge.platform.sample import run_sampling

        return run_sampling(self.cfg, self.paths(), self.stats(), out)

    def _evaluate(self, out: Path) -> dict:
        from latentforge.platform.evaluate import run_evaluation

        result = run_evaluation(self.cfg, self.paths(), out)
        self.log(
            "[evaluate] "
            + json.dumps({k: v for k, v in result["metrics"].items() if not isinstance(v, list)})
        )
        return result

    def _report(self, out: Path) -> dict:
        from latentforge.platform.report import write_report

        return write_report(self, out)


def store_published(out: Path, sd: dict, weights: str) -> dict:
    """A training stage's artifacts for published weights: they are both the model and its
    EMA, with no curve and no images seen."""
    from safetensors.torch import save_file

    for name in ("model.safetensors", "ema.safetensors"):
        save_file(sd, str(out / name))
    (out / "curve.json").write_text("[]")
    info = {"nimg": 0, "weights": str(weights)}
    (out / "state.json").write_text(json.dumps(info))
    return info


def latent_shape_of(cfg: ExperimentConfig) -> tuple[int, ...]:
    """(C, H, W) of the configured tokenizer's latents at ``data.resolution``."""
    from latentforge.tokenizers import vavae

    if not isinstance(cfg.tokenizer, vavae.VAVAEConfig):
        raise ConfigError(f"tokenizer {cfg.tokenizer.name}: latent shape needs the extraction")
    arch = vavae.resolve_arch(cfg.tokenizer)
    res = cfg.data.resolution
    if res % arch.downsample:
        raise ConfigError(f"data.resolution {res} is not divisible by {arch.downsample}")
    return (arch.z_channels, res // arch.downsample, res // arch.downsample)


def check_model_configs(cfg: ExperimentConfig, generator: bool) -> None:
    """The tokenizer's (and generator's) named configs exist (KeyError listing the known)."""
    from latentforge.generators import lightningdit
    from latentforge.tokenizers import vavae

    try:
        if isinstance(cfg.tokenizer, vavae.VAVAEConfig):
            vavae.resolve_arch(cfg.tokenizer)
    except KeyError as e:
        raise ConfigError(f"tokenizer.config: {e.args[0]}") from None
    try:
        if generator and isinstance(cfg.generator, lightningdit.LightningDiTConfig):
            lightningdit.resolve_arch(cfg.generator)
    except KeyError as e:
        raise ConfigError(f"generator.config: {e.args[0]}") from None


def check_vfm(key: str, spec: str | None, weights: str | None) -> None:
    """A VFM spec's local files exist: a ``local:`` asset, an ``hf:`` directory given as a
    path, an explicit weights file (hub caches are checked when the VFM loads)."""
    if not spec:
        return
    if weights and not Path(weights).expanduser().is_file():
        raise ConfigError(f"{key}_weights: {weights} does not exist")
    kind, _, name = spec.partition(":")
    if kind == "local":
        from latentforge.tokenizers.vfm import local_asset

        path = local_asset(name)
        if not path.is_file():
            raise ConfigError(f"{key}: {spec!r}: {path} does not exist")
    elif kind == "hf" and name.startswith(("/", ".", "~")) and not Path(name).expanduser().is_dir():
        raise ConfigError(f"{key}: {spec!r}: directory {name} does not exist")
    elif kind not in ("local", "hf", "timm"):
        raise ConfigError(f"{key}: {spec!r}: expected local:<asset>, timm:<model> or hf:<repo>")


def connect(cfg: ExperimentConfig) -> None:
    """Attach to the configured or ambient Ray cluster, or start a local one."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init()  # with the dashboard: Train V2 queries the State API it serves
