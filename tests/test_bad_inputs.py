"""The bad-input corpus: each case is one malformed or hostile input given to the CLI as a user would.

Every case must end in exit code 1 with one message that names the problem (no traceback: anything
but a UserError escapes `main` and fails the test), and must leave the store byte for byte as it
was. Job files, data files, adapters, base sources and stores; the serve API's bad requests (absurd
max_tokens, prompts longer than the context, malformed bodies) are in test_serve.py. docs/reliability.md
lists the whole corpus.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

from qlora_ray.bases import _smollm2_gguf
from qlora_ray.cli import main
from qlora_ray.manifest import sha256_file
from qlora_ray.store import Store, adapter_key, api_keys_key
from tests.conftest import REPO, free_port
from tests.helpers import booby_trapped_pickle, forge_manifest, stored_file

DATES = REPO / "jobs" / "data" / "dates" / "train.jsonl"


@dataclass
class Ctx:
    """What a case builds its input in: a scratch folder, the store (a copy of bases/tiny), pytest's monkeypatch."""

    tmp: Path
    store: Store
    monkeypatch: pytest.MonkeyPatch

    def job(self, **changes) -> str:
        """A valid job file on the store, with `changes` applied at the top level; returns its path."""
        job = {"name": "j", "store": self.store.uri, "base": {"name": "tiny", "source": "shape:tiny"},
               "tenants": [{"id": "a", "train_data": str(DATES)}], "fuse": {"schemes": ["bf16"]}}
        job.update(changes)
        return self.write("job.yaml", yaml.safe_dump(job))

    def write(self, name: str, content: str | bytes) -> str:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)

    def data_job(self, content: str | bytes, name: str = "train.jsonl") -> list[str]:
        """`qlora-ray run` on a job whose only tenant trains on this data file."""
        return ["run", self.job(tenants=[{"id": "a", "train_data": self.write(name, content)}])]

    def adapter_job(self, edit: Callable[[Path], None]) -> list[str]:
        """`qlora-ray fuse` on a job whose tenant's adapter, published to the store, was edited first."""
        self.store.publish(adapter_key("j", "a"), _lora_adapter(self.store, self.tmp, edit), kind="adapter", inputs={})
        return ["fuse", self.job()]

    def tampered_adapter_job(self, tamper: Callable[[Store, str], None]) -> list[str]:
        """`qlora-ray fuse` on a job whose tenant's adapter was published, then tampered with in the store."""
        args = self.adapter_job(lambda folder: None)
        tamper(self.store, adapter_key("j", "a"))
        return args


@dataclass(frozen=True)
class Case:
    id: str
    args: Callable[[Ctx], list[str]]
    expected: str


def _lora_adapter(store: Store, tmp: Path, edit: Callable[[Path], None]) -> Path:
    """A peft LoRA adapter for bases/tiny (rank 4 on q_proj and v_proj), edited by `edit`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = tmp / "base"
    store.fetch("bases/tiny", base)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    folder = tmp / "adapter"
    model.save_pretrained(str(folder))
    edit(folder)
    return folder


def _rewrite_tensors(folder: Path, change: Callable[[dict], dict]) -> None:
    from safetensors.torch import load_file, save_file

    weights = folder / "adapter_model.safetensors"
    save_file(change(load_file(str(weights))), str(weights))


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _pickle_only(folder: Path) -> None:
    """adapter_model.bin instead of safetensors, holding a pickle that would create a file if unpickled."""
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(booby_trapped_pickle(folder.parent / "pickle-ran"))


def _forged_safetensors(header_length: int, payload: bytes = b"{}") -> bytes:
    return struct.pack("<Q", header_length) + payload


def _hf_folder(ctx: Ctx, weights: Callable[[bytes], bytes] | None, extra: dict[str, bytes] | None = None) -> str:
    """bases/tiny's files as a local HF folder, its single weights file passed through `weights` (None: removed)."""
    folder = ctx.tmp / "hf"
    ctx.store.fetch("bases/tiny", folder)
    shards = sorted(folder.glob("*.safetensors"))
    (folder / "model.safetensors.index.json").unlink()
    first = shards[0].read_bytes()
    for shard in shards:
        shard.unlink()
    if weights is not None:
        (folder / "model.safetensors").write_bytes(weights(first))
    for name, content in (extra or {}).items():
        (folder / name).write_bytes(content)
    return str(folder)


