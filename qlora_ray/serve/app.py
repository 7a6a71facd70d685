"""The Ray Serve application: an OpenAI-compatible gateway over multiplexed model deployments.

    client ──HTTP──▶ Gateway (FastAPI ingress: keys, validation, OpenAI shapes, SSE)
                        ├─▶ ModelServer "fused"     <tenant>/<scheme>.<merge base>   (fused folders)
                        └─▶ ModelServer "unmerged"  <tenant>/unmerged                (base + adapter, peft)

Model ids name a tenant's artifact. Each ModelServer replica loads models from the store on demand
through Serve's model multiplexing, which also routes a model's requests to the replica that holds
it and evicts the least recently used one beyond serve.max_resident_models. Requests to one model
on one replica are generated together, joining and leaving the batch between decode steps
(continuous batching: serve/scheduler.py, run by serve/batcher.py).

Overload is answered, not queued without bound: a replica takes serve.max_ongoing_requests, the
gateway's handle queues serve.max_queued_requests more per deployment (Ray Serve's own limits), and
beyond them Serve raises BackPressureError, which the gateway answers 429 with Retry-After. A replica
lost with its node is answered 503 with Retry-After while Serve starts another; a stream already
under way ends with an error event instead.

`qlora-ray serve JOB` runs it; `serve run serve/demo.yaml` builds it from `build_app`.
"""


import asyncio
import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from qlora_ray.serve import protocol
from qlora_ray.serve.batcher import Batcher
from qlora_ray.serve.keys import KeyRing
from qlora_ray.spec import FusedVariant, JobSpec
from qlora_ray.store import Store, adapter_key, base_key, fused_key

log = logging.getLogger(__name__)
UNMERGED = "unmerged"
GATEWAY_SPARE_REQUESTS = 32  # /health, /v1/models and the like, on top of what the models can hold
CATALOG_RELOAD_SECONDS = 10.0
# Failures of a model deployment that a client should retry: its queue is full, or its replica died
# or cannot be reached (its node is gone), or it has no replica at all.
RETRYABLE = (BackPressureError, RayActorError, DeploymentUnavailableError)


# -- the models ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelEntry:
    id: str  # "<tenant>/<variant>" or "<tenant>/unmerged": the model a replica loads
    tenant: str
    variant: str
    key: str  # the store key it loads from (the adapter's, for unmerged)
    refused: str | None = None  # why it is not served: it failed the quality gate

    @property
    def deployment(self) -> str:
        return UNMERGED if self.variant == UNMERGED else "fused"


def model_catalog(spec: JobSpec, store: Store) -> dict[str, ModelEntry]:
    """Every model name this job answers to now, each with the model it serves:
    - `<tenant>/<scheme>.<merge base>` for every complete fused artifact; one whose manifest says it
      failed the quality gate (the eval stage) is refused, unless serve.allow_failed_quality is set;
    - `<tenant>/<scheme>`: the scheme's default merge base (the better one by the eval stage, else
      the first of the job's);
    - `<tenant>/unmerged`: base + adapter through peft."""
    entries = {}
    for tenant in spec.tenants:
        defaults: dict[str, ModelEntry] = {}
        failed: dict[FusedVariant, dict] = {}  # variant -> its quality verdict
        for variant in spec.fused_variants(tenant):
            key = fused_key(spec.name, tenant.id, variant.name)
            if not store.is_complete(key):
                continue
            quality = store.read_manifest(key).get("quality") or {}
            if quality.get("passed") is False and not spec.serve.allow_failed_quality:
                failed[variant] = quality
                continue
            entry = ModelEntry(f"{tenant.id}/{variant.name}", tenant.id, variant.name, key)
            entries[entry.id] = entry
            if variant.scheme not in defaults or quality.get("default_for_scheme"):
                defaults[variant.scheme] = entry
        for scheme, entry in defaults.items():
            entries[f"{tenant.id}/{scheme}"] = entry
        for variant, quality in failed.items():
            instead = f"{tenant.id}/{variant.scheme}" if variant.scheme in defaults else f"{tenant.id}/{UNMERGED}"
            refused = (f"failed the quality gate ({'; '.join(quality.get('reasons', []))}); use {instead} instead, "
                       "or set serve.allow_failed_quality")
            entries[f"{tenant.id}/{variant.name}"] = ModelEntry(
                f"{tenant.id}/{variant.name}", tenant.id, variant.name, fused_key(spec.name, tenant.id, variant.name), refused)
        if spec.serve.unmerged_baseline and store.is_complete(adapter_key(spec.name, tenant.id)):
            entries[f"{tenant.id}/{UNMERGED}"] = ModelEntry(
                f"{tenant.id}/{UNMERGED}", tenant.id, UNMERGED, adapter_key(spec.name, tenant.id))
    return entries


