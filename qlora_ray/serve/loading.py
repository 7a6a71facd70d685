"""Building a servable model from the store: fetch an artifact (through the node's bounded cache,
Store.local_copy) and wrap the fastest engine for it on the replica's device in a LoadedModel."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from qlora_ray.serve.batcher import Batcher
from qlora_ray.serve.catalog import UNMERGED, ModelEntry
from qlora_ray.spec import JobSpec, ServeSpec
from qlora_ray.store import Store, base_key

log = logging.getLogger(__name__)


class LoadedModel:
    """An engine, its tokenizer, and the batcher that runs its requests."""

    def __init__(self, entry: ModelEntry, engine, tokenizer, resident_bytes: int, load_seconds: float,
                 serve_spec: ServeSpec, *, loaded_from: str = "the store", signature: str | None = None,
                 load_phases: dict[str, float] | None = None):
        """`loaded_from`: where its weights came from (switching.py); `signature`: what another model
        must share to take over its engine (switching.signature), None if none can; `load_phases`:
        the seconds of each part of its load, where they were measured."""
        self.entry, self.engine, self.tokenizer = entry, engine, tokenizer
        self.resident_bytes, self.load_seconds = resident_bytes, load_seconds
        self.load_phases = load_phases or {}
        self.loaded_from, self.signature = loaded_from, signature
        self.batcher = Batcher(engine, serve_spec.max_batch, stream_interval=serve_spec.stream_interval_ms / 1000)
        self.engine_name = type(engine).__name__

    def close(self) -> None:
        """Stop generating and let go of the weights and caches: the memory is free once this returns
        (and the caller holds no reference). Called only with no request in flight."""
        from qlora_ray.serve.switching import free_memory

        self.batcher.close()
        device = getattr(self.engine, "device", None)
        self.engine = self.batcher = None
        free_memory({device})


def serving_dtype(device: str):
    """The activations' (and dense weights') dtype on `device`: bf16 on a GPU, fp32 on a CPU (its fast path)."""
    import torch

    return torch.bfloat16 if device == "cuda" else torch.float32


def _context(spec: JobSpec, config) -> int:
    """Prompt and answer tokens a request may use: serve.context, or less if the model knows fewer positions."""
    return min(spec.serve.context, getattr(config, "max_position_embeddings", None) or spec.serve.context)


def _stop_ids(folder: Path, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id} - {None}
    config = folder / "generation_config.json"
    if config.exists():
        eos = json.loads(config.read_text()).get("eos_token_id")
        ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids


def load_model(spec: JobSpec, store: Store, entry: ModelEntry, device: str) -> LoadedModel:
    """The LoadedModel of a catalog entry on `device`: fused folders through our decoder where their
    weight format allows, transformers otherwise; unmerged through peft."""
    started = time.perf_counter()
    dtype = serving_dtype(device)
    if entry.variant == UNMERGED:  # loaded as the eval stage loads its `unmerged` row
        from qlora_ray.quality.configs import UNMERGED_ROW, load_config

        with store.local_copy(base_key(spec.base.name)) as base_dir, store.local_copy(entry.key) as adapter_dir:
            loaded = load_config(UNMERGED_ROW, {"base": base_dir, "adapter": adapter_dir}, device)
            model, tokenizer = loaded.model, loaded.tokenizer
            stop_ids = _stop_ids(base_dir, tokenizer)
        engine = transformers_engine(spec, model, stop_ids)
        resident = sum(p.nbytes for p in model.parameters())
    else:
        with store.local_copy(entry.key) as folder:
            engine, tokenizer, resident = _fused_engine(spec, entry, folder, device, dtype)
    return LoadedModel(entry, engine, tokenizer, resident, time.perf_counter() - started, spec.serve)


def _fused_engine(spec: JobSpec, entry: ModelEntry, folder: Path, device: str, dtype):
    """(engine, tokenizer, resident bytes) for a fused model's folder: our decoder where its weight
    format allows, transformers otherwise."""
    from qlora_ray.serve.decoder import Decoder

    tokenizer, stop_ids = fused_tokenizer(folder)
    decoder = fused_decoder(entry, folder, device, dtype)
    if not isinstance(decoder, Decoder):  # a transformers model
        return transformers_engine(spec, decoder, stop_ids), tokenizer, decoder.get_memory_footprint()
    engine = static_engine(spec, decoder, stop_ids)
    return engine, tokenizer, engine_bytes(engine)


def fused_tokenizer(folder: Path):
    """(tokenizer, stop token ids) of a fused model's folder."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return tokenizer, _stop_ids(folder, tokenizer)


def fused_decoder(entry: ModelEntry, folder: Path, device: str, dtype):
    """Our Decoder of a fused folder, where its weight format allows; else the transformers model."""
    from transformers import AutoModelForCausalLM

    from qlora_ray.serve.weights import WeightFormatError, load_decoder

    try:
        return load_decoder(folder, device=device, dtype=dtype)
    except WeightFormatError as exc:
        log.warning("%s: %s; serving it through transformers instead", entry.id, exc)
        return AutoModelForCausalLM.from_pretrained(str(folder), device_map=device, use_safetensors=True,
                                                    trust_remote_code=False).eval()


def transformers_engine(spec: JobSpec, model, stop_ids: set[int]):
    from qlora_ray.serve.engine import TransformersEngine

    return TransformersEngine(model, stop_ids, context=_context(spec, model.config), max_batch=spec.serve.max_batch)


def static_engine(spec: JobSpec, decoder, stop_ids: set[int]):
    """A StaticEngine over the decoder, compiled and captured (on CUDA) before its first request."""
    from qlora_ray.serve.engine import StaticEngine

    from qlora_ray.serve import step_loop

    # Its graphs are captured while the replica's other models may be generating: between their steps.
    engine = StaticEngine(decoder, stop_ids, context=_context(spec, decoder.config), max_batch=spec.serve.max_batch,
                          capturing=step_loop.SHARED.paused)
    engine.warm_up()
    return engine


def engine_bytes(engine) -> int:
    """What a StaticEngine holds on its device: weights and KV cache."""
    decoder = engine.decoder
    weights = sum(t.nbytes for t in decoder.parameters()) + sum(t.nbytes for t in decoder.buffers())
    return weights + decoder.cache_bytes()
