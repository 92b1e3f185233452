"""Config loading: schemas, overrides, one-line errors naming key and file."""

from pathlib import Path

import pytest
import torch

from latentforge.config import ConfigError, config_hash, from_dict, load_experiment, to_dict

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "experiments" / "quickstart.yaml"


def write(tmp_path, text, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_quickstart_loads_typed():
    cfg = load_experiment(QUICKSTART)
    assert cfg.data.name == "shapes" and cfg.data.resolution == 32
    assert cfg.tokenizer.name == "vavae" and cfg.tokenizer.vfm == "local:shapes-vit"
    assert cfg.generator.transport.path == "linear"
    assert isinstance(cfg.train.generator_batch_size, int)


def test_override_changes_value_and_type_is_converted():
    cfg = load_experiment(QUICKSTART, ["sample.cfg_scale=4", "tokenizer.latent_channels=16"])
    assert cfg.sample.cfg_scale == 4.0 and isinstance(cfg.sample.cfg_scale, float)
    assert cfg.tokenizer.latent_channels == 16


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, f"base: {QUICKSTART}\nsample: {{cfg_scal: 2.0}}\n")
    with pytest.raises(ConfigError) as e:
        load_experiment(path)
    msg = str(e.value)
    assert "sample.cfg_scal" in msg and str(path) in msg and "\n" not in msg


def test_typo_in_an_override_names_the_override_not_the_file():
    with pytest.raises(ConfigError, match=r"^override 'sample\.cfg_scal=2': sample\.cfg_scal"):
        load_experiment(QUICKSTART, ["sample.cfg_scal=2"])
    with pytest.raises(ConfigError, match=r"^override 'train\.generator_batch_size=x'"):
        load_experiment(QUICKSTART, ["train.generator_batch_size=x"])


def test_unknown_key_in_polymorphic_part(tmp_path):
    path = write(tmp_path, f"base: {QUICKSTART}\ntokenizer: {{vf_wieght: 0.5}}\n")
    with pytest.raises(ConfigError, match=r"tokenizer\.vf_wieght"):
        load_experiment(path)


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"train\.generator_batch_size"):
        load_experiment(QUICKSTART, ["train.generator_batch_size=many"])


def test_wrong_choice_names_key():
    with pytest.raises(ConfigError, match=r"generator\.transport\.path"):
        load_experiment(QUICKSTART, ["generator.transport.path=zigzag"])


def test_run_dir_uri_is_refused_not_made_a_local_directory():
    # Path("s3://b/x") would quietly become the local directory ./s3:/b/x on the driver
    with pytest.raises(ConfigError, match=r"run_dir: 's3://bucket/runs' is a URI.*/shared"):
        load_experiment(QUICKSTART, ["run_dir=s3://bucket/runs"])
    assert load_experiment(QUICKSTART, ["run_dir=/shared/runs/q"]).run_dir == "/shared/runs/q"


def test_relative_run_dir_is_refused_inside_a_ray_job_copy(tmp_path, monkeypatch):
    """`ray job submit --working-dir .` runs the entry point in an unpacked copy of the
    checkout in Ray's temp dir on the head: a relative run_dir would land there."""
    from latentforge.platform.pipeline import Pipeline
    from latentforge.platform.sweep import load_sweep

    quickstart = ROOT / "experiments" / "quickstart.yaml"
    sweep = ROOT / "experiments" / "sweeps" / "smoke.yaml"
    copy = tmp_path / "session_1/runtime_resources/working_dir_files/_ray_pkg_0123abcd"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    cfg = load_experiment(quickstart)  # loading is fine: the check is where it is resolved
    with pytest.raises(ConfigError, match=r"run_dir: 'runs/quickstart' is relative.*/shared/"):
        Pipeline(cfg)
    with pytest.raises(ConfigError, match="is relative"):
        load_sweep(sweep)
    shared = load_experiment(quickstart, [f"run_dir={tmp_path / 'shared/runs/q'}"])
    assert Pipeline(shared).run_dir == tmp_path / "shared/runs/q"
    assert load_sweep(sweep, [f"run_dir={tmp_path / 's'}"]).run_dir == tmp_path / "s"
    monkeypatch.chdir(tmp_path)  # outside a job, relative paths resolve against the cwd
    assert Pipeline(cfg).run_dir == tmp_path / "runs/quickstart"


def test_unknown_registry_name_lists_known(tmp_path):
    path = write(tmp_path, f"base: {QUICKSTART}\ntokenizer: {{name: nope}}\n")
    with pytest.raises(ConfigError, match=r"tokenizer\.name.*known: .*vavae"):
        load_experiment(path)


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_experiment("does/not/exist.yaml")


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        load_experiment(QUICKSTART, ["sample.cfg_scale"])


