"""Builders shared by several test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import string
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import psutil
import torch
import yaml

from qlora_ray.cluster import serve_throughput_defaults
from qlora_ray.spec import load_spec
from qlora_ray.store import Store, adapter_key, data_key, fused_key
from tests.conftest import REPO, free_port

DATES = REPO / "jobs" / "data" / "dates"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def forge_manifest(store: Store, key: str, change: Callable[[dict], dict]) -> None:
    """Rewrite a complete artifact's manifest by hand, and its _SUCCESS to vouch for it, as someone
    with write access to the store could: the artifact still reads as complete."""
    marker = json.loads(store.fs.cat_file(store.path(f"{key}/_SUCCESS")))
    folder = f"{key}/{marker['version']}" if marker.get("version") else key
    manifest = change(json.loads(store.fs.cat_file(store.path(f"{folder}/manifest.json"))))
    manifest_bytes = json.dumps(manifest).encode()
    store.fs.pipe_file(store.path(f"{folder}/manifest.json"), manifest_bytes)
    store.fs.pipe_file(store.path(f"{key}/_SUCCESS"),
                       json.dumps({**marker, "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest()}).encode())


def stored_file(store: Store, key: str, rel: str) -> str:
    """The store path of one file of a complete artifact (inside its sealed version)."""
    marker = json.loads(store.fs.cat_file(store.path(f"{key}/_SUCCESS")))
    folder = f"{key}/{marker['version']}" if marker.get("version") else key
    return store.path(f"{folder}/{rel}")


# -- artifacts and adapters
def versions(store: Store, key: str) -> list[str]:
    """The version folders at key (sealed or not)."""
    try:
        entries = store.fs.ls(store.path(key), detail=False, refresh=True)
    except FileNotFoundError:
        return []
    return sorted(name for name in (e.rstrip("/").rsplit("/", 1)[-1] for e in entries) if name.startswith("v"))


def make_artifact(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"hidden_size": 64}))
    (root / "weights").mkdir(exist_ok=True)
    (root / "weights" / "shard-1.bin").write_bytes(os.urandom(300_000))
    (root / "weights" / "shard-2.bin").write_bytes(os.urandom(1000))
    return root


def base_dir_of(store: Store, tmp_path: Path, name: str = "tiny") -> Path:
    local = tmp_path / f"base-{name}"
    store.fetch(f"bases/{name}", local)
    return local


def publish_adapter(store: Store, tenant: str, base_dir: Path, tmp_path: Path, *, seed: int,
                    model=None, **lora) -> Path:
    """A peft adapter with random A and B factors, published as runs/t/adapters/<tenant>, plus its data."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = model or AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(target_modules=lora.pop("target_modules", TARGETS), **lora))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    folder = tmp_path / f"adapter-{tenant}"
    peft_model.save_pretrained(str(folder))
    store.publish(adapter_key("t", tenant), folder, kind="adapter", inputs={"training_fingerprint": tenant})
    data = tmp_path / f"data-{tenant}"
    data.mkdir()
    (data / "train.jsonl").write_text((DATES / "train.jsonl").read_text())
    store.publish(data_key("t", tenant), data, kind="data", inputs={"train_sha256": "x"})
    return folder


