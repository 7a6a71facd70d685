"""Model switches without a rebuild: a host-memory tier of models' weights, and engines reused across
the models of one shape.

Building a StaticEngine on CUDA compiles its layers and captures its CUDA graphs, tens of seconds a
model; the fused models of one base and scheme differ only in their weights' values. So:
- an evicted model's engine is kept as a spare, and the next model of the same signature (its
  config, and its weight tensors' names, shapes and dtypes) is copied into it. Its compiled code
  and CUDA graphs read those very tensors, so they serve the new model as they are;
- each model's weights, as its engine holds them (repacked for its kernels), are kept in host
  memory (pinned on CUDA) up to serve.host_memory, least recently used leaving first: a switch back
  to such a model is one copy from the host into a spare engine.
A spare holds device memory that the residency (residency.py) counts as free, but only from the
eviction that made it to the end of the load that follows: that load takes the spare it can use
(letting the others go first where the device lacks room for it beside them), and the residency
settles after each load, and before a load waits, letting go of every spare left.
"""

from __future__ import annotations

import gc
import itertools
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

# Config entries that name or date a model folder without changing its computation.
_CONFIG_NOT_COMPUTED = ("_name_or_path", "transformers_version")


def weight_tensors(decoder: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Every weight tensor of a decoder (parameters and buffers: not its KV cache), by name; None
    when one is not a plain tensor (bitsandbytes' 4-bit weights carry a quantization state beside
    them, which a copy of the tensor would miss)."""
    tensors = {}
    for name, tensor in itertools.chain(decoder.named_parameters(), decoder.named_buffers()):
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
            return None
        tensors[name] = tensor
    return tensors


def signature(decoder: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> str:
    """What two decoders must share for one's weights to be copied into the other: the computation
    (the config, less what only names the folder) and every tensor's name, shape and dtype."""
    config = {k: v for k, v in decoder.config.to_dict().items() if k not in _CONFIG_NOT_COMPUTED}
    layout = [(name, list(t.shape), str(t.dtype)) for name, t in tensors.items()]
    return json.dumps([config, layout], sort_keys=True, default=str)


def copy_weights(target: dict[str, torch.Tensor], source: dict[str, torch.Tensor]) -> None:
    """Copy `source` into `target` in place (same names, shapes and dtypes: see signature)."""
    if target.keys() != source.keys():
        raise ValueError("the weights to copy do not match the engine's tensors")
    with torch.inference_mode():
        for name, tensor in target.items():
            tensor.copy_(source[name], non_blocking=True)
    devices = {t.device for t in target.values() if t.device.type == "cuda"}
    for device in devices:
        torch.cuda.synchronize(device)


def _storage_key(tensor: torch.Tensor) -> tuple:
    """Tensors with one key are one (tied embeddings: two parameters, one storage)."""
    return tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride()


def host_copy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors in host memory: pinned when they live on a GPU, so that copying them back runs at
    the bus's speed. Tensors that are one get one copy."""
    copies, by_key = {}, {}
    for name, tensor in tensors.items():
        key = _storage_key(tensor)
        if key not in by_key:
            copy = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=tensor.device.type == "cuda")
            by_key[key] = copy.copy_(tensor)
        copies[name] = by_key[key]
    return copies


def host_bytes(tensors: dict[str, torch.Tensor], *, pinned: bool) -> int:
    """What host_copy's copies of these tensors hold; `pinned`: as torch's pinned-memory allocator
    rounds each block up, to a power of two."""
    sizes = {_storage_key(t): t.nbytes for t in tensors.values()}.values()
    return sum(1 << max(size - 1, 0).bit_length() if pinned else size for size in sizes)


@dataclass
class HostImage:
    """A model as a switch back to it needs it: its weights in host memory (nbytes of it), and its
    tokenizer."""

    signature: str
    tensors: dict[str, torch.Tensor]
    nbytes: int
    tokenizer: Any
    stop_ids: set[int]
    resident_bytes: int