def test_dict_round_trip_and_hash_stability():
    cfg = load_experiment(QUICKSTART)
    again = from_dict(to_dict(cfg))
    assert again == cfg
    assert config_hash(cfg.tokenizer) == config_hash(again.tokenizer)
    other = load_experiment(QUICKSTART, ["tokenizer.vf_weight=0.5"])
    assert config_hash(other.tokenizer) != config_hash(cfg.tokenizer)


@pytest.mark.parametrize(
    "path",
    sorted(
        p
        for p in (ROOT / "experiments").rglob("*.yaml")
        if not {"sweeps", "assets", "cluster"} & set(p.parts)  # cluster/: launcher files
    ),
)
def test_every_experiment_yaml_loads(path):
    load_experiment(path)


@pytest.mark.parametrize("path", sorted((ROOT / "experiments" / "sweeps").glob("*.yaml")))
def test_every_sweep_yaml_loads(path):
    from latentforge.platform.sweep import load_sweep

    sweep = load_sweep(path)
    assert len(sweep.points()) > 1  # a grid (of search dims or variants) to sweep


@pytest.mark.parametrize("path", sorted((ROOT / "experiments" / "assets").glob("*.yaml")))
def test_every_asset_recipe_loads(path):
    from latentforge.asset_recipes import AssetConfig
    from latentforge.config import load_config

    load_config(path, AssetConfig)


@pytest.mark.parametrize(
    "override, changed",
    [
        ("train.tokenizer_batch_size=64", "tokenizer"),
        ("train.generator_batch_size=64", "generator"),
        ("sample.cfg_scale=5.0", "sample"),
        ("sample.batch_size=7", None),  # compute settings change no result
        ("generator.grad_checkpointing=true", None),
        ("ray.num_workers=4", None),
        ("train.generator_betas=[0.9,0.95]", "generator"),
        ("extract.vfm_resize=64", None),  # no extract.vfm: no VFM features to resize
        ("sample.sampler=euler_maruyama", "sample"),
        ("sample.guide_weights=/runs/small/generator/ema.safetensors", "sample"),
    ],
)
def test_stage_hashes_follow_the_stage_that_changed(override, changed):
    from latentforge.platform.pipeline import stage_hashes
    from latentforge.platform.stages import NAMES as STAGES

    base = stage_hashes(load_experiment(QUICKSTART))
    new = stage_hashes(load_experiment(QUICKSTART, [override]))
    first = STAGES.index(changed) if changed else len(STAGES)
    for i, stage in enumerate(STAGES):
        assert (base[stage] != new[stage]) == (i >= first), stage


@pytest.mark.parametrize(
    "override, message",
    [
        ("generator.config=nosuch", r"generator\.config: unknown generator config 'nosuch'"),
        ("tokenizer.config=nosuch", r"tokenizer\.config: unknown tokenizer config .*shapes-f4d4"),
        ("evaluate.metrics=[fidd]", r"evaluate\.metrics: unknown \['fidd'\]"),
        ("tokenizer.weights=/nonexistent/v.pt", r"tokenizer\.weights: .* hustvl/vavae"),
        ("tokenizer.vfm=local:nope", r"tokenizer\.vfm: 'local:nope'"),
        ("extract.vfm=hf:/nonexistent/dinov2", r"extract\.vfm: .* does not exist"),
        ("evaluate.inception_weights=/nonexistent/i.pth", r"/nonexistent/i\.pth"),
        ("sample.guide_weights=/nonexistent/g.pt", r"sample\.guide_weights: /nonexistent/g\.pt"),
        ("sample.guide_generator.config=tiny", r"sample\.guide_generator: set, but sample\.guide"),
    ],
)
def test_preflight_finds_late_stage_errors_before_anything_runs(tmp_path, override, message):
    from latentforge.platform.pipeline import Pipeline

    extra = ["evaluate.metrics=[fid]"] if "inception" in override else []
    cfg = load_experiment(QUICKSTART, [f"run_dir={tmp_path}", override, *extra])
    with pytest.raises(ConfigError, match=message):
        Pipeline(cfg).preflight()


