"""The fuse pool under a fault: the node running a fuse worker dies in the middle of a unit; Ray
restarts the worker on another node, which redoes the unit, and the tenant's model is published once.

A module of its own: it runs its own three-process Ray cluster, where test_fuse shares a local one.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from qlora_ray.fuse.launch import fuse_job
from qlora_ray.local_disk import local_root, sweep_scratch
from qlora_ray.store import fused_key
from tests.helpers import base_dir_of, fuse_spec, kill_node, publish_adapter


# Each GPTQ mode's unit folder under the worker's scratch folder, and where in it the unit stages the
# tenant's calibration rows.
UNIT_FOLDERS = {"per-tenant": ("gptq/{tenant}", "*/data/train.jsonl"), "bulk": ("stream", "data/{tenant}/train.jsonl")}


@pytest.mark.parametrize("mode", sorted(UNIT_FOLDERS))
def test_a_killed_fuse_worker_is_redone_on_another_node(tiny_job_store, tmp_path, mode):
    import ray
    from ray.cluster_utils import Cluster

    tenant = f"killed{mode.replace('-', '')}{os.getpid()}"
    publish_adapter(tiny_job_store, tenant, base_dir_of(tiny_job_store, tmp_path), tmp_path, seed=5, r=4, lora_alpha=8)
    spec = fuse_spec(tmp_path, tiny_job_store, [tenant], schemes=["gptq-int4"], workers=1,
                     gptq={"mode": mode, "group_size": 32, "calibration_samples": 16},
                     resources={"num_cpus": 1, "custom": {"fuse_node": 1}})
    # A GPTQ unit fetches its calibration rows, then quantizes for seconds: the node dies in between.
    folder, rows = (part.format(tenant=tenant) for part in UNIT_FOLDERS[mode])
    unit_folder = f"fuse-worker--*/{folder}"
    in_flight = f"{unit_folder}/{rows}"
    work = local_root() / "work"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    first = cluster.add_node(num_cpus=1, resources={"fuse_node": 1})
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        cluster.wait_for_nodes()
        result: dict = {}
        driver = threading.Thread(target=lambda: result.update(outcomes=fuse_job(spec, progress=lambda _: None)))
        driver.start()
        deadline = time.monotonic() + 240
        while not list(work.glob(in_flight)):
            assert time.monotonic() < deadline, "the GPTQ unit never started"
            assert driver.is_alive(), "the fuse ended before its worker could be killed"
            time.sleep(0.05)
        kill_node(cluster, first)
        cluster.add_node(num_cpus=1, resources={"fuse_node": 1})
        driver.join(timeout=300)
        assert not driver.is_alive()
    finally:
        ray.shutdown()
        cluster.shutdown()

    (outcome,) = result["outcomes"]
    assert (outcome.variant, outcome.state) == ("gptq-int4.original", "done"), outcome.error
    key = fused_key("t", tenant, "gptq-int4.original")
    tiny_job_store.verify(key)
    assert tiny_job_store.read_manifest(key)["metrics"]["calibration_rows"] == 16
    # The killed attempt never reached its clean-up; the next process of this host to make a scratch
    # folder removes it (the restarted worker's, or this sweep's, whichever comes once it is gone).
    sweep_scratch()
    assert not list(work.glob(unit_folder))
