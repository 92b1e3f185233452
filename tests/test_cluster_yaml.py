"""The cluster-launcher files pass Ray's own launcher validation, offline (no cloud calls).

cluster.yaml (AWS) and every YAML under experiments/cluster/ (other providers) are merged
with the provider's defaults exactly as `ray up` does (`prepare_config`), then checked
against ray/autoscaler/ray-schema.json (`validate_config`). Checks on the merged config
matter: a key left out of the file comes back from Ray's defaults (which, for instance,
bind the dashboard to 0.0.0.0).
"""

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_FILES = [ROOT / "cluster.yaml", *sorted((ROOT / "experiments" / "cluster").glob("*.yaml"))]


def prepared(path: Path) -> dict:
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(yaml.safe_load(path.read_text()))


@pytest.fixture(params=CLUSTER_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def cfg(request) -> dict:
    return prepared(request.param)


def test_validates_against_rays_schema(cfg):
    from ray.autoscaler._private.util import validate_config

    validate_config(cfg)


def test_cpu_head_and_autoscaling_workers(cfg):
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    workers = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert workers and all(t["min_workers"] == 0 < t["max_workers"] for t in workers)


def test_dashboard_binds_to_localhost_only(cfg):
    start = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert "0.0.0.0" not in start
    assert re.search(r"ray start --head\b", start)
    assert re.search(r"--dashboard-host[= ]127\.0\.0\.1\b", start)


def test_setup_installs_latentforge_from_the_synced_checkout(cfg):
    # `prepare_config` has prepended the common setup_commands to the head's and workers'.
    mounts = [remote for remote, local in cfg["file_mounts"].items() if local in (".", "./")]
    assert len(mounts) == 1, cfg["file_mounts"]
    install = re.compile(rf"pip install\b.*\s{re.escape(mounts[0])}/?(\s|$)")
    per_type = [
        t.get("worker_setup_commands", cfg["worker_setup_commands"])
        for name, t in cfg["available_node_types"].items()
        if name != cfg["head_node_type"]
    ]
    for commands in [cfg["head_setup_commands"], *per_type]:
        assert any(install.search(c) for c in commands), commands
    assert ".git" in cfg["rsync_exclude"] and ".venv" in cfg["rsync_exclude"]


def test_every_node_mounts_the_shared_run_dir(cfg, request):
    # run_dir must be one path that every node sees: each node type's host mounts the shared
    # file system (a node type's own initialization_commands replace the common ones) and
    # docker binds it into the container at the same path, where the files' run_dir lives.
    binds = [o.split()[1] for o in cfg["docker"]["run_options"] if o.startswith("-v ")]
    shared = {b.split(":")[0] for b in binds if b.split(":")[0] == b.split(":")[1]}
    assert len(shared) == 1, binds
    (path,) = shared
    mount = re.compile(rf"mountpoint -q {path} \|\| sudo mount -t nfs4? .* {path}$")
    for name, t in cfg["available_node_types"].items():
        commands = t.get("initialization_commands", cfg["initialization_commands"])
        assert any(mount.search(c) for c in commands), (name, commands)
    header = Path(request.node.callspec.params["cfg"]).read_text()
    run_dirs = re.findall(r"run_dir=(\S+)", header)
    assert run_dirs and all(d.startswith(f"{path}/") for d in run_dirs), run_dirs
    # the weights caches too: a VFM or LPIPS file cached on one node is found on all
    env = dict(
        o.split()[1].split("=", 1) for o in cfg["docker"]["run_options"] if o.startswith("-e ")
    )
    assert env["HF_HOME"].startswith(f"{path}/") and env["TORCH_HOME"].startswith(f"{path}/")


# GPUs and Ray's accelerator type of each instance type the files use
GPUS = {
    "p4d.24xlarge": (8, "A100"),
    "g5.2xlarge": (1, "A10G"),
    "a2-highgpu-8g": (8, "A100"),
    "g2-standard-8": (1, "L4"),
}


def instance(t: dict) -> str:
    return t["node_config"].get("InstanceType") or t["node_config"].get("machineType")


def max_gpus(cfg: dict, accelerator: str | None = None) -> int:
    """The most GPUs (of ``accelerator``, if given) the autoscaler can bring up: the largest
    nodes first, within each type's and the cluster's ``max_workers``."""
    per_type = []
    for t in cfg["available_node_types"].values():
        n, kind = GPUS.get(instance(t), (0, None))
        per_type += [n if accelerator in (None, kind) else 0] * t["max_workers"]
    return sum(sorted(per_type, reverse=True)[: cfg["max_workers"]])


def ray_section(experiment: Path) -> dict:
    return (yaml.safe_load(experiment.read_text()) or {}).get("ray") or {}


GPU_EXPERIMENTS = [
    p for p in sorted((ROOT / "experiments").rglob("*.yaml")) if ray_section(p).get("use_gpu")
]


def test_the_imagenet_experiments_are_gpu_experiments():
    assert {p.parent.name for p in GPU_EXPERIMENTS} == {"imagenet256"}
    assert len(GPU_EXPERIMENTS) >= 2


@pytest.mark.parametrize("experiment", GPU_EXPERIMENTS, ids=lambda p: p.name)
def test_gpu_experiments_fit_the_cluster_files(experiment):
    """A Train job asking for more GPU workers (of its accelerator type) than the cluster can
    start waits for its placement group forever (Ray Train retries it)."""
    ray_cfg = ray_section(experiment)
    for path in CLUSTER_FILES:
        capacity = max_gpus(prepared(path), ray_cfg.get("accelerator_type"))
        assert ray_cfg["num_workers"] <= capacity, (experiment, path)


def test_gcp_states_what_its_gpu_nodes_have():
    """GCP's launcher detects no CPUs or GPUs (only TPUs): a GPU node type whose resources
    are left out is never started for GPU work."""
    cfg = prepared(ROOT / "experiments" / "cluster" / "gcp.yaml")
    for name, t in cfg["available_node_types"].items():
        if name == cfg["head_node_type"]:
            continue
        n, kind = GPUS[instance(t)]
        assert t["resources"]["GPU"] == n and t["resources"][f"accelerator_type:{kind}"] == 1
        assert t["resources"]["CPU"] > 0


def test_max_gpus_counts_the_largest_nodes_first():
    assert [max_gpus(prepared(p)) for p in CLUSTER_FILES] == [22, 22]
    assert [max_gpus(prepared(p), "A100") for p in CLUSTER_FILES] == [16, 16]


def test_two_providers():
    assert len({prepared(p)["provider"]["type"] for p in CLUSTER_FILES}) >= 2


def test_rejects_typo():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    cfg["max_worker"] = cfg.pop("max_workers")
    with pytest.raises(Exception, match="max_worker"):
        validate_config(prepare_config(cfg))
