"""cluster.yaml passes Ray's own cluster-config schema, and its node types fit the job model."""

from __future__ import annotations

import copy

import pytest
import yaml

from tests.conftest import REPO


def load_cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(load_cluster()))


def test_the_schema_check_can_fail():
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(load_cluster())
    broken["available_node_types"]["cpu.fuse"]["resources"] = "lots"
    with pytest.raises(Exception, match="is not of type 'object'"):
        validate_config(prepare_config(broken))


def test_node_types_for_each_stage():
    nodes = load_cluster()["available_node_types"]
    assert nodes["ray.head.default"]["resources"] == {"CPU": 0}  # no pipeline work on the head
    assert nodes["cpu.fuse"]["resources"] == {"fuse_node": 1}
    assert "~/qlora_ray" in load_cluster()["file_mounts"]
