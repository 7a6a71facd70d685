"""The train stage: the fine-tune itself, the Ray fan-out, failures, node loss and resume."""

from __future__ import annotations

import json
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from qlora_ray.spec import TrainSpec, load_spec
from qlora_ray.store import Store, adapter_key, checkpoint_key
from qlora_ray.train.finetune import disable_bnb_cpu_inference_repack, load_base_for_training
from qlora_ray.train.status import read_status
from qlora_ray.work_orders import TrainOrder
from tests.conftest import REPO
from tests.helpers import kill_node

DATES = REPO / "jobs" / "data" / "dates"
UNITS = REPO / "jobs" / "data" / "units"


def tiny_job(tmp_path: Path, store: Store, tenants: list[dict], **train) -> Path:
    """A job on the tiny base: a few fast steps per tenant, one CPU each."""
    job = {
        "name": "t",
        "store": store.uri,
        "base": {"name": "tiny", "source": "shape:tiny", "shard_size": "100KB"},
        "train": {"max_steps": 6, "batch_size": 2, "seq_len": 128, "learning_rate": 1e-3,
                  "gradient_checkpointing": False, "lr_scheduler": "constant",
                  "resources": {"num_cpus": 1}, **train},
        "tenants": tenants,
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def test_4bit_cpu_training_survives_an_eval_forward(tiny_store, tmp_path):
    """bitsandbytes' CPU inference repack silently kills QLoRA gradients; our fix keeps them."""
    from peft import LoraConfig, get_peft_model

    base = tmp_path / "base"
    tiny_store.fetch("bases/tiny", base)
    model, tokenizer = load_base_for_training(base, TrainSpec(), "cpu")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                             init_lora_weights=False))
    assert disable_bnb_cpu_inference_repack(model) == 7 * 2  # every projection of both layers is 4-bit
    ids = tokenizer("hello world, a few tokens", return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad():
        model(ids)  # the forward that triggers the repack on AVX512-BF16 CPUs
    model.train()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*autograd kernel was not registered.*")
        model(ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n and "q_proj" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_train_stage_trains_skips_and_isolates_bad_tenants(tiny_job_store, tmp_path, fresh_local_ray):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora_ray.train.launch import train_job

    (tmp_path / "bad.jsonl").write_text('{"prompt": "p", "completion": "c"}\n{"prompt": 1}\n')
    job = tiny_job(tmp_path, tiny_job_store, [
        {"id": "dates", "train_data": str(DATES / "train.jsonl"), "eval_data": str(DATES / "eval.jsonl")},
        {"id": "units", "train_data": str(UNITS / "train.jsonl"), "lora": {"r": 4, "alpha": 16}},
        {"id": "broken", "train_data": "bad.jsonl"},
        {"id": "missing", "train_data": "nowhere.jsonl"},
    ])
    spec = load_spec(job)
    messages: list[str] = []
    outcomes = {o.tenant: o for o in train_job(spec, progress=messages.append)}
    assert {t: o.state for t, o in outcomes.items()} == {"dates": "done", "units": "done", "broken": "failed",
                                                         "missing": "failed"}
    assert "bad.jsonl:2: a prompt-completion row needs both" in outcomes["broken"].error
    assert "nowhere.jsonl: data file not found" in outcomes["missing"].error
    assert read_status(tiny_job_store, "t", "broken")["state"] == "failed"
    assert read_status(tiny_job_store, "t", "dates")["state"] == "done"

    manifest = tiny_job_store.read_manifest(adapter_key("t", "dates"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(manifest["files"])
    metrics, inputs = manifest["metrics"], manifest["inputs"]
    assert metrics["steps"] == 6 and metrics["tokens_per_second"] > 0 and metrics["peak_memory_bytes"] > 0
    assert metrics["load_seconds"] > 0 and metrics["setup_seconds"] > 0 and metrics["train_seconds"] > 0
    assert metrics["eval_loss"] > 0 and metrics["train_loss"] > 0
    assert inputs["training"]["lora"]["r"] == 16 and inputs["training"]["quantization"] == "nf4"
    assert len(inputs["base"]["manifest_sha256"]) == 64 and len(inputs["data"]["train_sha256"]) == 64
    assert {"torch", "transformers", "peft", "trl", "bitsandbytes"} <= set(manifest["versions"])
    units = tiny_job_store.read_manifest(adapter_key("t", "units"))
    assert units["inputs"]["training"]["lora"] == {**inputs["training"]["lora"], "r": 4, "alpha": 16.0}
    assert tiny_job_store.list_complete("runs/t/checkpoints/dates") == []  # cleaned up after publishing

    # the adapter is a plain PEFT adapter for the base
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_job_store.fetch("bases/tiny", base_dir)
    tiny_job_store.fetch(adapter_key("t", "dates"), adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"].endswith("bases/tiny") and config["r"] == 16
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(adapter_dir))
    assert any("lora_A" in name for name, _ in model.named_parameters())

    # a rerun skips what is done and still reports what is broken
    rerun = {o.tenant: o.state for o in train_job(spec, progress=messages.append)}
    assert rerun == {"dates": "skipped", "units": "skipped", "broken": "failed", "missing": "failed"}
    assert tiny_job_store.read_manifest(adapter_key("t", "dates")) == manifest


def test_loss_falls_on_the_tiny_model(tiny_job_store, tmp_path, fresh_local_ray):
    from qlora_ray.train.launch import train_job

    job = tiny_job(tmp_path, tiny_job_store, [{"id": "units", "train_data": str(UNITS / "train.jsonl")}],
                   max_steps=30, batch_size=4, learning_rate=3e-3)
    [outcome] = train_job(load_spec(job), progress=lambda _: None)
    metrics = outcome.metrics
    assert outcome.state == "done"
    assert metrics["final_loss"] < 0.6 * metrics["first_loss"]


def test_cli_train_and_status(tiny_job_store, tmp_path, fresh_local_ray, capsys):
    from qlora_ray.cli import main

    (tmp_path / "bad.jsonl").write_text("not json\n")
    job = tiny_job(tmp_path, tiny_job_store, [{"id": "units", "train_data": str(UNITS / "train.jsonl")},
                                              {"id": "broken", "train_data": "bad.jsonl"}])
    assert main(["train", str(job)]) == 1
    captured = capsys.readouterr()
    assert "1 tenant(s) failed: broken" in captured.err
    assert main(["status", str(job)]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[4:]}
    assert rows["units"][1:3] == ["done", "6/6"]
    assert rows["broken"][1] == "failed" and "not valid JSON" in " ".join(rows["broken"])


@pytest.fixture
def fake_cluster():
    """Three nodes in one machine: a head that runs nothing, a 'GPU' node and a CPU node."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    gpu_node = cluster.add_node(num_cpus=2, num_gpus=1, resources={"gpu_node": 1})
    cpu_node = cluster.add_node(num_cpus=1, resources={"cpu_node": 1})
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster, gpu_node, cpu_node
    ray.shutdown()
    cluster.shutdown()


def test_tasks_land_where_their_resources_say(tiny_job_store, tmp_path, fake_cluster):
    from qlora_ray.train.launch import train_job

    cluster, gpu_node, cpu_node = fake_cluster
    gpu = {"resources": {"num_cpus": 0.5, "num_gpus": 0.5}}
    job = tiny_job(tmp_path, tiny_job_store, [
        {"id": "g1", "train_data": str(UNITS / "train.jsonl"), **gpu},
        {"id": "g2", "train_data": str(UNITS / "train.jsonl"), **gpu},
        {"id": "g3", "train_data": str(UNITS / "train.jsonl"), **gpu},
        {"id": "c1", "train_data": str(UNITS / "train.jsonl"), "resources": {"num_cpus": 1, "custom": {"cpu_node": 1}}},
    ], max_steps=10)
    outcomes = train_job(load_spec(job), progress=lambda _: None)
    assert [o.state for o in outcomes] == ["done"] * 4
    records = {t: read_status(tiny_job_store, "t", t) for t in ("g1", "g2", "g3", "c1")}
    for tenant in ("g1", "g2", "g3"):
        assert records[tenant]["node_id"] == gpu_node.node_id
        assert records[tenant]["gpu_ids"] == ["0"]  # half a GPU each: they share GPU 0
    assert records["c1"]["node_id"] == cpu_node.node_id and records["c1"]["gpu_ids"] == []
    # one GPU at 0.5 per tenant: at most two of the three ran at once, and two did run together
    spans = [(records[t]["started_ts"], records[t]["finished_ts"]) for t in ("g1", "g2", "g3")]
    overlaps = [sum(start <= moment < end for start, end in spans) for moment, _ in spans]
    assert max(overlaps) == 2


def test_a_killed_node_still_yields_every_adapter_once(tiny_job_store, tmp_path, fake_cluster):
    """Kill the node training a tenant after its first checkpoint: the retry resumes elsewhere."""
    from qlora_ray.train.launch import train_job

    cluster, gpu_node, cpu_node = fake_cluster
    job = tiny_job(tmp_path, tiny_job_store, [
        {"id": "long", "train_data": str(DATES / "train.jsonl"), "max_steps": 400, "checkpoint_every": 10,
         "resources": {"num_cpus": 1, "custom": {"cpu_node": 1}}},
        {"id": "short", "train_data": str(UNITS / "train.jsonl"), "resources": {"num_cpus": 1, "num_gpus": 0.5}},
    ])
    spec = load_spec(job)
    result: dict = {}
    driver = threading.Thread(target=lambda: result.update(outcomes=train_job(spec, progress=lambda _: None)))
    driver.start()
    deadline = time.monotonic() + 240
    while not tiny_job_store.list_complete(checkpoint_key("t", "long")):
        assert time.monotonic() < deadline, "no checkpoint was published"
        assert driver.is_alive(), "training ended before a checkpoint could be interrupted"
        time.sleep(0.2)
    assert read_status(tiny_job_store, "t", "long")["node_id"] == cpu_node.node_id
    kill_node(cluster, cpu_node)
    replacement = cluster.add_node(num_cpus=1, resources={"cpu_node": 1})
    driver.join(timeout=300)
    assert not driver.is_alive()

    assert [o.state for o in result["outcomes"]] == ["done", "done"], [o.error for o in result["outcomes"]]
    manifest = tiny_job_store.read_manifest(adapter_key("t", "long"))
    assert manifest["metrics"]["steps"] == 400
    assert manifest["metrics"]["resumed_from_step"] >= 10  # the retry continued, it did not start over
    record = read_status(tiny_job_store, "t", "long")
    assert record["attempt"] >= 2 and record["node_id"] == replacement.node_id
    assert tiny_job_store.list_complete("runs/t/adapters") == ["long", "short"]
    for key in ("runs/t/adapters/long", "runs/t/adapters/short"):
        tiny_job_store.verify(key)
    assert tiny_job_store.list_complete(checkpoint_key("t", "long")) == []


def test_layer_settings_leave_the_last_layers_uncheckpointed(tiny_store, tmp_path):
    from peft import LoraConfig, get_peft_model

    from qlora_ray.train.finetune import configure_layers, decoder_layers

    base = tmp_path / "base"
    tiny_store.fetch("bases/tiny", base)
    model, _ = load_base_for_training(base, TrainSpec(quantization="none"), "cpu")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = decoder_layers(model)
    assert len(layers) == 2 and all(layer.gradient_checkpointing for layer in layers)
    configure_layers(model, uncheckpointed_layers=1, compile_layers=False)
    assert [layer.gradient_checkpointing for layer in layers] == [True, False]


def test_packed_rows_do_not_see_each_other(tiny_store, tmp_path):
    """packing: true puts several rows in one sequence; attention must stay within each row."""
    base = tmp_path / "base"
    tiny_store.fetch("bases/tiny", base)
    model, _ = load_base_for_training(base, TrainSpec(quantization="none"), "cpu")
    assert model.config.use_cache is False  # with a KV cache, transformers would not isolate them
    model.train()
    first, second = torch.randint(0, 256, (1, 9)), torch.randint(0, 256, (1, 6))
    packed_ids = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(9), torch.arange(6)]).unsqueeze(0)
    with torch.no_grad():
        alone = [model(input_ids=row).logits for row in (first, second)]
        packed = model(input_ids=packed_ids, position_ids=positions).logits
    torch.testing.assert_close(packed[:, :9], alone[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(packed[:, 9:], alone[1], atol=1e-4, rtol=1e-4)


def test_packed_training_learns(tiny_store, tmp_path):
    from qlora_ray.data import read_rows
    from qlora_ray.train.finetune import finetune

    base = tmp_path / "base"
    tiny_store.fetch("bases/tiny", base)
    rows = read_rows(str(UNITS / "train.jsonl")).rows
    spec = TrainSpec(max_steps=30, batch_size=2, seq_len=256, learning_rate=3e-3, lr_scheduler="constant",
                     gradient_checkpointing=False, checkpoint_every=1000, packing=True)
    metrics = finetune(spec, base, rows, None, tmp_path / "work").metrics
    assert metrics["tokens_seen"] > 30 * 2 * 100  # each 256-token sequence holds several rows
    assert metrics["final_loss"] < 0.6 * metrics["first_loss"]


def test_requests_no_node_can_meet_fail_at_once(tiny_job_store, tmp_path, fresh_local_ray):
    from qlora_ray.train.launch import train_job

    job = tiny_job(tmp_path, tiny_job_store, [
        {"id": "gpu", "train_data": str(UNITS / "train.jsonl"), "resources": {"num_gpus": 1}},
        {"id": "odd", "train_data": str(UNITS / "train.jsonl"), "resources": {"custom": {"fuse_node": 1}}},
    ])
    outcomes = {o.tenant: o for o in train_job(load_spec(job), progress=lambda _: None)}
    assert "asks for GPU 1 (largest node has 0)" in outcomes["gpu"].error
    assert "fuse_node 1 (largest node has 0)" in outcomes["odd"].error


def test_a_memory_store_is_refused_for_training(tmp_path):
    from qlora_ray.errors import UserError
    from qlora_ray.train.launch import train_job

    job = tiny_job(tmp_path, Store("memory://qlora-ray-train"), [{"id": "a", "train_data": str(UNITS / "train.jsonl")}])
    with pytest.raises(UserError, match="memory:// store lives in one process"):
        train_job(load_spec(job), progress=lambda _: None)


def test_a_checkpoint_whose_optimizer_state_is_a_pickle_is_refused_not_run(tiny_job_store, tmp_path, monkeypatch):
    """Resuming reads the Trainer's optimizer, scheduler and RNG states from the store. A booby-trapped
    optimizer.pt (someone with write access to the store) is refused by torch's weights-only loader;
    the tenant fails with a message naming the checkpoint, and the pickle never runs."""
    import qlora_ray.train.tenant as tenant_module
    from qlora_ray.errors import StoreError
    from qlora_ray.train.tenant import stage_data, train_tenant
    from tests.helpers import booby_trapped_pickle

    spec = load_spec(tiny_job(tmp_path, tiny_job_store, [{"id": "a", "train_data": str(DATES / "train.jsonl")}],
                              max_steps=4, checkpoint_every=2))
    stage_data(spec, spec.tenant("a"), tiny_job_store)
    monkeypatch.setattr(tenant_module, "_delete_checkpoints", lambda *args: None)  # keep them after publishing
    train_tenant(TrainOrder.of(spec, "a"))
    tiny_job_store.delete(adapter_key("t", "a"))
    (step,) = tiny_job_store.list_complete(checkpoint_key("t", "a"))
    key = f"{checkpoint_key('t', 'a')}/{step}"
    inputs = tiny_job_store.read_manifest(key)["inputs"]
    folder = tmp_path / "checkpoint"
    tiny_job_store.fetch(key, folder)
    assert (folder / "optimizer.pt").exists()
    sentinel = tmp_path / "pickle-ran"
    (folder / "optimizer.pt").write_bytes(booby_trapped_pickle(sentinel))
    tiny_job_store.delete(key)
    tiny_job_store.publish(key, folder, kind="checkpoint", inputs=inputs)

    with pytest.raises(StoreError, match=f"{step}: a trainer state file holds more than tensors"):
        train_tenant(TrainOrder.of(spec, "a"))
    assert not sentinel.exists(), "the pickle ran"
    assert not tiny_job_store.is_complete(adapter_key("t", "a"))
