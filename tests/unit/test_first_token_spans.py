"""The replica's account of where a request's time to first token went (serve/replica.py)."""

from __future__ import annotations

import pytest

from qlora_ray.serve.replica import SPAN_NAMES, FirstTokenSpans, summarize_first_token_spans


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
        f"{name}_ms_p{q}": None for name in SPAN_NAMES for q in (50, 99)}}


def test_the_way_to_the_replica_is_split_at_the_gateway_from_the_wall_clock_times_sent_along():
    timing = {"sent": 100.000, "received": 100.030, "forwarded": 100.032}
    assert FirstTokenSpans.on_the_way(timing, arrived=100.040) == pytest.approx(
        {"to_gateway": 0.030, "in_gateway": 0.002, "to_replica": 0.008})
    # a client without the header: the gateway's part is still known
    assert FirstTokenSpans.on_the_way({"sent": None, "received": 100.030, "forwarded": 100.032}, 100.040) == \
        pytest.approx({"to_gateway": None, "in_gateway": 0.002, "to_replica": 0.008})
    # a request that came by another way than the gateway (a handle of one's own)
    assert FirstTokenSpans.on_the_way(None, 100.040) == {"to_gateway": None, "in_gateway": None, "to_replica": None}


def test_spans_before_the_replica_are_summarized_over_the_requests_that_know_them():
    known = FirstTokenSpans("acme/bf16", 1.0, 0.0, 0.001, 0.0, 0.010, to_gateway=0.020, in_gateway=0.002,
                            to_replica=0.004)
    unknown = FirstTokenSpans("acme/bf16", 2.0, 0.0, 0.001, 0.0, 0.030, in_gateway=0.001, to_replica=0.006)
    summary = summarize_first_token_spans([known, unknown])
    assert summary["requests"] == 2
    assert summary["to_gateway_ms_p50"] == 20.0 and summary["before_replica_ms_p50"] == 26.0  # the first only
    assert summary["in_gateway_ms_p50"] == 1.5 and summary["to_replica_ms_p50"] == 5.0  # both
    assert summary["in_replica_ms_p50"] == 21.0