def fuse_spec(tmp_path: Path, store: Store, tenants: list[str], **fuse):
    job = {
        "name": "t", "store": store.uri,
        "base": {"name": "tiny", "source": "shape:tiny"},
        "tenants": [{"id": t, "train_data": str(DATES / "train.jsonl")} for t in tenants],
        "fuse": {"schemes": ["bf16", "nf4"], "merge_base": "original", "workers": 2,
                 "resources": {"num_cpus": 1}, **fuse},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return load_spec(path)


# -- hostile files
class PickleTrap:
    """Unpickling it opens (creates) the sentinel file: proof that a pickle was loaded."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (str(self.sentinel), "w"))


def booby_trapped_pickle(sentinel: Path) -> bytes:
    return pickle.dumps(PickleTrap(sentinel))


def set_verdict(store: Store, job: str, tenant: str, variant: str, passed: bool, reasons: list[str]) -> None:
    """Replace the job's verdict on one fused model, the others kept, as the eval stage would after
    judging it (the verdict names the artifact's current manifest)."""
    from qlora_ray.manifest import manifest_digest
    from qlora_ray.quality.verdicts import VERDICTS_FILE, read_verdicts
    from qlora_ray.store import verdicts_key

    key = fused_key(job, tenant, variant)
    verdicts = {**read_verdicts(store, job).by_model, f"{tenant}/{variant}": {
        "passed": passed, "reasons": reasons, "default_for_scheme": False,
        "fused": {"key": key, "manifest_sha256": manifest_digest(store.read_manifest(key))}}}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / VERDICTS_FILE).write_text(json.dumps(verdicts))
        store.replace(verdicts_key(job), Path(tmp), kind="eval-verdicts", inputs={})


# -- clusters
def kill_node(cluster, node) -> None:
    """Kill a node as a machine dies: every process at once. `remove_node` kills the raylet alone, and a
    worker notices its raylet's death only later, so on a loaded machine the replica could finish what
    it was serving (or training, or fusing) first."""
    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    for process in raylet.children(recursive=True):
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    cluster.remove_node(node, allow_graceful=False)


# -- serving
def process_title(process: psutil.Process) -> str:
    """The actor a Ray worker process runs, e.g. ray::ServeReplica:load:fused, from its process title
    (which names the method running too, after a dot); "" for a process already gone."""
    try:
        return (process.cmdline() or [""])[0].split(" ")[0].split(".")[0]
    except psutil.Error:
        return ""


STEP_SECONDS = 0.02  # each decode step of SlowCountingEngine
MODEL = "acme/bf16.original"  # the model the fake-engine Serve tests publish


class SlowCountingEngine:
    """Each token the next letter of the alphabet after the last one, in the byte tokenizer's ids;
    every decode step takes STEP_SECONDS whatever the batch, as a memory-bound GPU step does."""

    continuous, device, stop_ids, context = True, torch.device("cpu"), set(), 4096

    def __init__(self, max_batch: int):
        from qlora_ray.shapes import byte_tokenizer

        self.max_batch = max_batch
        self.letters = byte_tokenizer()(string.ascii_lowercase, add_special_tokens=False)["input_ids"]

    def prefill(self, slots, chunks, starts):
        return torch.stack([self._logits_after(chunk[-1]) for chunk in chunks])

    def decode(self, slots, tokens):
        time.sleep(STEP_SECONDS)
        return torch.stack([self._logits_after(int(token)) for token in tokens])

    def release(self, slot):
        pass

    def _logits_after(self, token: int) -> torch.Tensor:
        logits = torch.zeros(259)
        following = (self.letters.index(token) + 1) % 26 if token in self.letters else 0
        logits[self.letters[following]] = 1e4  # sampled or not: every token is one letter of text
        return logits


def fake_loader(spec, store, entry, device):
    from qlora_ray.serve.loading import LoadedModel
    from qlora_ray.shapes import byte_tokenizer

    return LoadedModel(entry, SlowCountingEngine(spec.serve.max_batch), byte_tokenizer(), 0, 0.0, spec.serve)


@contextlib.contextmanager
def fake_engine_app(store: Store, tmp_path: Path, tenants: list[str], loader, serve_settings: dict,
                    storage_options: dict | None = None) -> Iterator[tuple[str, object]]:
    """The whole Serve app on a local Ray, every tenant's bf16.original model served by `loader` (an
    injected engine): only a placeholder artifact is published, since the loader reads nothing.
    Yields (the server's base URL, the job spec); keys are key-<tenant>."""
    import ray
    from ray import serve

    from qlora_ray.serve.app import build_application

    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "config.json").write_text("{}")  # what the catalog sees
    for tenant in tenants:
        store.publish(fused_key("t", tenant, "bf16.original"), artifact, kind="fused", inputs={})
    port = free_port()
    job = {"name": "t", "store": store.uri, "storage_options": storage_options or {},
           "base": {"name": "b", "source": "shape:tiny"},
           "tenants": [{"id": t, "train_data": str(DATES / "train.jsonl")} for t in tenants],
           "fuse": {"schemes": ["bf16"]},
           "serve": {"port": port, "unmerged_baseline": False, "resources": {"num_cpus": 1}, **serve_settings}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    spec = load_spec(path)
    with serve_throughput_defaults():  # Serve as `qlora-ray serve` and `bench` start it
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    for module in {loader.__module__, __name__}:  # replicas need no tests package
        ray.cloudpickle.register_pickle_by_value(sys.modules[module])
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_application(spec, {f"key-{t}": t for t in tenants}, loader=loader), name="t", route_prefix="/")
        yield f"http://127.0.0.1:{port}", spec
    finally:
        serve.shutdown()
        ray.shutdown()
