"""How many replicas a cluster holds, a serve job that asks for more is refused with its fields, and the
environment a local Ray starts with."""

from __future__ import annotations

import os

import pytest
import yaml

from qlora_ray import cluster
from qlora_ray.cli import _refuse_replicas_that_cannot_start
from qlora_ray.errors import UserError
from qlora_ray.spec import load_spec

TWO_GPU_HOST = {"CPU": 32.0, "GPU": 2.0, "memory": 2e11}


def test_copies_that_fit_count_each_node_by_its_scarcest_resource():
    assert cluster.copies_that_fit([TWO_GPU_HOST], {"CPU": 2, "GPU": 1}) == 2
    assert cluster.copies_that_fit([TWO_GPU_HOST], {"CPU": 2, "GPU": 0.25}) == 8
    assert cluster.copies_that_fit([TWO_GPU_HOST], {"CPU": 12, "GPU": 0.25}) == 2  # CPUs run out first
    assert cluster.copies_that_fit([TWO_GPU_HOST, {"CPU": 4.0}], {"CPU": 2, "GPU": 0}) == 18
    # An actor lives on one node: two half-free nodes do not make room for a whole-GPU replica.
    assert cluster.copies_that_fit([{"CPU": 8.0, "GPU": 0.5}, {"CPU": 8.0, "GPU": 0.5}], {"CPU": 1, "GPU": 1}) == 0
    assert cluster.copies_that_fit([{"CPU": 8.0}], {"CPU": 1, "fuse_node": 1}) == 0


@pytest.mark.parametrize("replicas, unmerged, refused", [(2, False, False), (3, False, True), (1, True, False),
                                                          (2, True, True)])
def test_a_serve_job_asking_for_more_replicas_than_the_machine_holds_is_refused(tmp_path, monkeypatch, replicas,
                                                                                 unmerged, refused):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "name": "acme", "store": "store", "base": {"name": "tiny", "source": "shape:tiny"},
        "tenants": [{"id": "t1", "train_data": "t1.jsonl"}],
        "serve": {"num_replicas": replicas, "unmerged_baseline": unmerged, "resources": {"num_cpus": 2, "num_gpus": 1}}}))
    spec = load_spec(job)
    monkeypatch.setattr(cluster, "live_node_resources", lambda: [TWO_GPU_HOST])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if not refused:
        _refuse_replicas_that_cannot_start(spec)
        return
    with pytest.raises(UserError, match=r"serve\.num_replicas: .* CPU 2, GPU 1 each \(serve\.resources\) do not fit "
                                        r"this machine: it has room for 2"):
        _refuse_replicas_that_cannot_start(spec)
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")  # a cluster that may scale up: Serve waits for it
    _refuse_replicas_that_cannot_start(spec)


def test_a_local_ray_starts_with_serves_throughput_settings_unless_the_environment_says_otherwise(monkeypatch):
    import ray

    seen, drains = [], []

    def init(**_):
        seen.append(os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED"))
        drains.append(os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"))

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for name in cluster.SERVE_THROUGHPUT_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    cluster.init_ray()
    assert seen == ["1"] and drains == ["5"]  # the processes Ray starts inherit them
    assert not set(cluster.SERVE_THROUGHPUT_DEFAULTS) & set(os.environ)  # the driver's environment is as it was
    monkeypatch.setenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", "0")  # a user's own choice stands
    cluster.init_ray()
    assert seen == ["1", "0"] and os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0"
    monkeypatch.delenv("RAY_SERVE_THROUGHPUT_OPTIMIZED")
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")  # a cluster's processes have their own environment
    cluster.init_ray()
    assert seen == ["1", "0", None]
