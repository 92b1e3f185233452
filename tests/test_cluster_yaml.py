"""cluster.yaml passes Ray's own launcher validation, offline (no cloud calls)."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_validates():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(cfg))
    assert cfg["available_node_types"]["head"]["resources"] == {"CPU": 0}


def test_rejects_typo():
    import pytest
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    cfg["max_worker"] = cfg.pop("max_workers")
    with pytest.raises(Exception, match="max_worker"):
        validate_config(prepare_config(cfg))
