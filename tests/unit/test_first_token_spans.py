"""The replica's account of where a request's time to first token went (serve/replica.py)."""

from __future__ import annotations

from qlora_ray.serve.replica import FirstTokenSpans, summarize_first_token_spans


def spans(engine_seconds: list[float]) -> list[FirstTokenSpans]:
    return [FirstTokenSpans("acme/bf16", 1_700_000_000.0 + i, model_wait=0.0, tokenize=0.001, start_event=0.002,
                            engine=engine) for i, engine in enumerate(engine_seconds)]


def test_each_span_and_their_sum_are_summarized_in_milliseconds():
    summary = summarize_first_token_spans(spans([0.010, 0.020, 0.030]))
    assert summary["requests"] == 3
    assert summary["engine_ms_p50"] == 20.0 and summary["engine_ms_p99"] == 29.8
    assert summary["tokenize_ms_p50"] == 1.0 and summary["start_event_ms_p50"] == 2.0
    assert summary["in_replica_ms_p50"] == 23.0 and summary["model_wait_ms_p99"] == 0.0


def test_no_requests_give_no_figures():
    assert summarize_first_token_spans([]) == {"requests": 0, **{
        f"{name}_ms_p{q}": None for name in ("model_wait", "tokenize", "start_event", "engine", "in_replica")
        for q in (50, 99)}}
