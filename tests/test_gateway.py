"""The gateway under a slow store and hostile requests, through the whole Serve app with an injected
engine (tests/test_serve_streams.py's), its store on S3 (moto) behind a proxy that can stall it:
/health and running streams keep flowing while every store read stalls for 3 s; bodies over the
limit are refused with 413 before they are read whole; strings are bounded; OpenAI fields this
server does not implement are refused by name; a chat template's own error is a 400. Three tenants
share a replica with room for two models, so `bench --mixed` meets model switches."""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests

from qlora_ray.store import Store
from tests.faulty_proxy import FaultyProxy
from tests.helpers import MODEL, SlowCountingEngine, fake_engine_app

HEADERS = {"Authorization": "Bearer key-acme"}
TENANTS = ["acme", "globex", "initech"]
LOAD_SECONDS = 0.3  # what the fake loader takes: a model switch
# The byte tokenizer's ChatML, refusing one message as a model's template may (roles out of order, ...).
REFUSING_TEMPLATE = ("{% for m in messages %}{% if m['content'] == 'boom' %}{{ raise_exception('no boom here') }}"
                     "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                     "<|im_start|>assistant\n")


def refusing_loader(spec, store, entry, device):
    from qlora_ray.serve.loading import LoadedModel
    from qlora_ray.shapes import byte_tokenizer

    time.sleep(LOAD_SECONDS)
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = REFUSING_TEMPLATE
    return LoadedModel(entry, SlowCountingEngine(spec.serve.max_batch), tokenizer, 0, 0.0, spec.serve)


@pytest.fixture(scope="module")
def app(s3_endpoint, tmp_path_factory):
    import boto3

    proxy = FaultyProxy(s3_endpoint).start()
    bucket = f"qlora-ray-gateway-{time.time_ns()}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    options = {"client_kwargs": {"endpoint_url": proxy.url}}
    tmp_path = tmp_path_factory.mktemp("gateway")
    try:
        with fake_engine_app(Store(f"s3://{bucket}/root", options), tmp_path, TENANTS, refusing_loader,
                             {"max_batch": 2, "max_tokens": 400, "context": 1024, "max_resident_models": 2,
                              "catalog_refresh_s": 0.5}, storage_options=options) as (url, spec):
            yield {"url": url, "proxy": proxy, "spec": spec}
    finally:
        proxy.stop()


def post(app, path: str, body, **kwargs) -> requests.Response:
    return requests.post(f"{app['url']}/v1/{path}", json=body, headers=HEADERS, timeout=60, **kwargs)


def test_health_and_a_running_stream_keep_flowing_while_the_store_stalls(app):
    proxy = app["proxy"]
    gaps, health_seconds, answers, letters = [], [], [], []

    def stream_long_answer() -> None:
        body = {"model": MODEL, "prompt": "a", "max_tokens": 300, "stream": True, "ignore_eos": True}
        last = None
        with requests.post(f"{app['url']}/v1/completions", json=body, headers=HEADERS, stream=True, timeout=60) as r:
            assert r.status_code == 200, r.text
            for line in r.iter_lines():
                if line:
                    now = time.monotonic()
                    if last is not None:
                        gaps.append(now - last)
                    last = now
                    if line != b"data: [DONE]":
                        letters.extend(json.loads(line[6:])["choices"][0]["text"])

    client = threading.Thread(target=stream_long_answer)
    client.start()
    time.sleep(0.5)  # streaming: 300 tokens at 20 ms a step take ~6 s
    stalled_before = proxy.faults["stall"]
    proxy.inject("stall")  # every store request from now on answers 3 s late
    try:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            started = time.monotonic()
            assert requests.get(f"{app['url']}/health", timeout=10).status_code == 200
            health_seconds.append(time.monotonic() - started)
            started = time.monotonic()
            listed = requests.get(f"{app['url']}/v1/models", headers=HEADERS, timeout=10)
            answers.append((listed.status_code, time.monotonic() - started))
            time.sleep(0.1)
        quick = post(app, "completions", {"model": MODEL, "prompt": "a", "max_tokens": 3})
        assert quick.status_code == 200 and quick.json()["choices"][0]["text"] == "bcd"
    finally:
        proxy.heal()
    client.join(timeout=60)
    assert proxy.faults["stall"] > stalled_before, "the gateway did not read the store during the stall"
    assert max(health_seconds) < 1.0, health_seconds
    assert all(status == 200 and seconds < 1.0 for status, seconds in answers), answers
    # every letter came, in events at most serve.stream_interval_ms (50) apart while the engine ran
    assert len(letters) == 300 and len(gaps) > 50 and max(gaps) < 1.0, (len(letters), len(gaps), max(gaps))


def test_a_body_over_the_limit_is_refused_before_it_is_read(app):
    limit = app["spec"].serve.max_request_bytes
    declared = requests.post(f"{app['url']}/v1/completions", data=b"x" * (limit + 1), headers=HEADERS, timeout=60)
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the gateway stops reading at the limit
        for _ in range(limit // 65536 + 2):
            yield b"x" * 65536

    streamed = requests.post(f"{app['url']}/v1/completions", data=chunks(), headers=HEADERS, timeout=60)
    assert streamed.status_code == 413, streamed.text


@pytest.mark.parametrize(("body", "param"), [
    ({"model": MODEL, "prompt": "a", "stop": ["x" * 257]}, "stop"),
    ({"model": "m" * 257, "prompt": "a"}, "model"),
    ({"model": MODEL, "prompt": "a" * (32 * 1024 + 1)}, "prompt"),
    ({"model": MODEL, "prompt": "a", "logprobs": 2}, "logprobs"),
    ({"model": MODEL, "prompt": "a", "echo": True}, "echo"),
    ({"model": MODEL, "prompt": "a", "best_of": 3}, "best_of"),
    ({"model": MODEL, "prompt": "a", "suffix": "z"}, "suffix"),
])
def test_completion_limits_and_unsupported_fields_are_refused_by_name(app, body, param):
    response = post(app, "completions", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"].split(".")[0] == param and error["message"], error


@pytest.mark.parametrize(("extra", "param"), [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"logprobs": True, "top_logprobs": 2}, "logprobs"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"logit_bias": {"50": 10}}, "logit_bias"),
])
def test_chat_fields_this_server_does_not_implement_are_refused(app, extra, param):
    response = post(app, "chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "a"}], **extra})
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    assert response.json()["error"]["code"] == "unsupported_parameter"


def test_harmless_defaults_of_those_fields_are_accepted(app):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "a"}], "max_tokens": 2, "logprobs": False,
            "response_format": {"type": "text"}, "tool_choice": "none", "frequency_penalty": 0, "seed": 7, "user": "u"}
    response = post(app, "chat/completions", body)
    assert response.status_code == 200, response.text


