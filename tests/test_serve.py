"""The serve stage end to end on the CPU: SmolLM2 fused for three tenants, behind the Ray Serve app.

Adapters are random peft LoRAs (as in test_fuse), so each tenant's model answers differently; each
answer through the API is compared with the same folder loaded by plain transformers. The resident
bound is 2 models per replica, below the job's 7 fused models and 3 unmerged ones.
"""

from __future__ import annotations

import json
import time

import pytest
import requests
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from qlora_ray.cluster import serve_throughput_defaults
from qlora_ray.fuse.launch import fuse_job
from qlora_ray.serve.bench import run_bench, summarize, Sample, write_report
from qlora_ray.serve.keys import new_key
from qlora_ray.spec import load_spec
from qlora_ray.store import Store, fused_key
from tests.conftest import REPO, copy_base, free_port
from tests.helpers import publish_adapter, set_verdict

TENANTS = ["acme", "globex", "initech"]
QUESTION = [{"role": "user", "content": "the 3rd of May, 2021"}]


@pytest.fixture(scope="module")
def served(smollm2_store, tmp_path_factory):
    import ray
    from ray import serve

    from qlora_ray.serve.app import build_application

    tmp_path = tmp_path_factory.mktemp("served")
    store = Store(str(tmp_path / "store"))
    copy_base(smollm2_store, store, tmp_path, name="smollm2-135m")
    base_dir = tmp_path / "base"
    store.fetch("bases/smollm2-135m", base_dir)
    for seed, tenant in enumerate(TENANTS):
        publish_adapter(store, tenant, base_dir, tmp_path, seed=seed, r=8, lora_alpha=16)
    port = free_port()
    job = {
        "name": "t", "store": store.uri, "base": {"name": "smollm2-135m"},
        "tenants": [{"id": t, "train_data": str(REPO / "jobs" / "data" / "dates" / "train.jsonl")} for t in TENANTS],
        "fuse": {"schemes": ["bf16", "nf4", "gptq-int4"], "merge_base": "original", "workers": 2,
                 "gptq": {"group_size": 64, "calibration_samples": 8}},
        "serve": {"port": port, "max_resident_models": 2, "max_tokens": 64, "context": 256,
                  "catalog_refresh_s": 0.5, "host_memory": "5GB", "resources": {"num_cpus": 1}},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    spec = load_spec(path)
    # GPTQ is the slow scheme here: only acme gets a gptq-int4 model (the others' are simply not served).
    fast_spec = spec.model_copy(update={"fuse": spec.fuse.model_copy(update={"schemes": ["bf16", "nf4"]})})
    gptq_spec = spec.model_copy(update={"fuse": spec.fuse.model_copy(update={"schemes": ["gptq-int4"]}),
                                        "tenants": spec.tenants[:1]})
    with serve_throughput_defaults():  # Serve as `qlora-ray serve` and `bench` start it
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        outcomes = fuse_job(fast_spec, progress=lambda _: None) + fuse_job(gptq_spec, progress=lambda _: None)
        assert {o.state for o in outcomes} == {"done"}, [o.error for o in outcomes]
        keys = {tenant: new_key(store, "t", tenant) for tenant in TENANTS}
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_application(spec), name="t", route_prefix="/")
        yield {"url": f"http://127.0.0.1:{port}/v1", "keys": keys, "store": store, "spec": spec, "tmp": tmp_path}
    finally:
        serve.shutdown()
        ray.shutdown()


def client(served, tenant):
    from openai import OpenAI

    return OpenAI(base_url=served["url"], api_key=served["keys"][tenant], max_retries=0)


