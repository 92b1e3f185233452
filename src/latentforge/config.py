"""Typed experiment configs: dataclass schemas, YAML values, CLI overrides.

``load_experiment(path, overrides)`` merges ``OmegaConf.structured(schema)``, the YAML
file (following ``base:`` chains) and ``key=value`` overrides. An unknown key or a value
of the wrong type fails at load with a one-line :class:`ConfigError` naming the key and
the file. Polymorphic parts (``data``, ``tokenizer``, ``generator``) are resolved through
the registry by their ``name``. Defaults live only in the dataclasses below (or in the
registered part's own dataclass).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from latentforge.metrics.table import DiagnosticGroup
from latentforge.registry import DATASETS, GENERATORS, TOKENIZERS, Registry, load_plugins


class ConfigError(ValueError):
    """A config file or override that does not fit its schema."""


# a timestep shift: a number, or ``auto``: RAE's dimension-dependent shift, derived from the
# latent shape when the transport / sampler is built (generators/transport.py resolve_shift)
Shift = float | int | Literal["auto"]


# ----------------------------------------------------------------- base schemas per kind
# A family's schema derives from its kind's base (``class VAVAEConfig(TokenizerConfig)``)
# and registers it (:mod:`latentforge.registry`); the platform reads only these fields.


@dataclass
class DataConfig:
    """What every data source has."""

    name: str = ""
    resolution: int = 256
    num_classes: int | None = None  # classes of the labels (None: as the source says)


@dataclass
class TokenizerConfig:
    """What every tokenizer family has."""

    name: str = ""
    config: str = ""  # key of the family's named configs
    # published weights to start from (or, with train.tokenizer_images=0, to use as they are)
    weights: str | None = None


@dataclass
class TransportConfig:
    """How the backbone is trained and read: path, prediction target, time sampling."""

    path: Literal["linear", "gvp", "vp"] = "linear"
    prediction: Literal["velocity", "noise", "score"] = "velocity"
    t_sampling: Literal["uniform", "lognorm"] = "lognorm"
    lognorm_mean: float = 0.0
    lognorm_std: float = 1.0
    train_shift: Shift = 1.0  # shift of training times (1 = none; auto); see shift_t
    cos_loss_weight: float = 1.0  # velocity-direction loss (LightningDiT); 0 disables
    # keep training t in [eps, 1 - eps]; 0: the path's safe default (SiT's): 1e-5 on vp,
    # 1e-3 for noise / score prediction on linear / gvp (alpha(0) = 0), else none
    train_eps: float = 0.0
    # REPA (Yu et al. 2025, "Representation Alignment for Generation"): weight of
    # -cos(projector(h_k), VFM patch features) on the clean image; 0 disables (REPA: 0.5)
    repa_weight: float = 0.0
    # REG (Wu et al. 2025, "Representation Entanglement for Generation"): the VFM class token
    # is generated jointly as one extra noised token; weight of its velocity loss (REG: 0.03)
    reg_weight: float = 0.0


@dataclass
class GeneratorConfig:
    """What every generator family has."""

    name: str = ""
    config: str = ""  # key of the family's named configs
    transport: TransportConfig = field(default_factory=TransportConfig)
    # a published checkpoint, loaded strictly; with train.generator_images: 0 it is the
    # generator
    weights: str | None = None
    # the latent normalisation the weights were trained with, replacing the extracted
    # statistics (:func:`latentforge.models.read_latent_stats`)
    latent_stats: str | None = None


@dataclass
class TrainConfig:
    """Durations are in images seen (edm2's ``nimg``), so batch size may change freely."""

    tokenizer_images: float = 2.0e5
    generator_images: float = 6.0e5
    tokenizer_batch_size: int = 128  # global, split over Ray Train workers
    generator_batch_size: int = 128
    tokenizer_lr: float = 2.0e-4
    tokenizer_betas: list[float] = field(default_factory=lambda: [0.9, 0.99])  # its AdamW betas
    generator_lr: float = 1.0e-3
    generator_betas: list[float] | None = None  # its AdamW betas; unset: (0.9, 0.99)
    weight_decay: float = 0.0
    warmup_images: float = 1.0e4
    # learning-rate decay after the warm-up, to *_final_lr at the end of training (unset:
    # constant, as VA-VAE and LightningDiT train); RAE's decoder decays by cosine to 2e-5,
    # its DiT^DH linearly (training/loop.py lr_at)
    tokenizer_lr_decay: Literal["linear", "cosine"] | None = None
    tokenizer_final_lr: float | None = None
    generator_lr_decay: Literal["linear", "cosine"] | None = None
    generator_final_lr: float | None = None
    # images the generator's decay starts at (unset: the warm-up's end; RAE's DiT^DH holds
    # its lr for 40 epochs) and ends at (unset: generator_images; the sweep's ASHA rungs set
    # it to the full budget, so that each rung continues one schedule)
    generator_decay_start_images: float | None = None
    generator_decay_end_images: float | None = None
    grad_clip: float = 1.0
    grad_accum: int = 1  # micro-batches per optimizer step (batch sizes stay global)
    compile: str | None = None  # torch.compile backend for the training step ("inductor")
    ema_decay: float = 0.999
    log_every_images: float = 1.0e4
    checkpoint_every_images: float = 5.0e4
    seed: int = 0
    # continue the generator from a training checkpoint directory (weights, EMA, optimizer,
    # images seen) instead of from scratch, e.g. a shorter run of the same config: the
    # sweep's ASHA rungs do this. Ignored once the run has a checkpoint of its own.
    generator_init: str | None = None


@dataclass
class DiagnosticsConfig:
    """Latent diagnostics computed after extraction into ``diagnostics.json`` beside
    ``stats.json`` (metrics/diagnostics.py; platform/diagnose.py). In no stage hash: they
    change no stage's output, and a missing or partial file is completed on the next run."""

    # which to compute; [] turns them off (names: the metric table's DiagnosticGroup)
    metrics: list[DiagnosticGroup] = field(default_factory=lambda: list(get_args(DiagnosticGroup)))
    # stored latents read (spread over the shards, seeded): the linear probe's fit and test
    # sets and the effective dimension's spectrum
    num_latents: int = 5120
    probe_test: int = 1024  # of them, held out to score the probe
    probe_ridge: float = 1.0e-3  # the probe's ridge penalty (per sample, on normalised latents)
    num_images: int = 256  # held-out images for robustness and SE-CKNNA
    noise: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5])  # robustness sigmas
    seed: int = 0