class HostTier:
    """Models' host images within a byte budget, least recently used leaving first. Thread-safe:
    loads and releases run on threads."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._images: OrderedDict[str, HostImage] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, model_id: str) -> HostImage | None:
        with self._lock:
            image = self._images.get(model_id)
            if image is not None:
                self._images.move_to_end(model_id)
            return image

    def fits(self, nbytes: int) -> bool:
        return 0 < nbytes <= self.budget_bytes

    def put(self, model_id: str, image: HostImage) -> None:
        """Keep the image, the least recently used ones leaving to make room (none if it cannot fit)."""
        if not self.fits(image.nbytes):
            return
        with self._lock:
            self._images.pop(model_id, None)
            while self._images and self._nbytes() + image.nbytes > self.budget_bytes:
                gone, _ = self._images.popitem(last=False)
                log.info("host tier: dropped %s (least recently used)", gone)
            self._images[model_id] = image

    def _nbytes(self) -> int:
        return sum(image.nbytes for image in self._images.values())

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._images)


@dataclass
class Spare:
    """An evicted model's engine, kept for the next model of its signature: resident_bytes of device
    memory (weights and KV cache)."""

    signature: str
    engine: Any
    resident_bytes: int


class SpareEngines:
    """The engines of evicted models, until the next load takes one or lets them go."""

    def __init__(self) -> None:
        self._spares: list[Spare] = []
        self._lock = threading.Lock()

    def keep(self, spare: Spare) -> None:
        with self._lock:
            self._spares.append(spare)

    def take(self, wanted: str | None) -> Any:
        """The engine of signature `wanted`, if one is spare; every other spare is let go (its memory
        freed), so that the load that follows finds the memory the residency counted on."""
        with self._lock:
            spares, self._spares = self._spares, []
        match = next((s.engine for s in spares if wanted is not None and s.signature == wanted), None)
        dropped = len(spares) - (match is not None)
        if dropped:
            devices = {s.engine.device for s in spares if s.engine is not match}
            spares.clear()
            free_memory(devices)
        return match

    def resident_bytes(self) -> int:
        with self._lock:
            return max((spare.resident_bytes for spare in self._spares), default=0)


def free_memory(devices) -> None:
    """Return what the dropped engines held: their tensors sit in reference cycles (modules, captured
    graphs), and CUDA keeps freed blocks cached."""
    gc.collect()
    if any(getattr(device, "type", device) == "cuda" for device in devices):
        torch.cuda.empty_cache()


class ModelSwitcher:
    """A replica's loader, releaser and settler (residency.ResidentModels' load, release and settle)
    through the host tier and the spare engines; the unmerged baseline and models transformers
    serves are loaded and freed as loading.load_model does. Host images are kept per artifact
    version (ModelEntry.version): a model fused again is loaded again."""

    # Room a load from the store needs beside the spares it may copy into: what a spare of its shape
    # holds, or its artifact's size with this margin; with less room the spares go first.
    TRANSIENT_HEADROOM = 1.25

    def __init__(self, spec, store, device: str, host_budget_bytes: int, memory_budget: int | None = None):
        self.spec, self.store, self.device, self.memory_budget = spec, store, device, memory_budget
        self.host = HostTier(host_budget_bytes)
        self.spares = SpareEngines()

    def load(self, entry):
        try:
            return self._load(entry)
        except BaseException:
            self.settle()  # a failed load leaves no spare holding memory the residency counts as free
            raise

    def settle(self) -> None:
        """Let go of the spares no load took."""
        self.spares.take(None)

    def host_models(self) -> list[str]:
        """The models whose weights host memory holds, least recently used first."""
        return [key.rsplit("@", 1)[0] for key in self.host.ids()]

    def _load(self, entry):
        from qlora_ray.serve.catalog import UNMERGED
        from qlora_ray.serve.loading import LoadedModel, load_model

        started = time.perf_counter()
        image = self.host.get(_image_key(entry))
        if image is not None:
            engine = self.spares.take(image.signature)
            if engine is not None:
                copy_weights(weight_tensors(engine.decoder), image.tensors)
                engine.serve_another(image.stop_ids)
                return LoadedModel(entry, engine, image.tokenizer, image.resident_bytes, time.perf_counter() - started,
                                   self.spec.serve, loaded_from="host memory, into a spare engine",
                                   signature=image.signature)
        if entry.variant == UNMERGED:
            self.settle()
            return load_model(self.spec, self.store, entry, self.device)
        if not self._room_beside_spares(entry.size_bytes):
            self.settle()
        return self._load_from_store(entry, started)

    def _load_from_store(self, entry, started: float):
        from qlora_ray.serve import loading
        from qlora_ray.serve.decoder import Decoder

        phases = {}  # seconds of each part of the load: the replica's log and its resident facts say them
        with self.store.local_copy(entry.key) as folder:
            tokenizer, stop_ids = loading.fused_tokenizer(folder)
            decoder = loading.fused_decoder(entry, folder, self.device, loading.serving_dtype(self.device))
        phases["read"] = time.perf_counter() - started
        if not isinstance(decoder, Decoder):  # a transformers model
            self.settle()
            engine = loading.transformers_engine(self.spec, decoder, stop_ids)
            return loading.LoadedModel(entry, engine, tokenizer, decoder.get_memory_footprint(),
                                       time.perf_counter() - started, self.spec.serve)
        tensors = weight_tensors(decoder)
        wanted = signature(decoder, tensors) if tensors is not None else None
        engine = self.spares.take(wanted)
        mark = time.perf_counter()
        if engine is not None:
            copy_weights(weight_tensors(engine.decoder), tensors)
            del decoder, tensors
            free_memory({engine.device})
            engine.serve_another(stop_ids)
            loaded_from = "the store, into a spare engine"
            phases["copy into the spare"] = time.perf_counter() - mark
        else:
            engine = loading.static_engine(self.spec, decoder, stop_ids)
            loaded_from = "the store"
            phases["engine (compile and capture)"] = time.perf_counter() - mark
        resident = loading.engine_bytes(engine)
        if wanted is not None:
            weights = weight_tensors(engine.decoder)
            nbytes = host_bytes(weights, pinned=self.device == "cuda")
            if self.host.fits(nbytes):
                mark = time.perf_counter()
                self.host.put(_image_key(entry), HostImage(wanted, host_copy(weights), nbytes, tokenizer, stop_ids,
                                                           resident))
                phases["host copy"] = time.perf_counter() - mark
        log.info("%s from %s: %s", entry.id, loaded_from, ", ".join(f"{name} {s:.2f} s" for name, s in phases.items()))
        return loading.LoadedModel(entry, engine, tokenizer, resident, time.perf_counter() - started, self.spec.serve,
                                   loaded_from=loaded_from, signature=wanted, load_phases=phases)

    def release(self, model) -> None:
        """Stop the model; keep its engine as a spare if another model can take it over, else free it."""
        if model.signature is None:
            model.close()
            return
        model.batcher.close()
        self.host.get(_image_key(model.entry))  # just used: the last of the host tier to leave
        self.spares.keep(Spare(model.signature, model.engine, model.resident_bytes))
        model.engine = model.batcher = None

    def _room_beside_spares(self, artifact_bytes: int) -> bool:
        """Whether the device has room for a model loaded from the store beside the spares, before
        one of them may take its weights (only a GPU's room is tight: on the CPU the spares stay).
        The room is the device's free memory, and within the replica's budget what it does not
        hold yet (other replicas may share the device)."""
        spare_bytes = self.spares.resident_bytes()
        if self.device != "cuda" or not spare_bytes:
            return True
        room, _ = torch.cuda.mem_get_info()
        if self.memory_budget is not None:
            room = min(room, self.memory_budget - torch.cuda.memory_allocated())
        return room >= max(spare_bytes, int(artifact_bytes * self.TRANSIENT_HEADROOM))


def _image_key(entry) -> str:
    return f"{entry.id}@{entry.version}"
