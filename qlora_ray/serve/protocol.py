"""The OpenAI API's request bodies and response shapes, as far as this server implements them.

Requests are validated here, before any model is touched: a body that does not parse or asks for
something this server does not do gets a 400 with OpenAI's error shape, naming the field. OpenAI
fields that would change the answer but are not implemented (tools, logprobs, response_format, ...)
are refused by name rather than silently ignored; other unknown fields (user, seed, metadata, ...)
are ignored, as OpenAI's clients send them. Strings are bounded (model names, stop strings), so no
request can make the server do unbounded work per token. `ignore_eos` is vLLM's extension, used by
benchmarks to fix the output length.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_MODEL_NAME = 256
MAX_STOP_CHARS = 256


def _given(value) -> bool:
    return value not in (None, False, 0, "", [], {})


# OpenAI request fields that change what is answered, none of which this server implements, each
# with the test of a value that asks for it (a default value is harmless, and clients send those).
UNSUPPORTED_FIELDS = {
    "tools": _given, "tool_choice": lambda v: _given(v) and v != "none", "functions": _given,
    "function_call": lambda v: _given(v) and v != "none", "logprobs": _given, "top_logprobs": _given,
    "response_format": lambda v: _given(v) and not (isinstance(v, dict) and v.get("type") == "text"),
    "logit_bias": _given, "presence_penalty": _given, "frequency_penalty": _given,
    "best_of": lambda v: _given(v) and v != 1, "echo": _given, "suffix": _given, "audio": _given,
    "modalities": lambda v: _given(v) and v != ["text"], "prediction": _given,
}


def refuse_unsupported(raw: dict) -> None:
    """A 400 naming the first field that asks for something this server does not do."""
    for name, asks in UNSUPPORTED_FIELDS.items():
        if name in raw and asks(raw[name]):
            raise APIError(400, f"{name}: not supported by this server", param=name, code="unsupported_parameter")


class APIError(Exception):
    """An error answered as {"error": {...}} with an HTTP status; with retry_after (seconds), a
    Retry-After header too, which OpenAI's clients wait for before they retry."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.retry_after = retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}


def validation_error(exc: ValidationError) -> APIError:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    extra = f" (and {len(exc.errors()) - 1} more problem(s))" if len(exc.errors()) > 1 else ""
    return APIError(400, f"{where}: {first['msg']}{extra}", param=where)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=MAX_MODEL_NAME)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="One choice per request.")
    stream_options: dict | None = None
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4 or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"at most 4 stop strings, each of 1 to {MAX_STOP_CHARS} characters")
        return stops

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.get("include_usage"))


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list) and value and isinstance(value[0], str):
            if len(value) != 1:
                raise ValueError("one prompt per request")
            return value[0]
        if isinstance(value, list) and not value:
            raise ValueError("empty prompt")
        return value

    def prompt_size(self) -> int:
        """Characters of the prompt's text, or its token ids."""
        return len(self.prompt)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_template_message(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def prompt_size(self) -> int:
        """Characters of the messages' text."""
        return sum(len(m.as_template_message()["content"]) for m in self.messages)


# When the client sent the request (Unix seconds, "t=<seconds>" or "<seconds>"): `qlora-ray bench`
# sends it, so that the replica can say how long a request took to reach it. Any client may send
# anything here; it is read only into those figures, and only within MAX_REQUEST_AGE_S of arrival.
REQUEST_START_HEADER = "X-Request-Start"
MAX_REQUEST_AGE_S = 600.0
CLOCK_SKEW_S = 1.0  # a client's clock ahead of the gateway's by up to this much is still believed


def request_start(header: str | None, received: float) -> float | None:
    """The send time an X-Request-Start header gives, if it is a plausible one for a request that
    arrived at `received` (same clock): at most MAX_REQUEST_AGE_S before it, at most CLOCK_SKEW_S
    after it (then taken as `received`); None otherwise."""
    if not header:
        return None
    text = header.strip().removeprefix("t=")
    try:
        sent = float(text)
    except ValueError:
        return None
    if not math.isfinite(sent) or not received - MAX_REQUEST_AGE_S <= sent <= received + CLOCK_SKEW_S:
        return None
    return min(sent, received)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(request_id: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
                    completion_tokens: int) -> dict:
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(request_id: str, model: str, text: str, finish_reason: str | None) -> dict:
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]}


def chat_body(request_id: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
              completion_tokens: int) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_chunk(request_id: str, model: str, delta: dict, finish_reason: str | None) -> dict:
    return {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}


def usage_chunk(request_id: str, model: str, chat: bool, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}
