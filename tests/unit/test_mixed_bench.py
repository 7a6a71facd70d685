"""The mixed-tenant bench's figures of one level, from samples made up here."""

from __future__ import annotations

from qlora_ray.serve.bench import Sample
from qlora_ray.serve.mixed_bench import summarize_mixed


def sample(started: float, ttft: float, model: str = "acme/bf16.original") -> Sample:
    return Sample(model, 2, started, started + ttft, started + ttft + 1.0, 8, 16)


def test_the_first_round_burst_is_reported_apart_from_the_steady_state():
    # Two clients send their first requests at once (the second waits 2 s for the first's prefill);
    # every later request arrives alone and waits 0.1 s.
    samples = [sample(0.0, 1.0), sample(0.0, 2.0), sample(2.0, 0.1), sample(3.0, 0.1), sample(3.1, 0.1)]
    figures = summarize_mixed(samples)
    assert figures["ttft_ms_p99"] > 1900
    assert figures["ttft_ms_p99_after_first_round"] == 100.0
    assert figures["requests"] == 5 and figures["errors"] == 0