@dataclass
class ExtractConfig:
    """Latent extraction (platform/extract.py); shards depend on source ids only."""

    batch_size: int = 256  # encoder batch; every batch runs at this shape (padded)
    shard_rows: int = 4096  # images per shard: shard k holds source ids [k*S, (k+1)*S)
    # bfloat16: rounded to bf16 and stored as float32 (Parquet has no bf16 type)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    actors: int = 1  # Ray Data actor-pool size for the encoder
    flip: bool = True  # also store the latent of the mirrored image (``latent_flip``)
    # a VFM (tokenizers/vfm.py spec) whose last-layer patch features are stored next to each
    # latent (column ``vfm``, float16 (D, h, w)), for REPA (generator.transport.repa_weight)
    vfm: str | None = None
    vfm_resize: int | None = None  # its input size (None: the VFM's own; REPA: 224 at 256 px)
    vfm_weights: str | None = None  # explicit weights file for a timm: VFM
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)


@dataclass
class SampleConfig:
    num_images: int = 1000
    steps: int = 50
    # dopri5: adaptive (torchdiffeq); euler_maruyama: SDE, per-sample noise from the seeds
    sampler: Literal["euler", "heun", "dopri5", "euler_maruyama"] = "euler"
    cfg_scale: float = 3.0
    cfg_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])
    cfg_channels: int | None = None  # None = all channels; 3 reproduces DiT/LightningDiT
    timestep_shift: Shift = 1.0  # shift of the time grid (1 = none; auto); see shift_t
    # euler_maruyama: diffusion w(t) = sde_diffusion * sigma(t) (SiT / MAETok: 2), and a last,
    # noise-free step of this length (SiT's last_step_size: 0.04; 0 = uniform steps)
    sde_diffusion: float = 1.0
    sde_last_step: float = 0.0
    batch_size: int = 256  # a multiple of 16 (the sampler's fixed micro-batch)
    seed: int = 0
    grid_images: int = 100  # images in the report's sample grid (class-sorted)
    # autoguidance (Karras et al. 2024): a weaker generator checkpoint (ours or published)
    # replaces the unconditional pass; cfg_scale is its weight, cfg_interval applies
    guide_weights: str | None = None
    # the guide's architecture as overrides of the generator config (same family), e.g.
    # {config: DiTDH-S}; empty: the generator's own (an earlier or shorter-trained checkpoint)
    guide_generator: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvaluateConfig:
    metrics: list[str] = field(
        default_factory=lambda: ["fd_shapesnet", "class_accuracy", "rfd_shapesnet", "psnr"]
    )
    num_real: int = 2000  # reference images for Fréchet distances
    num_recon: int = 500  # held-out images for reconstruction metrics
    batch_size: int = 250
    inception_weights: str | None = None  # FID: local InceptionV3 file (else torch hub cache)
    fid_reference: str | None = None  # FID: an ADM reference batch .npz (else real images)
    fd_vfm: str = "local:shapes-vit"  # fd_vfm's and se_cknna's VFM (tokenizers/vfm.py spec)
    fd_vfm_weights: str | None = None  # fd_vfm: weights file of a timm: VFM (else hub cache)
    lpips_net: Literal["alex", "vgg"] = "alex"  # lpips' backbone (torchvision ImageNet weights)
    kid_subset_size: int = 1000  # KID: subset size (clamped to the smaller set)
    kid_subsets: int = 100


