"""Serving through a node failure: the node running the model's replica dies while requests stream
from it. Serve starts a replica on the other model node; every request either completes or fails
in a way a client retries (503 with Retry-After, or an error event in a stream already under way),
never a hang or a bare 500.

A module of its own: it runs its own four-process Ray cluster (head, two model nodes; the tiny base).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import psutil
import ray._private.node as ray_node
import pytest
import requests
import yaml

from qlora_ray.fuse.launch import fuse_job
from qlora_ray.serve.bench import Sample, send_requests, synthetic_prompt
from qlora_ray.spec import load_spec
from tests.conftest import REPO, free_port
from tests.helpers import base_dir_of, kill_node, process_title, publish_adapter

MODEL, KEY, OUTPUT_TOKENS = "acme/bf16.original", "qr-fault-test-key", 160


def ask_whole_answers(url: str, until: float, answers: list) -> None:
    """Non-streaming completions, one after another until `until`: (status, Retry-After, body text)
    each; (None, None, the exception) for a request that got no answer."""
    while time.perf_counter() < until:
        try:
            response = requests.post(f"{url}/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                                     json={"model": MODEL, "prompt": "the 3rd of May", "max_tokens": OUTPUT_TOKENS,
                                           "ignore_eos": True})
        except requests.RequestException as exc:
            answers.append((None, None, repr(exc)))
            continue
        answers.append((response.status_code, response.headers.get("Retry-After"), response.text))
        if response.status_code != 200:
            time.sleep(float(response.headers.get("Retry-After") or 1))


def replica_node(nodes: list[ray_node.Node]) -> ray_node.Node | None:
    """The node whose raylet runs the model's replica (its worker processes are the raylet's children)."""
    for node in nodes:
        raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
        if any(process_title(p) == "ray::ServeReplica:faults:fused" for p in raylet.children(recursive=True)):
            return node
    return None


@pytest.mark.slow
def test_a_killed_model_node_is_replaced_and_its_requests_fail_retryably(tiny_job_store, tmp_path, capsys):
    """Streaming and whole-answer clients keep a tiny model's replica busy; its node is killed."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from qlora_ray.serve.app import Gateway, ModelServer, gateway_options, model_options

    publish_adapter(tiny_job_store, "acme", base_dir_of(tiny_job_store, tmp_path), tmp_path, seed=1, r=4, lora_alpha=8)
    port = free_port()
    job = {
        "name": "t", "store": tiny_job_store.uri, "base": {"name": "tiny", "source": "shape:tiny"},
        "tenants": [{"id": "acme", "train_data": str(REPO / "jobs" / "data" / "dates" / "train.jsonl")}],
        "fuse": {"schemes": ["bf16"], "workers": 1, "resources": {"num_cpus": 1}},
        "serve": {"port": port, "max_tokens": 224, "context": 256, "unmerged_baseline": False,
                  "resources": {"num_cpus": 1, "custom": {"model_node": 1}}},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    spec = load_spec(tmp_path / "job.yaml")
    # The head holds Serve's controller, its proxy and the gateway (pinned there by "gateway"); the
    # model's one replica lands on either model node, and the other is where it goes next.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "resources": {"gateway": 1},
                                                            "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1, resources={"model_node": 1}) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        cluster.wait_for_nodes()
        outcomes = fuse_job(spec, progress=lambda _: None)
        assert [o.state for o in outcomes] == ["done"], [o.error for o in outcomes]
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        gateway = Gateway.options(**gateway_options(spec), ray_actor_options={"num_cpus": 0, "resources": {"gateway": 0.01}})
        serve.run(gateway.bind(spec, ModelServer.options(**model_options(spec, "fused")).bind(spec), None, {KEY: "acme"}),
                  name="faults", route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1"
        warm = requests.post(f"{url}/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2},
                             headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
        assert warm.status_code == 200, warm.text
        doomed = replica_node(nodes)
        assert doomed is not None

        # Four clients stream and two wait for whole answers, for 45 s; 5 s in, the replica's node dies.
        result: dict = {"answers": []}

        def stream_completions() -> None:
            result["samples"] = asyncio.run(send_requests(url, KEY, MODEL, concurrency=4, requests=0, duration=45,
                                                          prompt=synthetic_prompt(4), output_tokens=OUTPUT_TOKENS))

        started = time.perf_counter()
        clients = [threading.Thread(target=stream_completions)]
        clients += [threading.Thread(target=ask_whole_answers, args=(url, started + 45, result["answers"]))
                    for _ in range(2)]
        for client in clients:
            client.start()
        time.sleep(5)
        kill_node(cluster, doomed)
        killed_at = time.perf_counter() - started
        for client in clients:
            client.join(timeout=240)
            assert not client.is_alive(), "a request hung after its replica's node died"
        survivor = next(node for node in nodes if node is not doomed)
        assert replica_node([survivor]) is survivor
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()

    answers = result["answers"]
    for status, retry_after, text in answers:
        if status == 200:
            assert json.loads(text)["usage"]["completion_tokens"] == OUTPUT_TOKENS
        else:
            assert (status, retry_after) == (503, "1"), text
            assert json.loads(text)["error"]["code"] == "model_unavailable"
    samples: list[Sample] = result["samples"]
    complete = [s for s in samples if s.status == 200 and s.error is None and s.output_tokens == OUTPUT_TOKENS]
    unavailable = [s for s in samples if s.overloaded]
    cut = [s for s in samples if s.status == 200 and s.error and s.error.startswith("stream error") and "retry after" in s.error]
    assert len(complete) + len(unavailable) + len(cut) == len(samples), \
        [s for s in samples if s not in complete + unavailable + cut][:5]
    assert all(s.status == 503 for s in unavailable)
    failed_whole = [a for a in answers if a[0] != 200]
    assert cut or unavailable or failed_whole, "the node died between requests: nothing was in flight"
    # Serve recovered: the last requests, started well after the kill, all completed.
    last = sorted(samples, key=lambda s: s.started)[-4:]
    assert all(s in complete for s in last), last
    recovered = min(s.finished for s in complete if s.started > killed_at) - killed_at
    with capsys.disabled():
        print(f"\nnode kill: streaming, {len(samples)} requests: {len(complete)} complete, {len(unavailable)} "
              f"answered 503, {len(cut)} streams ended with an error event; whole answers, {len(answers)} requests: "
              f"{len(answers) - len(failed_whole)} complete, {len(failed_whole)} answered 503; the first request "
              f"sent after the kill completed {recovered:.1f} s after it")