def test_a_chat_template_error_is_a_400_naming_the_template(app):
    response = post(app, "chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "boom"}]})
    assert response.status_code == 400, response.text
    assert "chat template refused" in response.json()["error"]["message"] and "no boom here" in response.text
    fine = post(app, "chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "a"}], "max_tokens": 2})
    assert fine.status_code == 200, fine.text


def test_mixed_bench_reports_switches_tenants_and_throughput_that_agree_with_its_samples(app, tmp_path):
    from qlora_ray.serve.mixed_bench import run_mixed_bench, write_mixed_report

    models = [f"{t}/bf16.original" for t in TENANTS]
    report = run_mixed_bench(f"{app['url']}/v1", {m: f"key-{m.split('/')[0]}" for m in models}, models,
                             tenant_counts=[1, 3], concurrency=[1, 4], duration=3, zipf=1.1, prompt_tokens=8,
                             output_tokens=16, progress=lambda _: None)
    assert [(r["tenants"], r["concurrency"]) for r in report["results"]] == [(1, 1), (1, 4), (3, 1), (3, 4)]
    for row in report["results"]:
        samples = [s for s in report["samples"] if s["tenants"] == row["tenants"] and s["concurrency"] == row["concurrency"]]
        assert row["errors"] == 0 and row["requests"] == len(samples) > 0
        assert row["output_tokens"] == sum(s["output_tokens"] for s in samples)
        assert set(row["per_tenant"]) == {s["model"].split("/")[0] for s in samples}
        assert len({s["output_tokens"] for s in samples}) > 1 or len(samples) == 1  # varied answer lengths
    mixed = report["results"][3]
    counts = {t: figures["requests"] for t, figures in mixed["per_tenant"].items()}
    assert counts["acme"] == max(counts.values())  # the Zipf head
    # Three tenants in two slots: some requests waited for their model's load, each at least the loader's time.
    assert mixed["switches"] > 0 and mixed["switch_s_p50"] >= LOAD_SECONDS
    # The fake loader reads no host memory: every switch is counted as a load from the store.
    assert mixed["store_loads"] == mixed["switches"] and mixed["host_switches"] == 0
    assert {s["loaded_from"] for s in report["samples"] if s["load_seconds"] is not None} == {"the store"}
    written = write_mixed_report({**report, "when": "now"}, tmp_path)
    assert {p.name for p in written} == {"bench.json", "bench.md", "bench.png"}
    assert "| 3 | 4 |" in (tmp_path / "bench.md").read_text()