@dataclass
class RayConfig:
    address: str | None = None  # None: connect to a running cluster or start a local one
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 1
    # GPU type of the Ray Train workers (ScalingConfig.accelerator_type, e.g. "A100"): keeps
    # training off a cluster's smaller GPUs; extraction, sampling and evaluation take any GPU
    accelerator_type: str | None = None
    # how training stages hold their data (platform/data.py training_data_mode): "memory"
    # (materialised in the object store), "stream" (read anew each epoch) or "auto" (memory
    # when it fits in a quarter of the object store, else stream); not part of stage hashes
    training_data: Literal["auto", "memory", "stream"] = "auto"


@dataclass
class ExperimentConfig:
    """One experiment: data -> tokenizer -> latents -> generator -> samples -> metrics."""

    run_dir: str = "runs/default"
    # modules or .py files that register further families (registry.load_plugins), imported
    # before the parts below are resolved
    plugins: list[str] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    ray: RayConfig = field(default_factory=RayConfig)


POLYMORPHIC: dict[str, tuple[Registry, str]] = {
    "data": (DATASETS, "shapes"),
    "tokenizer": (TOKENIZERS, "vavae"),
    "generator": (GENERATORS, "lightningdit"),
}


def read_mapping(path: str | Path) -> DictConfig:
    """One YAML file whose top level is a mapping, or a one-line :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError and friends: one line, naming the file
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: top level must be a mapping")
    return node


def read_yaml(path: str | Path) -> DictConfig:
    """Read an experiment YAML file, following ``base: relative/or/absolute.yaml`` chains."""
    path = Path(path)
    node = read_mapping(path)
    base = node.pop("base", None)
    if base is not None:
        node = merge_nodes(read_yaml((path.parent / str(base)).resolve()), node)
    return node


def merge_nodes(base: DictConfig, child: DictConfig) -> DictConfig:
    """``child`` over ``base``; a polymorphic part whose ``name`` the child changes starts
    afresh (the base's keys belong to another family's schema)."""
    base = base.copy()
    for key, (_, default) in POLYMORPHIC.items():
        sub, old = child.get(key), base.get(key)
        if not isinstance(sub, DictConfig) or not isinstance(old, DictConfig):
            continue
        if "name" in sub and sub.get("name") != old.get("name", default):
            base.pop(key)
    return OmegaConf.merge(base, child)


def _schema_error(e: OmegaConfBaseException, source: str, prefix: str = "") -> ConfigError:
    key = getattr(e, "full_key", None) or ""
    key = f"{prefix}.{key}" if prefix and key else (prefix or key)
    msg = str(e).splitlines()[0]
    return ConfigError(f"{source}: {key}: {msg}" if key else f"{source}: {msg}")


def merge_schema(schema: type, values: Any, source: str, prefix: str = "") -> Any:
    """Merge ``values`` into the dataclass ``schema``; return a dataclass instance."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), values)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise _schema_error(e, source, prefix) from None