def reference_answer(served, model_id: str, messages, max_tokens: int) -> tuple[str, str, int]:
    """The greedy answer of the fused folder loaded by transformers (4-bit layers dequantized by
    bitsandbytes: with_dequantized_4bit_weights), in fp32 as the CPU server runs: (its text, its
    OpenAI finish_reason, its completion tokens, the stop token included)."""
    tenant, variant = model_id.split("/")
    folder = served["tmp"] / "reference" / tenant / variant
    served["store"].fetch(fused_key("t", tenant, variant), folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with_dequantized_4bit_weights(model)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
    new_tokens = out[0, ids["input_ids"].shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    stopped = new_tokens[-1] in (eos if isinstance(eos, list) else [eos])
    return tokenizer.decode(new_tokens, skip_special_tokens=True), "stop" if stopped else "length", len(new_tokens)


def with_dequantized_4bit_weights(model) -> None:
    """Replace bitsandbytes' 4-bit layers by fp32 ones holding bitsandbytes' own dequantization of
    their weights, and run the rest in fp32 too, as the CPU server computes them. bitsandbytes' CPU
    4-bit matmul is not that product on every CPU: on one with AVX512-BF16 and AMX (2026-12-02,
    bitsandbytes 0.50.2, a fused nf4 SmolLM2 with double quantization, compute dtype set to fp32) a
    projection's outputs differed from it by up to 0.16, and the greedy answers parted after 72
    characters."""
    import bitsandbytes as bnb

    replaced = False
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                dense = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                dense.weight.data = bnb.functional.dequantize_4bit(child.weight.data, child.weight.quant_state).float()
                if child.bias is not None:
                    dense.bias.data = child.bias.data.float()
                setattr(parent, name, dense)
                replaced = True
    if replaced:  # the layers a 4-bit load left in the folder's bf16 (transformers refuses .float() here)
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.data = tensor.data.float()


@pytest.mark.parametrize("model_id", ["acme/bf16.original", "acme/nf4.original", "acme/gptq-int4.original",
                                      "globex/bf16.original"])
def test_openai_client_gets_the_tenants_answer_streaming_and_not(served, model_id):
    api = client(served, model_id.split("/")[0])
    answer = api.chat.completions.create(model=model_id, messages=QUESTION, temperature=0, max_tokens=24)
    text, finish, produced = reference_answer(served, model_id, QUESTION, 24)
    assert answer.choices[0].message.content == text
    assert (answer.choices[0].finish_reason, answer.usage.completion_tokens) == (finish, produced)
    chunks = list(api.chat.completions.create(model=model_id, messages=QUESTION, temperature=0, max_tokens=24,
                                              stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == answer.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens


def test_tenants_get_different_models(served):
    answers = {t: client(served, t).chat.completions.create(model=f"{t}/bf16.original", messages=QUESTION,
                                                            temperature=0, max_tokens=24).choices[0].message.content
               for t in TENANTS}
    assert len(set(answers.values())) == len(TENANTS), answers


def test_completions_stop_strings_and_lengths(served):
    api = client(served, "acme")
    full = api.completions.create(model="acme/bf16.original", prompt="The capital of France is", temperature=0,
                                  max_tokens=12)
    produced = full.usage.completion_tokens
    assert full.usage.prompt_tokens > 0 and full.choices[0].finish_reason == ("length" if produced == 12 else "stop")
    text = full.choices[0].text
    assert len(text) > 4
    stop = text[3:5]
    cut = api.completions.create(model="acme/bf16.original", prompt="The capital of France is", temperature=0,
                                 max_tokens=12, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    sampled = api.completions.create(model="acme/bf16.original", prompt="Hello", temperature=0.8, top_p=0.9, max_tokens=5)
    assert sampled.usage.completion_tokens <= 5


def test_models_and_keys(served):
    from openai import AuthenticationError, NotFoundError, OpenAI

    listed = {m.id for m in client(served, "acme").models.list()}
    assert listed == {"acme/bf16.original", "acme/nf4.original", "acme/gptq-int4.original", "acme/unmerged",
                      "acme/bf16", "acme/nf4", "acme/gptq-int4"}  # a scheme's name: its (only) merge base
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=served["url"], api_key="qr-not-a-key", max_retries=0).models.list()
    assert requests.get(f"{served['url']}/models").status_code == 401  # no key at all
    with pytest.raises(NotFoundError):  # another tenant's model is not revealed
        client(served, "globex").chat.completions.create(model="acme/bf16.original", messages=QUESTION)
    with pytest.raises(NotFoundError):
        client(served, "acme").chat.completions.create(model="acme/nope", messages=QUESTION)


def listed_after_refresh(served, tenant: str, condition) -> set[str]:
    """The tenant's model list once `condition` holds of it: the gateway rereads the store in a thread
    every serve.catalog_refresh_s (0.5 s here)."""
    deadline = time.monotonic() + 30
    while True:
        listed = {m.id for m in client(served, tenant).models.list()}
        if condition(listed) or time.monotonic() > deadline:
            return listed
        time.sleep(0.2)


def test_a_model_that_failed_the_quality_gate_is_refused(served):
    """The eval stage's verdict: 403 with the reason, not listed, its scheme's name
    gone too (no other merge base passed), until the verdict changes."""
    from openai import PermissionDeniedError

    store = served["store"]
    reason = "perplexity 9.9 is +500.0% against the adapter's 1.65 (at most +5% allowed)"
    set_verdict(store, "t", "globex", "nf4.original", False, [reason])
    try:
        listed = listed_after_refresh(served, "globex", lambda names: "globex/nf4.original" not in names)
        assert "globex/nf4.original" not in listed and "globex/nf4" not in listed and "globex/bf16" in listed
        with pytest.raises(PermissionDeniedError, match=r"failed the quality gate \(perplexity 9.9"):
            client(served, "globex").chat.completions.create(model="globex/nf4.original", messages=QUESTION)
    finally:
        set_verdict(store, "t", "globex", "nf4.original", True, [])
        assert "globex/nf4.original" in listed_after_refresh(served, "globex", lambda names: "globex/nf4.original" in names)


@pytest.mark.parametrize("body", [
    "{not json", "[1, 2]", json.dumps({"messages": QUESTION}),
    json.dumps({"model": "acme/bf16.original"}),
    json.dumps({"model": "acme/bf16.original", "messages": []}),
    json.dumps({"model": "acme/bf16.original", "messages": [{"role": "robot", "content": "x"}]}),
    json.dumps({"model": "acme/bf16.original", "messages": QUESTION, "temperature": 3}),
    json.dumps({"model": "acme/bf16.original", "messages": QUESTION, "max_tokens": 100000}),
    json.dumps({"model": "acme/bf16.original", "messages": QUESTION, "n": 2}),
    json.dumps({"model": "acme/bf16.original", "messages": QUESTION, "stop": ["a", "b", "c", "d", "e"]}),
    json.dumps({"model": "acme/bf16.original", "messages": [{"role": "user", "content": "x " * 400}]}),
])
def test_malformed_requests_get_a_4xx_with_a_message(served, body):
    response = requests.post(f"{served['url']}/chat/completions", data=body,
                             headers={"Authorization": f"Bearer {served['keys']['acme']}"})
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["error"]["message"]


def test_completion_token_ids_out_of_range_are_refused(served):
    response = requests.post(f"{served['url']}/completions", json={"model": "acme/bf16.original", "prompt": [10**9]},
                             headers={"Authorization": f"Bearer {served['keys']['acme']}"})
    assert response.status_code == 400 and "token ids" in response.json()["error"]["message"]


def test_more_models_than_the_resident_bound_answer_in_turn(served):
    """Six fused models through a replica that holds two (and the unmerged one on its own deployment),
    twice: each pass loads at least the four that cannot have stayed (a request that waited for a load
    says so in X-Model-Load-Seconds), and every model answers the same as before it was evicted."""
    fused = [f"{t}/{v}" for t in TENANTS for v in ("bf16.original", "nf4.original")]
    order = fused + ["acme/unmerged"]
    first, loaded = {}, []
    for model_id in order + order[::-1]:
        response = requests.post(f"{served['url']}/chat/completions", timeout=120,
                                 headers={"Authorization": f"Bearer {served['keys'][model_id.split('/')[0]]}"},
                                 json={"model": model_id, "messages": QUESTION, "temperature": 0, "max_tokens": 8})
        assert response.status_code == 200, response.text
        answer = response.json()["choices"][0]["message"]["content"]
        assert first.setdefault(model_id, answer) == answer
        if model_id in fused:
            loaded.append("X-Model-Load-Seconds" in response.headers)
    # in each pass, at most the two models resident when it began answer without a load
    passes = loaded[:len(fused)], loaded[len(fused):]
    assert all(sum(one_pass) >= len(fused) - 2 for one_pass in passes), passes
    facts = requests.get(f"{served['url']}/qlora-ray/resident", params={"model": "acme/bf16.original"},
                         headers={"Authorization": f"Bearer {served['keys']['acme']}"}, timeout=120).json()
    assert "acme/bf16.original" in facts["resident_models"] and len(facts["resident_models"]) == 2  # the bound held


def test_a_switch_back_takes_over_the_evicted_models_engine_from_host_memory(served):
    """Three bf16 models through a replica that holds two (and host memory for all of this module's
    models): the second request for globex finds its weights in host memory and the engine of the
    model it evicts (initech's: same shape), and still answers as the folder does under transformers."""
    def ask(model_id: str) -> requests.Response:
        response = requests.post(f"{served['url']}/chat/completions", timeout=120,
                                 headers={"Authorization": f"Bearer {served['keys'][model_id.split('/')[0]]}"},
                                 json={"model": model_id, "messages": QUESTION, "temperature": 0, "max_tokens": 8})
        assert response.status_code == 200, response.text
        return response

    for model_id in ("globex/bf16.original", "initech/bf16.original", "acme/bf16.original"):
        ask(model_id)
    switched = ask("globex/bf16.original")
    assert switched.json()["choices"][0]["message"]["content"] == \
        reference_answer(served, "globex/bf16.original", QUESTION, 8)[0]
    assert switched.headers["X-Model-Loaded-From"] == "host memory, into a spare engine"  # what bench --mixed reads
    assert float(switched.headers["X-Model-Load-Seconds"]) > 0
    facts = requests.get(f"{served['url']}/qlora-ray/resident", params={"model": "globex/bf16.original"},
                         headers={"Authorization": f"Bearer {served['keys']['globex']}"}, timeout=120).json()
    assert facts["loaded_from"] == "host memory, into a spare engine", facts
    assert sorted(facts["resident_models"]) == ["acme/bf16.original", "globex/bf16.original"]
    assert "globex/bf16.original" in facts["host_models"]


def test_bench_runs_end_to_end_and_its_summary_agrees_with_its_samples(served, tmp_path):
    keys = {"acme/gptq-int4.original": served["keys"]["acme"], "globex/unmerged": served["keys"]["globex"]}
    report = run_bench(served["url"], keys, list(keys), concurrency=[1, 2], requests=2, prompt_tokens=16,
                       output_tokens=6, progress=lambda _: None)
    assert len(report["results"]) == 4
    for row in report["results"]:
        samples = [Sample(**s) for s in report["samples"] if s["model"] == row["model"] and s["concurrency"] == row["concurrency"]]
        server_side = row["replica_first_token"]
        assert row == {"model": row["model"], "concurrency": row["concurrency"], "resident_bytes": row["resident_bytes"],
                       "load_seconds": row["load_seconds"], "replica_start_seconds": row["replica_start_seconds"],
                       **summarize(samples), "replica_ttft_ms_p50": server_side["in_replica_ms_p50"],
                       "engine_ttft_ms_p50": server_side["engine_ms_p50"],
                       "before_replica_ms_p50": server_side["before_replica_ms_p50"],
                       "replica_mean_batch": row["replica_mean_batch"], "replica_steps_per_s": row["replica_steps_per_s"],
                       "replica_first_token": server_side}
        # this level's decode steps only: none has more rows than the level's clients
        assert 1 <= row["replica_mean_batch"] <= row["concurrency"] and row["replica_steps_per_s"] > 0
        # The server's side of this level's requests (not the warm-up's, nor the other model's): each
        # within the client's time to first token, the engine's share within the replica's.
        assert server_side["requests"] == 2
        assert 0 < row["engine_ttft_ms_p50"] <= row["replica_ttft_ms_p50"] <= row["ttft_ms_p50"]
        # the way there, from the send time each request carries: every part known, each within the TTFT
        assert 0 < row["before_replica_ms_p50"] < row["ttft_ms_p50"]
        assert all(server_side[f"{span}_ms_p50"] >= 0 for span in ("to_gateway", "in_gateway", "to_replica"))
        assert row["errors"] == 0 and row["requests"] == 2 and row["resident_bytes"] > 50e6
        assert row["load_seconds"] > 0 and row["replica_start_seconds"] >= 0  # reported (milliseconds, on a CPU)
        assert all(s.output_tokens == 6 for s in samples)  # ignore_eos: every answer has the asked length
        ttfts = sorted(s.first_token - s.started for s in samples)
        assert row["ttft_ms_p50"] == round((ttfts[0] + ttfts[1]) / 2 * 1000, 2)
    written = write_report(report, tmp_path / "bench")
    assert [p.name for p in written] == ["bench.json", "bench.md", "bench.png"]
    assert written[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "acme/gptq-int4.original" in written[1].read_text()
