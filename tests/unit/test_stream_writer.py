"""The walk's shard writer: files written beside the walk, failures raised to the walk, nothing left behind."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora_ray.bases import INDEX_NAME
from qlora_ray.fuse.gptq_stream import StreamTenant
from qlora_ray.fuse.worker import _StreamWriter

QUANTIZED = frozenset({"layers.0.proj.weight", "layers.1.proj.weight"})


class _Store:
    """Keeps each uploaded part's bytes; can be told to fail, or to wait, on a shard."""

    def __init__(self, fail: str | None = None, hold: threading.Event | None = None):
        self.parts: dict[tuple[str, str], bytes] = {}
        self.fail, self.hold = fail, hold

    def put_part(self, draft: str, rel: str, path: Path) -> dict:
        if self.hold is not None:
            self.hold.wait(10)
        if rel == self.fail:
            raise OSError(f"the store refused {rel}")
        self.parts[(draft, rel)] = path.read_bytes()
        return {"sha256": "x", "size": path.stat().st_size}


def _writer(tmp_path: Path, store: _Store) -> tuple[_StreamWriter, dict]:
    base = tmp_path / "base"
    base.mkdir()
    save_file({"layers.0.proj.weight": torch.ones(4, 4), "norm.weight": torch.ones(4)}, str(base / "a.safetensors"))
    save_file({"layers.1.proj.weight": torch.ones(4, 4)}, str(base / "b.safetensors"))
    (base / INDEX_NAME).write_text(json.dumps({"weight_map": {"layers.0.proj.weight": "a.safetensors",
                                                              "norm.weight": "a.safetensors",
                                                              "layers.1.proj.weight": "b.safetensors"}}))
    worker = SimpleNamespace(quantized=QUANTIZED, device="cpu", store=store)
    unit = SimpleNamespace(drafts={"acme/gptq": "draft-acme"})
    parts: dict = {"acme/gptq": {}}
    writer = _StreamWriter(worker, unit, [StreamTenant("acme", {}, [])], {"acme": "acme/gptq"}, base, parts,
                           tmp_path / "out")
    return writer, parts


def _read(data: bytes, tmp_path: Path) -> dict:
    path = tmp_path / "check.safetensors"
    path.write_bytes(data)
    return load_file(str(path))


def _layer(index: int) -> dict:
    return {"acme": {f"layers.{index}.proj.qweight": torch.full((1, 4), index, dtype=torch.int32)}}


def _walk_both_layers(writer: _StreamWriter) -> None:
    """What the walk does: each layer's tensors handed over as it is done, then the end awaited."""
    try:
        for index, seconds in ((0, 1.5), (1, 2.0)):
            writer.add(_layer(index), {"acme": seconds})
            writer.write_ready()
        writer.finish()
    finally:
        writer.close()


def test_each_shard_is_written_once_its_weights_are_quantized(tmp_path):
    store = _Store()
    writer, parts = _writer(tmp_path, store)
    _walk_both_layers(writer)
    assert sorted(parts["acme/gptq"]) == ["a.safetensors", "b.safetensors"]
    assert parts["acme/gptq"]["a.safetensors"]["tensors"] == ["layers.0.proj.qweight", "norm.weight"]
    assert parts["acme/gptq"]["a.safetensors"]["seconds"] >= 1.5  # the walk's seconds for it, and its writing
    written = _read(store.parts[("draft-acme", "b.safetensors")], tmp_path)
    assert torch.equal(written["layers.1.proj.qweight"], torch.full((1, 4), 1, dtype=torch.int32))
    assert not list((tmp_path / "out").rglob("*.safetensors"))  # each local file went once uploaded


def test_the_walk_goes_on_while_a_shard_is_written(tmp_path):
    hold = threading.Event()
    writer, parts = _writer(tmp_path, _Store(hold=hold))
    try:
        writer.add(_layer(0), {"acme": 0.0})
        writer.write_ready()  # returns with the upload still held
        assert parts["acme/gptq"] == {}
        hold.set()
        writer.add(_layer(1), {"acme": 0.0})
        writer.write_ready()
        writer.finish()
    finally:
        writer.close()
    assert sorted(parts["acme/gptq"]) == ["a.safetensors", "b.safetensors"]


def test_a_failed_upload_reaches_the_walk(tmp_path):
    writer, _ = _writer(tmp_path, _Store(fail="a.safetensors"))
    with pytest.raises(OSError, match="refused a.safetensors"):  # at the next hand-over, or at the end
        _walk_both_layers(writer)


def test_a_shard_the_walk_never_finished_is_an_error(tmp_path):
    writer, _ = _writer(tmp_path, _Store())
    try:
        writer.add(_layer(0), {"acme": 0.0})
        writer.write_ready()
        with pytest.raises(ValueError, match="b.safetensors"):
            writer.finish()
    finally:
        writer.close()