class LoadedModel:
    """An engine, its tokenizer, and the batcher that runs its requests."""

    def __init__(self, entry: ModelEntry, engine, tokenizer, resident_bytes: int, load_seconds: float, serve_spec):
        self.entry, self.engine, self.tokenizer = entry, engine, tokenizer
        self.resident_bytes, self.load_seconds = resident_bytes, load_seconds
        self.batcher = Batcher(engine, serve_spec.max_batch)
        self.engine_name = type(engine).__name__


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
    """Fetch an artifact (through the node's bounded cache, Store.local_copy) and build the fastest
    engine for it on `device`."""
    import torch

    from qlora_ray.serve.engine import TransformersEngine

    started = time.perf_counter()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # fp32 is the fast CPU path
    if entry.variant == UNMERGED:
        from qlora_ray.evaluation import load_model as load_with_adapter

        with store.local_copy(base_key(spec.base.name)) as base_dir, store.local_copy(entry.key) as adapter_dir:
            model, tokenizer = load_with_adapter(base_dir, adapter_dir, dtype=str(dtype).removeprefix("torch."))
            stop_ids = _stop_ids(base_dir, tokenizer)
        model.to(device)
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


# -- the model deployment -----------------------------------------------------------------------
@serve.deployment
class ModelServer:
    """Loads models on demand (multiplexed, LRU-bounded) and streams their generations. `loader`
    (default load_model) builds a LoadedModel for a catalog entry: tests inject fake engines here,
    as Ray Serve LLM injects its engine class."""

    def __init__(self, spec: JobSpec, loader=None):
        started = time.perf_counter()
        import torch

        self.spec = spec
        self.loader = loader or load_model
        self.store = Store(self.spec.store, self.spec.storage_options)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.catalog = model_catalog(self.spec, self.store)
        if self.device == "cuda":
            from qlora_ray.serve import marlin

            # The Marlin int4 kernel is compiled on a machine's first use (minutes) unless the store
            # holds a build: here, while the replica starts, rather than inside the first request.
            if self.spec.serve.share_compiled_kernels:
                marlin.share_builds_through(self.store)
            marlin.unavailable_reason()
        self.start_seconds = time.perf_counter() - started
        log.info("model replica ready in %.1f s (before its first model load)", self.start_seconds)

        async def load(model_id: str) -> LoadedModel:
            if model_id not in self.catalog:
                self.catalog = model_catalog(self.spec, self.store)
            entry = self.catalog[model_id]
            return await asyncio.to_thread(self.loader, self.spec, self.store, entry, self.device)

        self.get_model = serve.multiplexed(max_num_models_per_replica=self.spec.serve.max_resident_models)(load)

    async def resident(self, model_id: str) -> dict:
        model = await self.get_model(model_id)
        sizes = model.batcher.batch_sizes
        return {"model": model_id, "resident_bytes": model.resident_bytes, "engine": model.engine_name,
                "device": self.device, "load_seconds": round(model.load_seconds, 2),
                "replica_start_seconds": round(self.start_seconds, 2),
                "mean_batch": round(sum(sizes) / len(sizes), 2) if sizes else None}

    async def generate(self, payload: dict):
        """Events: {"type": "start", "prompt_tokens"} | {"type": "error", "status", "message"}, then
        {"type": "text", "text"} per token..., then {"type": "end", "finish_reason", "completion_tokens"}."""
        from qlora_ray.serve.sampling import SamplingParams
        from qlora_ray.serve.text import TextStream

        model = await self.get_model(payload["model"])
        tokenizer = model.tokenizer
        if isinstance(payload.get("prompt"), list):
            ids = list(payload["prompt"])
            if any(not 0 <= token < len(tokenizer) for token in ids):
                yield {"type": "error", "status": 400, "message": f"prompt: token ids must be in [0, {len(tokenizer)})"}
                return
        else:  # on a thread: a long prompt would hold up every stream of this replica's event loop
            ids = await asyncio.to_thread(_prompt_ids, tokenizer, payload)
        context = model.engine.context
        limit = payload["max_tokens"] or min(self.spec.serve.max_tokens, context - len(ids))
        if not ids or limit < 1 or len(ids) + limit > context:
            yield {"type": "error", "status": 400,
                   "message": f"the prompt is {len(ids)} tokens and max_tokens {limit}: together at most {context}"}
            return
        params = SamplingParams(max_new_tokens=limit, temperature=payload["temperature"], top_p=payload["top_p"],
                                ignore_eos=payload["ignore_eos"])
        yield {"type": "start", "prompt_tokens": len(ids)}
        stream = TextStream(tokenizer, payload["stop"])
        produced, finish = 0, "length"
        async with contextlib.aclosing(model.batcher.tokens(ids, params)) as batches:
            async for tokens in batches:
                # One event per batch of tokens, its text possibly empty (held back: part of a
                # character or maybe of a stop string): one per token while the stream keeps up with
                # the engine, several when it falls behind, so each hop carries more.
                text = []
                for token in tokens:
                    produced += 1
                    text.append(stream.add(token))
                    if stream.stopped or (token in model.engine.stop_ids and not params.ignore_eos):
                        finish = "stop"
                        break
                yield {"type": "text", "text": "".join(text)}
                if finish == "stop":
                    break
        tail = stream.finish()
        if tail:
            yield {"type": "text", "text": tail}
        yield {"type": "end", "finish_reason": finish, "completion_tokens": produced}