def load_config(path: str | Path, schema: type, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Load a non-polymorphic config (asset recipes, sweeps) into ``schema``."""
    node = read_yaml(path)
    node = apply_overrides(node, overrides, path)
    return merge_schema(schema, node, str(path))


def apply_overrides(node: DictConfig, overrides, source) -> DictConfig:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
    try:
        return merge_nodes(node, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise _schema_error(e, f"{source} (overrides)") from None


def experiment_from_node(node: DictConfig, source: str) -> ExperimentConfig:
    """Resolve polymorphic parts through the registry and type-check everything."""
    node = node.copy()
    try:
        load_plugins([str(p) for p in node.get("plugins", None) or []])
    except (ImportError, OSError, SyntaxError) as e:
        raise ConfigError(f"{source}: plugins: {e}") from None
    parts: dict[str, Any] = {}
    for key, (registry, default) in POLYMORPHIC.items():
        sub = node.pop(key, None)
        sub = OmegaConf.create({}) if sub is None else sub
        name = sub.get("name", default) if isinstance(sub, DictConfig) else None
        if name is None:
            raise ConfigError(f"{source}: {key}: must be a mapping with a 'name'")
        try:
            schema = registry.get(str(name)).config_cls
        except KeyError as e:
            raise ConfigError(f"{source}: {key}.name: {e.args[0]}") from None
        parts[key] = merge_schema(schema, sub, source, key)
    rest = merge_schema(ExperimentConfig, node, source)
    if URI.match(rest.run_dir):
        raise ConfigError(
            f"{source}: run_dir: {rest.run_dir!r} is a URI; run_dir must be a filesystem path, "
            "on a cluster one that every node mounts at the same place (cluster.yaml mounts "
            "a shared filesystem at /shared: run_dir=/shared/runs/<name>). Cloud URIs are "
            "read as data.path."
        )
    for model in ("tokenizer", "generator"):
        if getattr(rest.train, f"{model}_final_lr") is not None and not getattr(
            rest.train, f"{model}_lr_decay"
        ):
            raise ConfigError(
                f"{source}: train.{model}_final_lr: set without train.{model}_lr_decay "
                "(linear or cosine); the learning rate is otherwise constant"
            )
    return dataclasses.replace(rest, **parts)


URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
RAY_JOB_COPY = "/runtime_resources/working_dir_files/"  # where `ray job submit` unpacks code


def resolve_run_dir(run_dir: str, source: str) -> Path:
    """``run_dir`` as an absolute path. A relative one is refused inside a Ray job's unpacked
    copy of the checkout (``--working-dir``): it would resolve into Ray's temp dir on the
    head, which the workers do not see and the next job (another copy) does not find."""
    cwd = os.getcwd()
    if not Path(run_dir).is_absolute() and RAY_JOB_COPY in cwd + "/":
        raise ConfigError(
            f"{source}: run_dir: {run_dir!r} is relative, and this job runs in Ray's unpacked "
            f"copy of the checkout ({cwd}), which only the head has and the next job will not "
            "reuse: give an absolute path that every node mounts, e.g. "
            f"run_dir=/shared/{run_dir.strip('./') or 'runs'} (cluster.yaml mounts /shared)"
        )
    return Path(run_dir).resolve()


def load_experiment(
    path: str | Path, overrides: list[str] | tuple[str, ...] = ()
) -> ExperimentConfig:
    """Load ``path`` with ``key=value`` overrides into a typed :class:`ExperimentConfig`."""
    node = apply_overrides(read_yaml(path), overrides, path)
    try:
        return experiment_from_node(node, str(path))
    except ConfigError as e:
        raise _blame_override(e, str(path), overrides) from None


def _blame_override(error: ConfigError, source: str, overrides) -> ConfigError:
    """``error`` (``"<source>: <key>: ..."``) charged to the override that set ``key``,
    when one did: the file is not where the typo is."""
    text = str(error)
    if not text.startswith(f"{source}: "):
        return error
    key, _, msg = text[len(source) + 2 :].partition(": ")
    for item in overrides:
        name = item.split("=", 1)[0]
        if key == name or key.startswith((name + ".", name + "[")) or name.startswith(key + "."):
            return ConfigError(f"override {item!r}: {key}: {msg}")
    return error


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def from_dict(values: dict, source: str = "<dict>") -> ExperimentConfig:
    """Rebuild a typed experiment from :func:`to_dict` output (the Ray boundary)."""
    return experiment_from_node(OmegaConf.create(values), source)


def config_hash(*parts: Any) -> str:
    """Stable short hash of config parts (dataclasses, dicts, strings)."""
    norm = [to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts]
    blob = json.dumps(norm, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