def _base_import(source: str, ctx: Ctx) -> list[str]:
    return ["base", "import", source, "--name", "b", "--store", ctx.store.uri]


def _huge_data(ctx: Ctx) -> list[str]:
    import qlora_ray.data as data

    ctx.monkeypatch.setattr(data, "MAX_DATA_BYTES", 1000)  # the real limit is 2 GiB: too big to write in a test
    return ctx.data_job(DATES.read_text())


def _manifest_lists(name: str) -> Callable[[Store, str], None]:
    """A tamper that adds a file name to the adapter's manifest (keeping it vouched for)."""
    return lambda store, key: forge_manifest(store, key, lambda m: {
        **m, "files": {**m["files"], name: {"sha256": "0" * 64, "size": 1}}})


def _safetensors_gone_pickle_beside(ctx: Ctx) -> list[str]:
    """A lifecycle rule (or an operator) removed the weights; someone put a pickle beside them."""
    def tamper(store: Store, key: str) -> None:
        weights = stored_file(store, key, "adapter_model.safetensors")
        store.fs.rm_file(weights)
        store.fs.pipe_file(weights.replace(".safetensors", ".bin"), booby_trapped_pickle(ctx.tmp / "pickle-ran"))

    return ctx.tampered_adapter_job(tamper)


def _damaged_key_record(ctx: Ctx) -> list[str]:
    ctx.store.fs.makedirs(ctx.store.path("runs/j/serve"), exist_ok=True)
    ctx.store.fs.pipe_file(ctx.store.path(api_keys_key("j")), b'{"keys": "everyone\'s keys, cut short')
    return ["keys", ctx.job(), "a"]


def _unreachable_store(ctx: Ctx) -> list[str]:
    dead = f"http://127.0.0.1:{free_port()}"
    return ["run", ctx.job(store="s3://some-bucket/x", storage_options={
        "client_kwargs": {"endpoint_url": dead}, "config_kwargs": {"retries": {"max_attempts": 1}},
        "key": "corpus-key", "secret": "corpus-secret-never-shown"})]


GOOD_ROW = json.dumps({"prompt": "p", "completion": "c"})

