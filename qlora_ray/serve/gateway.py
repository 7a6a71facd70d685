"""The HTTP ingress: API keys, request limits and validation, OpenAI's shapes, server-sent events.

The gateway's event loop carries every tenant's streams, so nothing on it waits on the store (keys
and catalog come from serve/catalog.StoreView) or on a body without bound: a body over
serve.max_request_bytes is refused with 413 before it is read whole, prompts are bounded by the
context, and what OpenAI's API has but this server does not do is refused by name (protocol.py).
Overload and a lost replica are answered 429 or 503 with Retry-After; a stream already under way
ends with an error event instead. An answer that waited for its model to load (a model switch) says
how long in its X-Model-Load-Seconds header, and where the weights came from (host memory or the
store) in X-Model-Loaded-From; `qlora-ray bench --mixed` reads both.
"""

import json
import logging
import math
import time
from dataclasses import asdict

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from qlora_ray.serve import protocol
from qlora_ray.serve.catalog import UNMERGED, ModelEntry, StoreView
from qlora_ray.spec import JobSpec
from qlora_ray.store import Store

log = logging.getLogger(__name__)
# Failures of a model deployment that a client should retry: its queue is full, or its replica died
# or cannot be reached (its node is gone), or it has no replica at all.
RETRYABLE = (BackPressureError, RayActorError, DeploymentUnavailableError)
LOAD_SECONDS_HEADER = "X-Model-Load-Seconds"
LOADED_FROM_HEADER = "X-Model-Loaded-From"  # with it: where that load took the weights from
# Characters of prompt text per token of context a request may send: a token is rarely longer than
# a few characters, so this refuses only prompts that could never fit, before tokenizing them.
PROMPT_CHARS_PER_TOKEN = 32


def retry_later(exc: BaseException, model: str, retry_after: int) -> protocol.APIError:
    """The answer to one of the RETRYABLE failures: Serve's own status for back pressure (429, as
    the application configures it) and its Retry-After, or 503 while the replica is replaced."""
    if isinstance(exc, BackPressureError):
        wait = math.ceil(exc.retry_after_s) if exc.retry_after_s is not None else retry_after
        return protocol.APIError(exc.status_code, f"model {model!r} is at capacity ({exc.message}); retry after {wait} s",
                                 kind="rate_limit_error", code="overloaded", retry_after=wait)
    return protocol.APIError(503, f"model {model!r} lost its replica; retry after {retry_after} s",
                             kind="server_error", code="model_unavailable", retry_after=retry_after)


def _event_error(event: dict) -> protocol.APIError:
    """A replica's error event as the answer to send (429 when a tenant's loads are at their bound)."""
    if event["status"] == 429:
        return protocol.APIError(429, event["message"], kind="rate_limit_error", code="too_many_model_loads",
                                 retry_after=event.get("retry_after"))
    return protocol.APIError(event["status"], event["message"])


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
        yield line(retry_later(exc, body.model, retry_after).body())
    except Exception as exc:  # noqa: BLE001 - past the 200, an event is the only way left to tell the client
        log.exception("%s: the stream failed", request_id)
        yield line(protocol.APIError(500, f"generation failed ({type(exc).__name__}); the server's log has {request_id}",
                                     kind="server_error").body())
    yield "data: [DONE]\n\n"


