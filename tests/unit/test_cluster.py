"""The cluster-launcher file passes Ray's own validation, and a broken one is refused before launch."""

from __future__ import annotations


import pytest
import yaml

from cluster.errors import ConfigError
from cluster.launcher import validate_cluster_file
from tests.conftest import REPO, aero


def test_ray_cluster_yaml_passes_rays_validation():
    config = validate_cluster_file(REPO / "ray_cluster.yaml")
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert {"cpu_worker", "gpu_worker"} <= set(types)
    assert types["gpu_worker"]["max_workers"] >= 1
    assert any("[gpu]" in cmd for cmd in config["setup_commands"])


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c["available_node_types"]["cpu_worker"].__setitem__("min_workers", "two"),
        lambda c: c.__setitem__("head_node_type", "missing_type"),
        lambda c: c.__setitem__("unknown_field", 1),
    ],
    ids=["wrong-type", "bad-head-type", "unknown-field"],
)
def test_broken_cluster_file_is_rejected_before_launch(tmp_path, mutate):
    config = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    mutate(config)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="rejected by Ray's cluster-config validation"):
        validate_cluster_file(path)
    result = aero("cluster", "up", f"--config={path}")
    assert result.returncode == 2 and "rejected by Ray's cluster-config validation" in result.stderr


