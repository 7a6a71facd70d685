"""A real two-node Ray cluster on 127.0.0.1, started with `ray start` as an operator starts one, and a
job handed to it with `ray job submit --working-dir`, as README's "From one machine to a cluster" says.

The head stands in for a fuse node (custom resource fuse_node) and the second node for a GPU node
(train_node). The job asks for those resources, and each stage's records in the store say on which
node it ran. The cluster is stopped by killing its own processes, never with `ray stop`, which would
stop every Ray instance on the machine.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from qlora_ray.store import Store, adapter_key, eval_key, fused_key
from qlora_ray.train.status import read_status
from tests.conftest import REPO, free_ports

DATA = REPO / "jobs" / "data" / "dates"


def _job(store: str) -> dict:
    node = lambda name: {"num_cpus": 1, "custom": {name: 1}}  # noqa: E731 - a job file's resources block
    return {
        "name": "cluster", "store": store,
        "base": {"name": "tiny", "source": "shape:tiny", "shard_size": "100KB"},
        "train": {"max_steps": 4, "batch_size": 2, "seq_len": 128, "gradient_checkpointing": False,
                  "resources": node("train_node")},
        "tenants": [{"id": "a", "train_data": "data/train.jsonl", "eval_data": "data/eval.jsonl"},
                    {"id": "b", "train_data": "data/train.jsonl"}],
        "fuse": {"schemes": ["bf16", "nf4"], "workers": 1, "resources": node("fuse_node")},
        "eval": {"resources": node("train_node")},
    }


def _node_ports(ports: list[int]) -> list[str]:
    """Ports of their own for a node's agents: two nodes on one host would otherwise both take Ray's defaults."""
    flags = ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
             "--metrics-export-port", "--node-manager-port", "--object-manager-port")
    assert len(ports) == len(flags)
    return [f"{flag}={port}" for flag, port in zip(flags, ports)]


def _kill_cluster(temp_dir: Path) -> None:
    """Every process of this cluster: those naming its temp dir (GCS, raylets, dashboard, agents) and
    all their descendants (workers, the job's driver)."""
    ours = [p for p in psutil.process_iter(["cmdline"]) if str(temp_dir) in " ".join(p.info["cmdline"] or [])]
    for process in list(ours):
        try:
            ours += process.children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for process in ours:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(ours, timeout=30)


@pytest.mark.slow
def test_a_job_submitted_to_a_two_node_cluster_runs_each_stage_where_its_resources_say(tmp_path):
    bin_dir = Path(sys.executable).parent
    # Token authentication, as README asks of a real cluster: every node and client holds the token.
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    temp_dir = Path(tempfile.mkdtemp(prefix="qr-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    # Every port of both nodes in one draw, so that no two components are given the same one.
    gcs_port, dashboard_port, client_port, *agent_ports = free_ports(3 + 12)
    dashboard = f"http://127.0.0.1:{dashboard_port}"

    def ray_cli(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
        return subprocess.run([str(bin_dir / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout)

    def nodes() -> list[dict]:  # through the CLI: the test process may hold another cluster's token
        listed = ray_cli("list", "nodes", f"--address={dashboard}", "--detail", "--format=json")
        assert listed.returncode == 0, listed.stdout + listed.stderr
        return json.loads(listed.stdout)

    work = tmp_path / "job"
    (work / "data").mkdir(parents=True)
    for name in ("train.jsonl", "eval.jsonl"):
        shutil.copy(DATA / name, work / "data" / name)
    (work / "job.yaml").write_text(yaml.safe_dump(_job(str(tmp_path / "store"))))
    try:
        head = ray_cli("start", "--head", f"--port={gcs_port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                       "--resources=" + json.dumps({"fuse_node": 1}), "--include-dashboard=true",
                       "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                       f"--ray-client-server-port={client_port}", f"--temp-dir={temp_dir}", *_node_ports(agent_ports[:6]))
        assert head.returncode == 0, head.stdout + head.stderr
        worker = ray_cli("start", f"--address=127.0.0.1:{gcs_port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                         "--resources=" + json.dumps({"train_node": 1}), *_node_ports(agent_ports[6:]))
        assert worker.returncode == 0, worker.stdout + worker.stderr
        deadline = time.monotonic() + 60
        while len([n for n in nodes() if n["state"] == "ALIVE"]) < 2:
            assert time.monotonic() < deadline, "the second node did not join"
            time.sleep(1)

        submitted = ray_cli("job", "submit", f"--address={dashboard}", f"--working-dir={work}", "--",
                            "qlora-ray", "run", "job.yaml", timeout=1200)
        said = submitted.stdout + submitted.stderr
        assert submitted.returncode == 0, said[-4000:]
        assert re.search(r"stages done: base [\d.]+ s, train [\d.]+ s, fuse [\d.]+ s, eval [\d.]+ s\.", said), said[-4000:]
        assert "succeeded" in said.lower(), said[-4000:]

        resources = {n["node_id"]: n["resources_total"] for n in nodes()}
        train_node = next(node for node, total in resources.items() if "train_node" in total)
        fuse_node = next(node for node, total in resources.items() if "fuse_node" in total)
    finally:
        _kill_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(temp_dir) in " ".join(p.info["cmdline"] or [])]

    store = Store(str(tmp_path / "store"))
    for tenant in ("a", "b"):
        store.verify(adapter_key("cluster", tenant))
        assert read_status(store, "cluster", tenant)["node_id"] == train_node
        assert store.read_manifest(adapter_key("cluster", tenant))["metrics"]["node_id"] == train_node
        for variant in ("bf16.original", "nf4.original"):
            key = fused_key("cluster", tenant, variant)
            store.verify(key)
            assert store.read_manifest(key)["metrics"]["worker_node_ids"] == [fuse_node]
            assert store.read_manifest(key)["metrics"]["worker_gpu_ids"] == []  # a CPU cluster
    assert store.read_manifest(eval_key("cluster", "a"))["metrics"]["node_id"] == train_node