def _timing(request: Request, received: float) -> dict:
    """A request's way to the replica so far, in wall-clock Unix seconds, for the replica's account
    of its first token (serve/replica.FirstTokenSpans): when the client says it sent it (None
    without a plausible X-Request-Start header) and when the gateway's handler began; the gateway
    adds when it handed the request to the model deployment."""
    return {"sent": protocol.request_start(request.headers.get(protocol.REQUEST_START_HEADER), received),
            "received": received}


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
        self.handles = {"fused": fused, UNMERGED: unmerged}
        self.view = StoreView(spec, Store(spec.store, spec.storage_options), extra_keys)

    def __del__(self):  # Serve's shutdown of the replica: the refresh thread stops with it
        if hasattr(self, "view"):
            self.view.close()

    # -- checks shared by every route
    def _tenant(self, request: Request) -> str:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        tenant = self.view.tenant(key.strip()) if scheme.lower() == "bearer" and key.strip() else None
        if tenant is None:
            raise protocol.APIError(401, "a valid API key is required (Authorization: Bearer <key>)",
                                    kind="authentication_error", code="invalid_api_key")
        return tenant

    def _model(self, model_id: str, tenant: str) -> ModelEntry:
        entry = self.view.catalog.get(model_id)
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

    async def _body(self, request: Request, model_class):
        limit = self.spec.serve.max_request_bytes
        too_large = protocol.APIError(413, f"the request body is over {limit} bytes", code="request_too_large")
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():  # a body without (or lying about) its length stops at the limit too
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        try:
            raw = json.loads(b"".join(chunks))
        except ValueError:
            raise protocol.APIError(400, "the request body is not valid JSON") from None
        if not isinstance(raw, dict):
            raise protocol.APIError(400, "the request body must be a JSON object")
        protocol.refuse_unsupported(raw)
        try:
            body = model_class.model_validate(raw)
        except ValidationError as exc:
            raise protocol.validation_error(exc) from None
        context = self.spec.serve.context
        if body.prompt_size() > PROMPT_CHARS_PER_TOKEN * context:
            param = "messages" if hasattr(body, "messages") else "prompt"
            raise protocol.APIError(400, f"{param}: too long for this server's context of {context} tokens",
                                    param=param, code="context_length_exceeded")
        return body

    # -- routes
    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        tenant = self._tenant(request)
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": f"tenant:{entry.tenant}"}
            for name, entry in self.view.catalog.items() if entry.tenant == tenant and not entry.refused]}

    @api.get("/v1/qlora-ray/resident")
    async def resident(self, request: Request, model: str, since: float | None = None) -> dict:
        """Loads `model` if needed and reports its resident bytes on the replica that holds it, and
        where the first-token time of that replica's requests since `since` (a Unix time) went."""
        entry = self._model(model, self._tenant(request))
        handle = self.handles[entry.deployment].options(multiplexed_model_id=entry.id)
        try:
            return await handle.resident.remote(asdict(entry), since)
        except RETRYABLE as exc:
            raise retry_later(exc, model, self.spec.serve.retry_after_s) from None

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        timing = _timing(request, time.time())
        tenant = self._tenant(request)
        body = await self._body(request, protocol.CompletionRequest)
        return await self._answer(body, self._model(body.model, tenant), chat=False, timing=timing)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        timing = _timing(request, time.time())
        tenant = self._tenant(request)
        body = await self._body(request, protocol.ChatRequest)
        return await self._answer(body, self._model(body.model, tenant), chat=True, timing=timing)

    async def _answer(self, body, entry: ModelEntry, *, chat: bool, timing: dict):
        limit = body.token_limit if chat else body.max_tokens
        if limit is not None and limit > self.spec.serve.max_tokens:
            raise protocol.APIError(400, f"max_tokens: at most {self.spec.serve.max_tokens} on this server",
                                    param="max_tokens")
        payload = {"entry": asdict(entry), "max_tokens": limit, "temperature": body.temperature, "top_p": body.top_p,
                   "stop": body.stops, "ignore_eos": body.ignore_eos, "timing": timing}
        if chat:
            payload["messages"] = [m.as_template_message() for m in body.messages]
        else:
            payload["prompt"] = body.prompt
        handle = self.handles[entry.deployment].options(stream=True, multiplexed_model_id=entry.id)
        retry_after = self.spec.serve.retry_after_s
        timing["forwarded"] = time.time()
        events = handle.generate.remote(payload)
        try:  # back pressure and a lost replica surface here, before any 200 is sent
            first = await events.__anext__()
        except RETRYABLE as exc:
            raise retry_later(exc, body.model, retry_after) from None
        if first["type"] == "error":
            raise _event_error(first)
        request_id = protocol.new_id("chatcmpl" if chat else "cmpl")
        headers = {} if first.get("load_seconds") is None else {
            LOAD_SECONDS_HEADER: f"{first['load_seconds']:.3f}", LOADED_FROM_HEADER: first.get("loaded_from") or ""}
        if body.stream:
            return StreamingResponse(_sse(events, request_id, body, first["prompt_tokens"], chat, retry_after),
                                     media_type="text/event-stream", headers=headers)
        text, end = [], None
        try:
            async for event in events:
                if event["type"] == "text":
                    text.append(event["text"])
                elif event["type"] == "end":
                    end = event
        except RETRYABLE as exc:
            raise retry_later(exc, body.model, retry_after) from None
        build = protocol.chat_body if chat else protocol.completion_body
        return JSONResponse(build(request_id, body.model, "".join(text), end["finish_reason"], first["prompt_tokens"],
                                  end["completion_tokens"]), headers=headers)