@pytest.mark.parametrize(
    "guide, message",
    [
        (["sample.guide_generator.config=nosuch"], r"sample\.guide_generator: .*'nosuch'"),
        (["sample.guide_generator.nosuch=1"], r"sample\.guide_generator: nosuch"),
        (["sample.guide_generator.name=other"], r"sample\.guide_generator\.name: 'other'"),
        (["sample.cfg_channels=3"], r"sample\.cfg_channels: legacy"),
    ],
)
def test_autoguidance_guide_errors_name_the_key(tmp_path, guide, message):
    from latentforge.platform.pipeline import Pipeline

    weights = tmp_path / "guide.safetensors"
    weights.write_bytes(b"")
    overrides = [f"run_dir={tmp_path}", f"sample.guide_weights={weights}"]
    cfg = load_experiment(QUICKSTART, overrides + guide)
    with pytest.raises(ConfigError, match=message):
        Pipeline(cfg).preflight()


def test_guide_config_and_strict_load(tmp_path):
    """The guide is the generator's family at the size ``sample.guide_generator`` gives,
    loaded strictly: a checkpoint of another size names the mismatched keys."""
    from safetensors.torch import save_file

    from latentforge.models import build_generator, guide_config, load_guide

    cfg = load_experiment(
        QUICKSTART, ["generator.config=tiny", "sample.guide_generator.config=tiny"]
    )
    stats = {"latent_shape": [8, 8, 8]}
    assert guide_config(cfg).generator.config == "tiny"
    model = build_generator(cfg, stats)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(tmp_path / "ema.safetensors"))
    ok = load_experiment(
        QUICKSTART,
        ["generator.config=tiny", f"sample.guide_weights={tmp_path / 'ema.safetensors'}"],
    )
    guide = load_guide(ok, stats)
    assert all(torch.equal(guide.state_dict()[k], v) for k, v in sd.items())
    small = load_experiment(
        QUICKSTART,
        [
            f"sample.guide_weights={tmp_path / 'ema.safetensors'}",
            "sample.guide_generator.config=small",
        ],
    )
    with pytest.raises(ConfigError, match=r"sample\.guide_weights: .*(missing|unexpected|shapes)"):
        load_guide(small, stats)


def test_preflight_skips_stages_already_done(tmp_path):
    from latentforge.platform.pipeline import Pipeline

    cfg = load_experiment(QUICKSTART, [f"run_dir={tmp_path}", "evaluate.metrics=[fidd]"])
    p = Pipeline(cfg)
    p.stage_dir("evaluate").mkdir(parents=True)
    (p.stage_dir("evaluate") / "done.json").write_text("{}")
    p.preflight()  # the evaluate stage will not run again: its settings cannot fail it
    (p.stage_dir("evaluate") / "done.json").unlink()
    with pytest.raises(ConfigError, match="fidd"):
        p.preflight()


def test_quickstart_stage_hashes_are_stable():
    # a new optional key (unset) or a compute setting must not invalidate every cached run:
    # these are the hashes of the demo's stages since 2026-11-30 (session 6's training;
    # evaluate / report since real images are drawn across the split, session 7)
    from latentforge.platform.pipeline import stage_hashes

    assert stage_hashes(load_experiment(QUICKSTART)) == {
        "tokenizer": "37a511a89d3b",
        "extract": "878b8d57516f",
        "generator": "42aa9c599ec7",
        "sample": "a40b053687b5",
        "evaluate": "350cb247d361",
        "report": "2c2df847085d",
    }


def test_a_part_that_changes_family_does_not_inherit_the_other_familys_keys(tmp_path):
    """``base:`` and overrides merge a part key by key, unless the part's ``name`` changes:
    the base's keys belong to another family's schema and would fail as unknown keys."""
    from dataclasses import dataclass

    from latentforge.config import TokenizerConfig
    from latentforge.registry import TOKENIZERS, Entry

    @dataclass
    class PlainConfig(TokenizerConfig):
        name: str = "plain-for-merge-test"
        width: int = 3

    if "plain-for-merge-test" not in TOKENIZERS.names():
        TOKENIZERS.add(Entry("plain-for-merge-test", PlainConfig))
    smoke = ROOT / "experiments" / "smoke.yaml"  # a vavae tokenizer with vfm, vf_weight, ...
    derived = tmp_path / "derived.yaml"
    derived.write_text(f"base: {smoke}\ntokenizer: {{name: plain-for-merge-test, width: 5}}\n")
    cfg = load_experiment(derived)
    assert type(cfg.tokenizer).__name__ == "PlainConfig" and cfg.tokenizer.width == 5
    cfg = load_experiment(smoke, ["tokenizer.name=plain-for-merge-test"])
    assert cfg.tokenizer.width == 3 and cfg.data.resolution == 32  # other parts still merge
    same = load_experiment(smoke, ["tokenizer.name=vavae"])  # same family: keys merge
    assert same.tokenizer.config == "tiny"
