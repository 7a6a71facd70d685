"""The sampler draws in proportion to the probabilities it keeps (temperature, then top_p), and
the transfers it relies on give the values they were handed."""

from __future__ import annotations

import torch

from qlora_ray.serve.sampling import Sampler, SamplingParams
from qlora_ray.serve.transfers import HostCopy, to_device

ROWS = 20_000


def frequencies(params: SamplingParams, probabilities: list[float]) -> torch.Tensor:
    torch.manual_seed(0)
    logits = torch.tensor(probabilities).log().repeat(ROWS, 1)
    tokens = Sampler([params] * ROWS, torch.device("cpu"))(logits)
    return torch.bincount(tokens, minlength=len(probabilities)).float() / ROWS


def test_sampling_follows_the_probabilities_top_p_keeps():
    # top_p 0.7 keeps the tokens whose preceding mass is at most 0.7: 0.5 and 0.3, renormalized.
    got = frequencies(SamplingParams(max_new_tokens=1, temperature=1.0, top_p=0.7), [0.5, 0.3, 0.15, 0.05])
    assert got[2:].sum() == 0
    assert torch.allclose(got[:2], torch.tensor([0.625, 0.375]), atol=0.015), got


def test_a_temperature_reshapes_the_probabilities_before_the_draw():
    got = frequencies(SamplingParams(max_new_tokens=1, temperature=2.0), [0.64, 0.36])
    assert torch.allclose(got, torch.tensor([0.8, 0.6]) / 1.4, atol=0.015), got  # p ** (1/2), renormalized


def test_greedy_rows_beside_sampled_rows_take_their_top_token():
    torch.manual_seed(0)
    logits = torch.tensor([[0.0, 1.0, 0.5]] * 64)
    params = [SamplingParams(max_new_tokens=1, temperature=0), SamplingParams(max_new_tokens=1, temperature=5.0)] * 32
    tokens = Sampler(params, torch.device("cpu"))(logits)
    assert (tokens[0::2] == 1).all() and len(set(tokens[1::2].tolist())) == 3


def test_transfers_give_back_what_they_were_handed():
    assert to_device([1, 2, 3], torch.device("cpu"), torch.long).tolist() == [1, 2, 3]
    assert to_device([True, False], torch.device("cpu"), torch.bool).dtype == torch.bool
    assert HostCopy([torch.tensor([4, 5]), None]).lists() == [[4, 5], None]


def test_a_draw_of_zero_in_the_race_never_picks_a_dropped_token(monkeypatch):
    # Exp(1) draws may be 0 on some generators: a dropped token's 0 / 0 is NaN, which argmax picks.
    monkeypatch.setattr(torch.Tensor, "exponential_", lambda self, *args, **kwargs: self.zero_())
    logits = torch.tensor([0.05, 0.5, 0.3, 0.15]).log().repeat(8, 1)
    tokens = Sampler([SamplingParams(max_new_tokens=1, temperature=1.0, top_p=0.7)] * 8, torch.device("cpu"))(logits)
    assert tokens.tolist() == [1] * 8
