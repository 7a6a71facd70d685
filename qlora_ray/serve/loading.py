"""Building a servable model from the store: fetch an artifact (through the node's bounded cache,
Store.local_copy) and wrap the fastest engine for it on the replica's device in a LoadedModel."""

from __future__ import annotations

import gc
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
                 serve_spec: ServeSpec):
        self.entry, self.engine, self.tokenizer = entry, engine, tokenizer
        self.resident_bytes, self.load_seconds = resident_bytes, load_seconds
        self.batcher = Batcher(engine, serve_spec.max_batch, stream_interval=serve_spec.stream_interval_ms / 1000)
        self.engine_name = type(engine).__name__

    def close(self) -> None:
        """Stop generating and let go of the weights and caches: the memory is free once this returns
        (and the caller holds no reference). Called only with no request in flight."""
        self.batcher.close()
        device = getattr(self.engine, "device", None)
        self.engine = self.batcher = None
        gc.collect()  # the engine's tensors sit in reference cycles (modules, captured graphs)
        if device is not None and getattr(device, "type", device) == "cuda":
            import torch

            torch.cuda.empty_cache()


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
    import torch

    from qlora_ray.serve.engine import TransformersEngine

    started = time.perf_counter()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # fp32 is the fast CPU path
    if entry.variant == UNMERGED:  # loaded as the eval stage loads its `unmerged` row
        from qlora_ray.quality.configs import UNMERGED_ROW, load_config

        with store.local_copy(base_key(spec.base.name)) as base_dir, store.local_copy(entry.key) as adapter_dir:
            loaded = load_config(UNMERGED_ROW, {"base": base_dir, "adapter": adapter_dir}, device)
            model, tokenizer = loaded.model, loaded.tokenizer
            stop_ids = _stop_ids(base_dir, tokenizer)
        engine = TransformersEngine(model, stop_ids, context=_context(spec, model.config), max_batch=spec.serve.max_batch)
        resident = sum(p.nbytes for p in model.parameters())
    else:
        with store.local_copy(entry.key) as folder:
            engine, tokenizer, resident = _fused_engine(spec, entry, folder, device, dtype)
    return LoadedModel(entry, engine, tokenizer, resident, time.perf_counter() - started, spec.serve)


def _fused_engine(spec: JobSpec, entry: ModelEntry, folder: Path, device: str, dtype):
    """(engine, tokenizer, resident bytes) for a fused model's folder: our decoder where its weight
    format allows, transformers otherwise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_ray.serve.engine import StaticEngine, TransformersEngine
    from qlora_ray.serve.weights import WeightFormatError, load_decoder

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    stop_ids = _stop_ids(folder, tokenizer)
    try:
        decoder = load_decoder(folder, device=device, dtype=dtype)
    except WeightFormatError as exc:
        log.warning("%s: %s; serving it through transformers instead", entry.id, exc)
        model = AutoModelForCausalLM.from_pretrained(str(folder), device_map=device, use_safetensors=True,
                                                     trust_remote_code=False).eval()
        engine = TransformersEngine(model, stop_ids, context=_context(spec, model.config), max_batch=spec.serve.max_batch)
        return engine, tokenizer, model.get_memory_footprint()
    engine = StaticEngine(decoder, stop_ids, context=_context(spec, decoder.config), max_batch=spec.serve.max_batch)
    engine.warm_up()
    resident = sum(t.nbytes for t in decoder.parameters()) + sum(t.nbytes for t in decoder.buffers())
    return engine, tokenizer, resident + decoder.cache_bytes()
