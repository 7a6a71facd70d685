"""How a row's next token is chosen: its sampling settings, and a sampler for a batch of rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qlora_ray.serve.transfers import to_device


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0  # 0 is greedy
    top_p: float = 1.0
    ignore_eos: bool = False  # run to max_new_tokens (benchmarks fix output lengths this way)


class Sampler:
    """The next token of each row [B] from logits [B, vocab]: greedy where temperature is 0, else
    nucleus sampling at the row's temperature and top_p. The per-row settings become device tensors
    once per set of rows, copied without waiting for the device (serve/transfers.py)."""

    def __init__(self, params: list[SamplingParams], device: torch.device):
        self.greedy = all(p.temperature == 0 for p in params)
        if not self.greedy:
            self.temperature = to_device([max(p.temperature, 1e-5) for p in params], device, torch.float32)
            self.top_p = to_device([p.top_p for p in params], device, torch.float32)
            self.is_greedy = to_device([p.temperature == 0 for p in params], device, torch.bool)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        greedy = logits.argmax(-1)
        if self.greedy:
            return greedy
        probs = torch.softmax(logits / self.temperature[:, None], dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > self.top_p[:, None]  # the top token always stays
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        # A draw in proportion to the kept probabilities: the largest p / E with E ~ Exp(1) (the
        # exponential race). torch.multinomial draws the same way, but first reads checks on the
        # probabilities back to the host, which waits for the device. E is kept above 0: a dropped
        # token's 0 / 0 would be NaN, which argmax takes for the largest.
        race = torch.empty_like(sorted_probs).exponential_().clamp_(min=torch.finfo(sorted_probs.dtype).tiny)
        choice = (sorted_probs / race).argmax(-1)
        sampled = order.gather(-1, choice[:, None]).squeeze(-1)
        return torch.where(self.is_greedy, greedy, sampled)