CASES = [
    # -- job files (`qlora-ray run`: nothing may start, nothing may be written)
    Case("yaml-syntax", lambda c: ["run", c.write("job.yaml", "name: [unclosed\n")], "not valid YAML"),
    Case("yaml-python-tag", lambda c: ["run", c.write("job.yaml", "!!python/object/apply:os.system ['touch pwned']\n")],
         "not valid YAML"),
    Case("yaml-not-a-mapping", lambda c: ["run", c.write("job.yaml", "- a\n- b\n")], "expected a mapping of job settings"),
    Case("yaml-empty", lambda c: ["run", c.write("job.yaml", "")], "expected a mapping of job settings"),
    Case("yaml-not-utf8", lambda c: ["run", c.write("job.yaml", b"name: \xff\xfe\n")], "UTF-8"),
    Case("wrong-type", lambda c: ["run", c.job(train={"lora": {"r": "eight"}})], "train.lora.r"),
    Case("unknown-field", lambda c: ["run", c.job(tenats=[])], "tenats: unknown field"),
    Case("tenant-id-traversal", lambda c: ["run", c.job(tenants=[{"id": "../b", "train_data": str(DATES)}])],
         "tenants[0].id: must be lower-case"),
    Case("tenant-id-slash", lambda c: ["run", c.job(tenants=[{"id": "a/../../b", "train_data": str(DATES)}])],
         "tenants[0].id: must be lower-case"),
    Case("job-name-traversal", lambda c: ["run", c.job(name="../other-job")], "name: must be lower-case"),
    Case("tenant-id-newline", lambda c: ["run", c.job(tenants=[{"id": "a\n", "train_data": str(DATES)}])],
         "tenants[0].id: must be lower-case"),
    Case("job-name-newline", lambda c: ["run", c.job(name="j\n")], "name: must be lower-case"),
    Case("base-source-url", lambda c: ["run", c.job(base={"name": "b", "source": "https://example.invalid/m.gguf"})],
         "base.source: a base source is a local file or folder"),
    Case("duplicate-tenant-ids", lambda c: ["run", c.job(tenants=[{"id": "a", "train_data": str(DATES)}] * 2)],
         "tenant id 'a' is used by tenants[0] and tenants[1]"),
    Case("unknown-scheme", lambda c: ["run", c.job(fuse={"schemes": ["int3"]})], "fuse.schemes"),
    Case("conflict-merge-base", lambda c: ["run", c.job(train={"quantization": "none"}, fuse={"merge_base": "nf4-dequantized"})],
         "nf4-dequantized needs a QLoRA tenant"),
    Case("conflict-steps-and-epochs", lambda c: ["run", c.job(train={"max_steps": 5, "epochs": 1.0})],
         "give max_steps or epochs, not both"),
    Case("conflict-replicas", lambda c: ["run", c.job(serve={"num_replicas": 3, "max_replicas": 2})],
         "max_replicas (2) is below num_replicas (3)"),
    # -- tenant data files
    Case("data-missing", lambda c: ["run", c.job(tenants=[{"id": "a", "train_data": str(c.tmp / "nowhere.jsonl")}])],
         "nowhere.jsonl: data file not found"),
    Case("data-empty", lambda c: c.data_job(""), "no rows (the file is empty)"),
    Case("data-not-utf8", lambda c: c.data_job(b'{"prompt": "caf\xe9", "completion": "x"}\n'), "train.jsonl:1: not UTF-8"),
    Case("data-csv", lambda c: c.data_job("prompt,completion\nhi,there\n", "train.csv"), "train.csv:1: not valid JSON"),
    Case("data-json-array", lambda c: c.data_job(json.dumps([{"prompt": "p", "completion": "c"}])),
         "expected a JSON object per line (got list)"),
    Case("data-missing-field", lambda c: c.data_job(GOOD_ROW + '\n{"prompt": "p"}\n'),
         "train.jsonl:2: a prompt-completion row needs both"),
    Case("data-binary", lambda c: c.data_job(bytes(range(256)) * 4, "train.bin"), "not UTF-8"),
    Case("data-huge", _huge_data, "larger than the 1,000-byte limit"),
    # -- stores
    Case("store-unreachable", _unreachable_store, "cannot reach the store"),
    Case("store-unknown-protocol", lambda c: ["run", c.job(store="nosuch://bucket/x")], "store: unsupported scheme 'nosuch'"),
    Case("store-ftp", lambda c: ["validate", c.job(store="ftp://nowhere.invalid/x")], "store: unsupported scheme 'ftp'"),
    Case("data-ftp", lambda c: ["run", c.job(tenants=[{"id": "a", "train_data": "ftp://nowhere.invalid/t.jsonl"}])],
         "tenants[0].train_data: unsupported scheme 'ftp'"),
    Case("keys-damaged-record", _damaged_key_record, "api-keys.json: the record is damaged"),
    # -- adapters put in the store by hand (`qlora-ray fuse`: the tenant fails by name, nothing is published)
    Case("adapter-wrong-shapes", lambda c: c.adapter_job(lambda f: _rewrite_tensors(
        f, lambda t: {k: v[:, :-1].contiguous() if "lora_A" in k else v for k, v in t.items()})), "does not fit base tiny"),
    Case("adapter-wrong-targets", lambda c: c.adapter_job(lambda f: _rewrite_tensors(
        f, lambda t: {k.replace("q_proj", "qq_proj"): v for k, v in t.items()})), "qq_proj"),
    Case("adapter-wrong-rank", lambda c: c.adapter_job(lambda f: _edit_config(f, r=8)),
         "factor rank 4 does not match the config's r=8"),
    Case("adapter-pickle-bin", lambda c: c.adapter_job(_pickle_only), "pickle files are never loaded"),
    Case("adapter-truncated-safetensors", lambda c: c.adapter_job(lambda f: (f / "adapter_model.safetensors").write_bytes(
        (f / "adapter_model.safetensors").read_bytes()[:300])), "adapter_model.safetensors: not a readable safetensors file"),
    Case("adapter-forged-header", lambda c: c.adapter_job(lambda f: (f / "adapter_model.safetensors").write_bytes(
        _forged_safetensors(2**62))), "adapter_model.safetensors: not a readable safetensors file"),
    Case("adapter-config-not-json", lambda c: c.adapter_job(lambda f: (f / "adapter_config.json").write_text("{r: 4")),
         "adapter_config.json: not valid JSON"),
    Case("adapter-not-lora", lambda c: c.adapter_job(lambda f: _edit_config(f, peft_type="IA3")),
         "only LoRA adapters can be fused"),
    # -- adapters whose manifest or files were tampered with in the store (`qlora-ray fuse`)
    Case("adapter-manifest-absolute-name", lambda c: c.tampered_adapter_job(_manifest_lists(str(c.tmp / "escaped"))),
         "the manifest lists a file name that is absolute"),
    Case("adapter-manifest-climbs-out", lambda c: c.tampered_adapter_job(_manifest_lists("../../../escaped")),
         "the manifest lists a file name that holds an empty, '.' or '..' segment"),
    Case("adapter-manifest-backslash", lambda c: c.tampered_adapter_job(_manifest_lists("..\\escaped")),
         "the manifest lists a file name that holds a backslash"),
    Case("adapter-weights-gone-pickle-beside", _safetensors_gone_pickle_beside,
         "adapter_model.safetensors: missing, though the manifest lists it (damaged); republish the artifact"),
    # -- base sources (`qlora-ray base import`)
    Case("gguf-truncated", lambda c: _base_import(c.write("cut.gguf", _smollm2_gguf().read_bytes()[:2_000_000]), c),
         "cannot load this GGUF as a causal LM"),
    Case("gguf-forged", lambda c: _base_import(c.write("fake.gguf", b"GGUF" + struct.pack("<I", 3) + b"\xff" * 64), c),
         "cannot load this GGUF as a causal LM"),
    Case("gguf-not-gguf", lambda c: _base_import(c.write("model.gguf", "just text"), c), "not a GGUF file"),
    Case("hf-pickle-only", lambda c: _base_import(_hf_folder(c, None, {"pytorch_model.bin": booby_trapped_pickle(c.tmp / "pickle-ran")}), c),
         "pickle files are never loaded"),
    Case("hf-truncated-safetensors", lambda c: _base_import(_hf_folder(c, lambda b: b[: len(b) // 2]), c), "cannot load as a causal LM"),
    Case("hf-forged-safetensors-and-pickle", lambda c: _base_import(_hf_folder(
        c, lambda b: _forged_safetensors(2**62), {"pytorch_model.bin": booby_trapped_pickle(c.tmp / "pickle-ran")}), c),
         "cannot load as a causal LM"),
    Case("unknown-shape", lambda c: _base_import("shape:giant", c), "unknown shape"),
]


def _snapshot(store: Store) -> dict[str, str]:
    root = Path(store.path(""))
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_bad_input_is_named_and_changes_nothing(case, tiny_job_store, tmp_path, monkeypatch, capsys):
    ctx = Ctx(tmp_path / "input", tiny_job_store, monkeypatch)
    ctx.tmp.mkdir()
    args = case.args(ctx)
    before = _snapshot(tiny_job_store)
    capsys.readouterr()
    assert main(args) == 1
    output = capsys.readouterr()
    said = output.out + output.err
    assert case.expected in said, said
    assert "Traceback" not in said
    assert _snapshot(tiny_job_store) == before
    assert not (tmp_path / "input" / "pickle-ran").exists(), "a pickle was unpickled"
    assert not list(tmp_path.rglob("escaped*")), "a file was written outside its folder"
    assert "corpus-secret-never-shown" not in said