def _prompt_ids(tokenizer, payload: dict) -> list[int]:
    """A request's prompt as token ids: its messages through the chat template, or its text."""
    if "messages" in payload:
        ids = tokenizer.apply_chat_template(payload["messages"], add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return tokenizer(payload["prompt"], add_special_tokens=False)["input_ids"]


def _retry_later(exc: BaseException, model: str, retry_after: int) -> protocol.APIError:
    """The answer to one of the RETRYABLE failures: Serve's own status for back pressure (429, as
    _options configures it) and its Retry-After, or 503 while the replica is replaced."""
    if isinstance(exc, BackPressureError):
        wait = math.ceil(exc.retry_after_s) if exc.retry_after_s is not None else retry_after
        return protocol.APIError(exc.status_code, f"model {model!r} is at capacity ({exc.message}); retry after {wait} s",
                                 kind="rate_limit_error", code="overloaded", retry_after=wait)
    return protocol.APIError(503, f"model {model!r} lost its replica; retry after {retry_after} s",
                             kind="server_error", code="model_unavailable", retry_after=retry_after)


async def _sse(events, request_id: str, body, prompt_tokens: int, chat: bool, retry_after: int):
    """Server-sent events in OpenAI's chunk shapes, ending with data: [DONE]. The 200 has been sent:
    a failure on the way is told as an error event, as OpenAI's stream does, which its clients raise."""
    def line(payload: dict) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    if chat:
        yield line(protocol.chat_chunk(request_id, body.model, {"role": "assistant", "content": ""}, None))
    try:
        async for event in events:
            if event["type"] == "text":
                if chat:
                    yield line(protocol.chat_chunk(request_id, body.model, {"content": event["text"]}, None))
                else:
                    yield line(protocol.completion_chunk(request_id, body.model, event["text"], None))
            elif event["type"] == "end":
                if chat:
                    yield line(protocol.chat_chunk(request_id, body.model, {}, event["finish_reason"]))
                else:
                    yield line(protocol.completion_chunk(request_id, body.model, "", event["finish_reason"]))
                if body.include_usage:
                    yield line(protocol.usage_chunk(request_id, body.model, chat, prompt_tokens,
                                                    event["completion_tokens"]))
    except RETRYABLE as exc:
        yield line(_retry_later(exc, body.model, retry_after).body())
    except Exception as exc:  # noqa: BLE001 - past the 200, an event is the only way left to tell the client
        log.exception("%s: the stream failed", request_id)
        yield line(protocol.APIError(500, f"generation failed ({type(exc).__name__}); the server's log has {request_id}",
                                     kind="server_error").body())
    yield "data: [DONE]\n\n"


# -- the gateway --------------------------------------------------------------------------------
# No `from __future__ import annotations` in this module: FastAPI reads the route signatures' types
# at run time, and Serve's class-based ingress cannot resolve them as strings.
api = FastAPI(title="qlora_ray", docs_url=None, redoc_url=None)


@api.exception_handler(protocol.APIError)
async def _api_error(_request: Request, exc: protocol.APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Gateway:
    def __init__(self, spec: JobSpec, fused, unmerged, extra_keys: dict[str, str] | None = None):
        self.spec = spec
        self.store = Store(self.spec.store, self.spec.storage_options)
        self.handles = {"fused": fused, UNMERGED: unmerged}
        self.keys = KeyRing(self.store, self.spec.name, extra_keys)
        self.catalog = model_catalog(self.spec, self.store)
        self.catalog_at = time.monotonic()

    # -- checks shared by every route
    def _tenant(self, request: Request) -> str:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        tenant = self.keys.tenant(key.strip()) if scheme.lower() == "bearer" and key.strip() else None
        if tenant is None:
            raise protocol.APIError(401, "a valid API key is required (Authorization: Bearer <key>)",
                                    kind="authentication_error", code="invalid_api_key")
        return tenant

    async def _model(self, model_id: str, tenant: str) -> ModelEntry:
        # Re-read at most every CATALOG_RELOAD_SECONDS: new fused models appear, and a model the eval
        # stage failed since is refused from then on. Off the event loop: it reads the store.
        if time.monotonic() - self.catalog_at > CATALOG_RELOAD_SECONDS:
            self.catalog_at = time.monotonic()
            self.catalog = await asyncio.to_thread(model_catalog, self.spec, self.store)
        entry = self.catalog.get(model_id)
        if entry is None or entry.tenant != tenant:  # another tenant's model is not revealed
            raise protocol.APIError(404, f"model {model_id!r} does not exist or this key cannot use it",
                                    param="model", code="model_not_found")
        if entry.refused:
            raise protocol.APIError(403, f"model {model_id!r} {entry.refused}", param="model",
                                    code="model_failed_quality_gate")
        if entry.deployment == UNMERGED and self.handles[UNMERGED] is None:
            raise protocol.APIError(404, f"model {model_id!r}: the unmerged baseline is not deployed",
                                    param="model", code="model_not_found")
        return entry

    @staticmethod
    async def _body(request: Request, model_class):
        try:
            raw = await request.json()
        except ValueError:
            raise protocol.APIError(400, "the request body is not valid JSON") from None
        if not isinstance(raw, dict):
            raise protocol.APIError(400, "the request body must be a JSON object")
        try:
            return model_class.model_validate(raw)
        except ValidationError as exc:
            raise protocol.validation_error(exc) from None

    # -- routes
    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        tenant = self._tenant(request)
        self.catalog, self.catalog_at = model_catalog(self.spec, self.store), time.monotonic()
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": f"tenant:{entry.tenant}"}
            for name, entry in self.catalog.items() if entry.tenant == tenant and not entry.refused]}

    @api.get("/v1/qlora-ray/resident")
    async def resident(self, request: Request, model: str) -> dict:
        """Loads `model` if needed and reports its resident bytes on the replica that holds it."""
        entry = await self._model(model, self._tenant(request))
        handle = self.handles[entry.deployment].options(multiplexed_model_id=entry.id)
        try:
            return await handle.resident.remote(entry.id)
        except RETRYABLE as exc:
            raise _retry_later(exc, model, self.spec.serve.retry_after_s) from None

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        tenant = self._tenant(request)
        body = await self._body(request, protocol.CompletionRequest)
        return await self._answer(body, await self._model(body.model, tenant), chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        tenant = self._tenant(request)
        body = await self._body(request, protocol.ChatRequest)
        return await self._answer(body, await self._model(body.model, tenant), chat=True)

    async def _answer(self, body, entry: ModelEntry, *, chat: bool):
        limit = body.token_limit if chat else body.max_tokens
        if limit is not None and limit > self.spec.serve.max_tokens:
            raise protocol.APIError(400, f"max_tokens: at most {self.spec.serve.max_tokens} on this server",
                                    param="max_tokens")
        payload = {"model": entry.id, "max_tokens": limit, "temperature": body.temperature, "top_p": body.top_p,
                   "stop": body.stops, "ignore_eos": body.ignore_eos}
        if chat:
            payload["messages"] = [m.as_template_message() for m in body.messages]
        else:
            payload["prompt"] = body.prompt
        handle = self.handles[entry.deployment].options(stream=True, multiplexed_model_id=entry.id)
        retry_after = self.spec.serve.retry_after_s
        events = handle.generate.remote(payload)
        try:  # back pressure and a lost replica surface here, before any 200 is sent
            first = await events.__anext__()
        except RETRYABLE as exc:
            raise _retry_later(exc, body.model, retry_after) from None
        if first["type"] == "error":
            raise protocol.APIError(first["status"], first["message"])
        request_id = protocol.new_id("chatcmpl" if chat else "cmpl")
        if body.stream:
            return StreamingResponse(_sse(events, request_id, body, first["prompt_tokens"], chat, retry_after),
                                     media_type="text/event-stream")
        text, end = [], None
        try:
            async for event in events:
                if event["type"] == "text":
                    text.append(event["text"])
                elif event["type"] == "end":
                    end = event
        except RETRYABLE as exc:
            raise _retry_later(exc, body.model, retry_after) from None
        build = protocol.chat_body if chat else protocol.completion_body
        return build(request_id, body.model, "".join(text), end["finish_reason"], first["prompt_tokens"],
                     end["completion_tokens"])


# -- building the application -------------------------------------------------------------------
def _backpressure(spec: JobSpec) -> BackpressureConfig:
    """How Serve answers beyond a queue's bound: 429, which OpenAI's clients retry after Retry-After
    (a 503 would read as the server being down)."""
    return BackpressureConfig(status_code=429, retry_after_s=spec.serve.retry_after_s)


def _max_ongoing(spec: JobSpec) -> int:
    """Requests a model replica takes at once: by default a batch generating and the next gathering."""
    return spec.serve.max_ongoing_requests or 2 * spec.serve.max_batch


def _options(spec: JobSpec, name: str) -> dict:
    resources = spec.serve.resources
    options = {"name": name, "ray_actor_options": {
        "num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus, "resources": dict(resources.custom)},
        "max_ongoing_requests": _max_ongoing(spec), "max_queued_requests": spec.serve.max_queued_requests,
        "backpressure_config": _backpressure(spec)}
    if spec.serve.max_replicas:
        options["autoscaling_config"] = {"min_replicas": spec.serve.num_replicas, "max_replicas": spec.serve.max_replicas,
                                         "target_ongoing_requests": spec.serve.target_ongoing_requests}
    else:
        options["num_replicas"] = spec.serve.num_replicas
    return options


def _gateway_options(spec: JobSpec) -> dict:
    """The gateway only awaits the models, so it takes every request their replicas and queues can
    hold, and room for the cheap routes: the models' bound is the one that answers overload, in
    OpenAI's shape. Serve's proxy queues as many again for it, then answers the same 429 itself, in
    plain text. (Serve counts a request as queued until it is assigned, so a queue bound as tight
    as the models' would turn away bursts the gateway has room for.)"""
    replicas = spec.serve.max_replicas or spec.serve.num_replicas
    deployments = 2 if spec.serve.unmerged_baseline else 1
    held = deployments * (replicas * _max_ongoing(spec) + spec.serve.max_queued_requests) + GATEWAY_SPARE_REQUESTS
    return {"max_ongoing_requests": held, "max_queued_requests": held, "backpressure_config": _backpressure(spec)}


def build_application(spec: JobSpec, extra_keys: dict[str, str] | None = None, loader=None):
    """The bound Serve application for a job. extra_keys (key -> tenant) are accepted besides the
    store's keys: the bench uses them for its own run without writing keys to the store. loader:
    see ModelServer."""
    fused = ModelServer.options(**_options(spec, "fused")).bind(spec, loader)
    unmerged = ModelServer.options(**_options(spec, UNMERGED)).bind(spec, loader) if spec.serve.unmerged_baseline else None
    return Gateway.options(**_gateway_options(spec)).bind(spec, fused, unmerged, extra_keys)


def build_app(args: dict):
    """`serve run` entry point: args {job: path to the job file}."""
    from qlora_ray.spec import load_spec

    if "job" not in args:
        raise ValueError("serve config: args.job (the job file) is required")
    return build_application(load_spec(args["job"]))
