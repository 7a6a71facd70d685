"""Token generation for one loaded model: batched, streamed step by step, with per-row sampling.

Two engines share one interface (`generate` yields, per decode step, each row's new token):
- `StaticEngine` runs serve/decoder.py's Decoder over a static KV cache. On CUDA each decode step
  runs through per-layer compiled code and is captured once per batch bucket as a CUDA graph, so
  a token costs one graph replay plus sampling.
- `TransformersEngine` runs any transformers model (and a base with unmerged peft adapters, the
  baseline the fused models are compared with) through its own forward with a dynamic cache: the
  way a plain transformers server generates.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

# Batch sizes with their own cache (and CUDA graph): a batch runs in the smallest bucket that holds it.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0  # 0 is greedy
    top_p: float = 1.0
    ignore_eos: bool = False  # run to max_new_tokens (benchmarks fix output lengths this way)


def sample_tokens(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The next token of each row [B] from logits [B, vocab]: greedy where temperature is 0, else
    nucleus sampling at the row's temperature and top_p."""
    greedy = logits.argmax(-1)
    if all(p.temperature == 0 for p in params):
        return greedy
    device = logits.device
    temperature = torch.tensor([max(p.temperature, 1e-5) for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    probs = torch.softmax(logits / temperature[:, None], dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs > top_p[:, None]  # the top token always stays
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_probs, 1).squeeze(-1)
    sampled = order.gather(-1, choice[:, None]).squeeze(-1)
    is_greedy = torch.tensor([p.temperature == 0 for p in params], device=device)
    return torch.where(is_greedy, greedy, sampled)


def warm_up(engine, batch_sizes) -> None:
    """Two greedy tokens per batch size: the first request then pays no compilation or allocation."""
    for size in batch_sizes:
        for _ in engine.generate([[0]] * size, [SamplingParams(max_new_tokens=2, temperature=0)] * size):
            pass


def _run(prompts: list[list[int]], params: list[SamplingParams], stop_ids: set[int], prefill, decode) -> Iterator[list[int | None]]:
    """The loop both engines share: prefill, then decode until every row has met a stop token or its
    max_new_tokens. Yields each step's token per row, None for rows already finished."""
    remaining = [p.max_new_tokens for p in params]
    logits = prefill()
    step = 0
    while True:
        sampled = sample_tokens(logits, params)
        tokens = sampled.tolist()
        out: list[int | None] = []
        for row, token in enumerate(tokens):
            if remaining[row] <= 0:
                out.append(None)
                continue
            out.append(token)
            stops = token in stop_ids and not params[row].ignore_eos
            remaining[row] = 0 if stops else remaining[row] - 1
        yield out
        if not any(r > 0 for r in remaining):
            return
        logits = decode(sampled, step)
        step += 1


class StaticEngine:
    """Generation over serve/decoder.py's Decoder with a static KV cache of `context` positions."""

    def __init__(self, decoder, stop_ids: set[int], *, context: int, cuda_graphs: bool | None = None):
        self.decoder = decoder
        self.stop_ids = stop_ids
        self.context = context
        self.device = decoder.device
        self.cuda_graphs = decoder.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self._graphs: dict[int, _StepGraph] = {}
        if self.cuda_graphs:
            for layer in decoder.layers:  # one compiled region per layer shape, reused by all layers
                layer.compile(dynamic=False)

    @property
    def max_batch(self) -> int:
        return BATCH_BUCKETS[-1]

    def warm_up(self, batch_sizes=(1,)) -> None:
        """Compile and capture the decode step for these batch sizes now rather than on first use."""
        warm_up(self, batch_sizes)

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> Iterator[list[int | None]]:
        if not prompts or len(prompts) > self.max_batch:
            raise ValueError(f"a batch holds 1 to {self.max_batch} prompts (got {len(prompts)})")
        longest = max(len(p) for p in prompts)
        if longest + max(p.max_new_tokens for p in params) > self.context:
            raise ValueError(f"prompt ({longest} tokens) plus max_tokens exceeds the context of {self.context}")
        bucket = next(b for b in BATCH_BUCKETS if b >= len(prompts))
        rows = len(prompts)
        padded_prompts = prompts + [[0]] * (bucket - rows)
        padded_params = params + [SamplingParams(max_new_tokens=0, temperature=0)] * (bucket - rows)
        pads = torch.tensor([longest - len(p) for p in padded_prompts], device=self.device)
        tokens = torch.tensor([[0] * (longest - len(p)) + p for p in padded_prompts], device=self.device)
        self.decoder.use_cache(bucket, self.context)

        def prefill():
            steps = torch.arange(longest, device=self.device)
            positions = (steps[None, :] - pads[:, None]).clamp(min=0)
            # A real token sees the row's real tokens up to itself; a pad sees only itself (its
            # output is never used, and no real token attends to it).
            slots = torch.arange(self.context, device=self.device)
            causal = slots[None, None, :] <= steps[None, :, None]
            real = slots[None, None, :] >= pads[:, None, None]
            own = slots[None, None, :] == steps[None, :, None]
            mask = (causal & (real | own)).unsqueeze(1)
            # Prompts come in every length: prefill runs eagerly (compiled code is for decode steps).
            with torch.inference_mode(), torch.compiler.set_stance("force_eager"):
                return self.decoder(tokens, positions, steps, mask)

        def decode(last: torch.Tensor, step: int):
            inputs = (last[:, None], torch.tensor([longest + step], device=self.device), pads)
            if not self.cuda_graphs:
                with torch.inference_mode():
                    return self._decode_step(*inputs)
            graph = self._graphs.get(bucket)
            if graph is None:
                graph = self._graphs[bucket] = _StepGraph(self._decode_step, inputs)
            return graph.replay(inputs)

        for step_tokens in _run(padded_prompts, padded_params, self.stop_ids, prefill, decode):
            yield step_tokens[:rows]

    def _decode_step(self, tokens: torch.Tensor, slot: torch.Tensor, pads: torch.Tensor) -> torch.Tensor:
        """One token per row at cache slot `slot` [1]; rows are left-padded by `pads` [B]. Everything
        derived from the step number is computed here, inside the captured graph."""
        slots = torch.arange(self.context, device=self.device)
        positions = (slot - pads)[:, None]
        mask = ((slots[None, :] <= slot) & (slots[None, :] >= pads[:, None]))[:, None, None, :]
        return self.decoder(tokens, positions, slot, mask)


class _StepGraph:
    """One decode step captured as a CUDA graph over static input buffers."""

    def __init__(self, step, example: tuple[torch.Tensor, ...]):
        self.inputs = tuple(t.clone() for t in example)
        with torch.inference_mode():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up runs compile the layers outside the capture
                for _ in range(3):
                    step(*self.inputs)
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.output = step(*self.inputs)

    def replay(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        for static, value in zip(self.inputs, inputs):
            static.copy_(value)
        self.graph.replay()
        return self.output


class TransformersEngine:
    """Generation through a transformers model's own forward and dynamic cache (peft models too)."""

    def __init__(self, model, stop_ids: set[int]):
        self.model = model
        self.stop_ids = stop_ids
        self.device = next(model.parameters()).device
        self.max_batch = BATCH_BUCKETS[-1]

    def warm_up(self, batch_sizes=(1,)) -> None:
        warm_up(self, batch_sizes)

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> Iterator[list[int | None]]:
        from transformers import DynamicCache

        longest = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        cache = DynamicCache()

        def forward(input_ids):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
            with torch.inference_mode():
                out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                 past_key_values=cache, use_cache=True, logits_to_keep=1)
            return out.logits[:, -1].float()

        def decode(last: torch.Tensor, step: int):
            nonlocal mask
            mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
            return forward(last[:, None])

        yield from _run(prompts, params, self.stop_ids, lambda: forward(ids), decode)
