"""OpenAI request parsing (serve/protocol.py), without a server: what is accepted, what is refused
and how the refusal names the field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from qlora_ray.serve.protocol import (MAX_MODEL_NAME, MAX_STOP_CHARS, UNSUPPORTED_FIELDS, APIError, ChatRequest,
                                      CompletionRequest, refuse_unsupported, request_start,
                                      validation_error)


def refusal(model_class, body: dict) -> APIError:
    with pytest.raises(ValidationError) as caught:
        model_class.model_validate(body)
    return validation_error(caught.value)


def test_a_completion_prompt_is_one_text_or_token_ids():
    assert CompletionRequest.model_validate({"model": "m", "prompt": ["hello"]}).prompt == "hello"
    assert CompletionRequest.model_validate({"model": "m", "prompt": [1, 2, 3]}).prompt == [1, 2, 3]
    assert CompletionRequest.model_validate({"model": "m", "prompt": "hi"}).max_tokens == 16  # OpenAI's default
    assert "one prompt per request" in refusal(CompletionRequest, {"model": "m", "prompt": ["a", "b"]}).message
    assert "empty prompt" in refusal(CompletionRequest, {"model": "m", "prompt": []}).message


@pytest.mark.parametrize(("stop", "expected"), [(None, []), ("x", ["x"]), (["a", "b"], ["a", "b"])])
def test_stop_is_always_a_list(stop, expected):
    assert CompletionRequest.model_validate({"model": "m", "prompt": "p", "stop": stop}).stops == expected


@pytest.mark.parametrize("stop", [["a"] * 5, [""], ["x" * (MAX_STOP_CHARS + 1)]])
def test_stop_strings_are_bounded_in_number_and_length(stop):
    error = refusal(CompletionRequest, {"model": "m", "prompt": "p", "stop": stop})
    assert error.status == 400 and error.param == "stop" and f"1 to {MAX_STOP_CHARS} characters" in error.message


def test_a_model_name_is_bounded_and_the_refusal_names_the_field():
    error = refusal(ChatRequest, {"model": "m" * (MAX_MODEL_NAME + 1), "messages": [{"role": "user", "content": "x"}]})
    assert error.param == "model" and error.message.startswith("model: ")


def test_several_problems_are_counted_after_the_first():
    error = refusal(ChatRequest, {"model": "", "messages": [], "temperature": 9})
    assert "(and 2 more problem(s))" in error.message


@pytest.mark.parametrize("field", sorted(UNSUPPORTED_FIELDS))
def test_each_unsupported_field_is_refused_by_name(field):
    asking = {"tools": [{"type": "function"}], "tool_choice": "auto", "functions": [{"name": "f"}],
              "function_call": "auto", "logprobs": True, "top_logprobs": 3, "response_format": {"type": "json_object"},
              "logit_bias": {"1": 2}, "presence_penalty": 0.5, "frequency_penalty": -0.5, "best_of": 2, "echo": True,
              "suffix": "s", "audio": {"voice": "x"}, "modalities": ["text", "audio"], "prediction": {"type": "content"}}
    with pytest.raises(APIError) as caught:
        refuse_unsupported({"model": "m", field: asking[field]})
    assert caught.value.status == 400 and caught.value.param == field and caught.value.code == "unsupported_parameter"


def test_default_values_of_those_fields_are_accepted():
    refuse_unsupported({"model": "m", "tools": [], "tool_choice": "none", "logprobs": False, "top_logprobs": 0,
                        "response_format": {"type": "text"}, "presence_penalty": 0, "frequency_penalty": 0.0,
                        "best_of": 1, "echo": False, "suffix": "", "modalities": ["text"], "seed": 3, "user": "u"})


def test_chat_messages_become_template_messages():
    body = ChatRequest.model_validate({
        "model": "m", "max_tokens": 5, "max_completion_tokens": 7, "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "developer", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "two "}, {"type": "text", "text": "parts"}]}]})
    assert [m.as_template_message() for m in body.messages] == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "two parts"}]
    assert body.token_limit == 7 and body.include_usage and body.prompt_size() == len("be brief") + len("two parts")
    assert not ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                           "stream_options": {"include_usage": True}}).include_usage  # not streaming


def test_an_image_part_is_refused():
    error = refusal(ChatRequest, {"model": "m", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]})
    assert error.param.startswith("messages.0.content")


def test_error_bodies_have_openais_shape_and_retry_after():
    error = APIError(429, "busy", kind="rate_limit_error", code="overloaded", retry_after=2)
    assert error.body() == {"error": {"message": "busy", "type": "rate_limit_error", "param": None, "code": "overloaded"}}
    assert error.headers() == {"Retry-After": "2"} and APIError(400, "x").headers() == {}


@pytest.mark.parametrize("header, expected", [
    ("t=1700000000.250000", 1_700_000_000.25),   # the bench's own form
    ("1700000000.25", 1_700_000_000.25),         # a bare number
    ("t=1700000000.5", 1_700_000_000.4),         # ahead of the gateway's clock by less than a second: arrival
    ("t=1700000001.5", None),                    # too far ahead to be a clock's skew
    ("t=1699999000", None),                      # older than any request waits
    ("t=nan", None), ("t=inf", None), ("t=", None), ("soon", None), ("", None), (None, None),
])
def test_a_request_start_header_is_believed_only_when_plausible(header, expected):
    assert request_start(header, received=1_700_000_000.4) == expected
