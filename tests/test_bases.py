"""Base import: every source kind, the stored layout, and bad sources that publish nothing."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from qlora_ray.bases import _smollm2_gguf, import_base
from qlora_ray.errors import BaseSourceError, StoreError
from qlora_ray.store import Store

quiet = dict(progress=lambda _: None)


def stored_state_dict(store: Store, key: str, tmp_path) -> dict[str, torch.Tensor]:
    local = tmp_path / key.replace("/", "_")
    store.fetch(key, local)
    index = json.loads((local / "model.safetensors.index.json").read_text())
    state = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load_file(str(local / shard)))
    assert set(state) == set(index["weight_map"])  # the index covers exactly the tensors present
    return state


def test_tiny_shape_import_is_a_loadable_sharded_hf_folder(tiny_store, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = tiny_store.read_manifest("bases/tiny")
    assert manifest["metrics"]["shards"] == 3
    assert {f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)} <= set(manifest["files"])
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "chat_template.jinja"} <= set(manifest["files"])
    local = tmp_path / "tiny"
    tiny_store.fetch("bases/tiny", local)
    model = AutoModelForCausalLM.from_pretrained(str(local))
    tokenizer = AutoTokenizer.from_pretrained(str(local))
    assert model.dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) == manifest["metrics"]["parameters"]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_shape_import_is_deterministic(tiny_store, tmp_path):
    other = Store(str(tmp_path / "other"))
    import_base("shape:tiny", "tiny", other, shard_size="1MB", **quiet)
    assert other.read_manifest("bases/tiny")["metrics"]["shards"] == 1  # one shard still gets an index
    first, second = stored_state_dict(tiny_store, "bases/tiny", tmp_path), stored_state_dict(other, "bases/tiny", tmp_path)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_rerun_skips_and_a_different_source_is_refused(tiny_store):
    before = tiny_store.read_manifest("bases/tiny")
    assert import_base("shape:tiny", "tiny", tiny_store, **quiet) == before
    with pytest.raises(StoreError, match="already holds a base imported from 'shape:tiny'"):
        import_base("shape:smollm2-135m", "tiny", tiny_store, **quiet)


def test_hf_folder_import_round_trip(tiny_store, tmp_path):
    folder = tmp_path / "hf"
    tiny_store.fetch("bases/tiny", folder)
    for name in ("manifest.json", "_SUCCESS"):
        (folder / name).unlink(missing_ok=True)
    store = Store(str(tmp_path / "store"))
    manifest = import_base(str(folder), "copy", store, dtype="float32", **quiet)
    assert manifest["inputs"]["dtype"] == "float32"
    original = stored_state_dict(tiny_store, "bases/tiny", tmp_path)
    copy = stored_state_dict(store, "bases/copy", tmp_path)
    assert all(torch.equal(original[k].float(), copy[k]) for k in original)


def store_is_empty(store: Store) -> bool:
    return not store.fs.exists(store.path("bases")) or store.fs.ls(store.path("bases")) == []


@pytest.mark.parametrize(
    "make_source, expected",
    [
        (lambda d: str(d / "missing"), "no such file or folder"),
        (lambda d: (d / "model.txt").write_text("hello") and str(d / "model.txt"), "not a GGUF file"),
        (lambda d: (d / "fake.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64) and str(d / "fake.gguf"),
         "cannot load this GGUF as a causal LM"),
        (lambda d: (d / "empty").mkdir() or str(d / "empty"), "not a Hugging Face model folder (no config.json)"),
        ("pickle-only", "found pytorch_model.bin: pickle files are never loaded"),
        (lambda d: "shape:giant", "unknown shape; choose one of tiny, smollm2-135m, llama3-1b, llama3-8b"),
    ],
)
def test_bad_sources_publish_nothing(tmp_path, make_source, expected):
    if make_source == "pickle-only":
        (tmp_path / "pickled").mkdir()
        (tmp_path / "pickled" / "config.json").write_text("{}")
        (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not even loaded")
        source = str(tmp_path / "pickled")
    else:
        source = make_source(tmp_path)
    store = Store(str(tmp_path / "store"))
    with pytest.raises(BaseSourceError, match=re.escape(expected)):
        import_base(source, "b", store, **quiet)
    assert store_is_empty(store)


def test_truncated_gguf_is_refused(tmp_path):
    truncated = tmp_path / "truncated.gguf"
    with open(_smollm2_gguf(), "rb") as handle:
        truncated.write_bytes(handle.read(2_000_000))
    store = Store(str(tmp_path / "store"))
    with pytest.raises(BaseSourceError, match="cannot load this GGUF"):
        import_base(str(truncated), "b", store, **quiet)
    assert store_is_empty(store)


def test_bad_dtype_and_shard_size(tmp_path):
    store = Store(str(tmp_path / "store"))
    with pytest.raises(BaseSourceError, match="dtype must be one of"):
        import_base("shape:tiny", "b", store, dtype="int8", **quiet)
    with pytest.raises(BaseSourceError, match="shard size: expected a size"):
        import_base("shape:tiny", "b", store, shard_size="huge", **quiet)


@pytest.mark.slow
def test_smollm2_import_gives_the_same_greedy_text_as_the_gguf(smollm2_store, tmp_path):
    """The default base: dequantized from the GGUF, stored as bf16 shards, generates exactly as the GGUF does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = smollm2_store.read_manifest("bases/smollm2-135m")
    assert manifest["metrics"]["parameters"] == 134_515_008 and manifest["metrics"]["shards"] == 3
    local = tmp_path / "smollm2"
    smollm2_store.fetch("bases/smollm2-135m", local)
    gguf = _smollm2_gguf()
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    imported = AutoModelForCausalLM.from_pretrained(str(local), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(local))
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    for prompt in ["What is the capital of France? Answer in one sentence.", "Write a short sentence about cats."]:
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        texts = []
        for model in (reference, imported):
            out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
            texts.append(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
        assert texts[0] == texts[1]
        assert len(texts[0]) > 10
    # the copy in the store is independent of the package file
    shutil.rmtree(local)
