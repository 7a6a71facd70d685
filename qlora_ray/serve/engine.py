"""Token generation for one loaded model: batched, streamed step by step, with per-row sampling.

Two engines share one interface (`generate` yields, per decode step, each row's new token):
- `StaticEngine` runs serve/decoder.py's Decoder over a static KV cache. On CUDA each decode step
  runs through per-layer compiled code and is captured once per batch bucket and attention span as
  a CUDA graph, so a token costs one graph replay plus sampling.
- `TransformersEngine` runs any transformers model (and a base with unmerged peft adapters, the
  baseline the fused models are compared with) through its own forward with a dynamic cache: the
  way a plain transformers server generates.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

# Batch sizes with their own cache (and CUDA graph): a batch runs in the smallest bucket that holds it.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)


# The shortest span of the KV cache a decode step attends over; spans double up to the context.
# Attention reads the span, not the whole cache: a 256-token answer in a 2048-token context reads
# an eighth of it.
FIRST_SPAN = 128


def attention_spans(context: int) -> list[int]:
    """The spans decode steps attend over: FIRST_SPAN, doubling, and the context last."""
    spans = []
    span = FIRST_SPAN
    while span < context:
        spans.append(span)
        span *= 2
    return spans + [context]


def buckets_up_to(batch: int) -> list[int]:
    """The buckets that batches of 1 to `batch` rows run in."""
    return [bucket for bucket in BATCH_BUCKETS if bucket < batch] + [next(b for b in BATCH_BUCKETS if b >= batch)]


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0  # 0 is greedy
    top_p: float = 1.0
    ignore_eos: bool = False  # run to max_new_tokens (benchmarks fix output lengths this way)


class Sampler:
    """The next token of each row [B] from logits [B, vocab]: greedy where temperature is 0, else
    nucleus sampling at the row's temperature and top_p. The per-row settings become device tensors
    once per batch: a tensor built from host values inside the decode loop would wait for the GPU."""

    def __init__(self, params: list[SamplingParams], device: torch.device):
        self.greedy = all(p.temperature == 0 for p in params)
        if not self.greedy:
            self.temperature = torch.tensor([max(p.temperature, 1e-5) for p in params], device=device)
            self.top_p = torch.tensor([p.top_p for p in params], device=device)
            self.is_greedy = torch.tensor([p.temperature == 0 for p in params], device=device)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        greedy = logits.argmax(-1)
        if self.greedy:
            return greedy
        probs = torch.softmax(logits / self.temperature[:, None], dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > self.top_p[:, None]  # the top token always stays
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_probs, 1).squeeze(-1)
        sampled = order.gather(-1, choice[:, None]).squeeze(-1)
        return torch.where(self.is_greedy, greedy, sampled)


def _run(prompts: list[list[int]], params: list[SamplingParams], stop_ids: set[int], prefill, decode,
         device: torch.device) -> Iterator[list[int | None]]:
    """The loop both engines share: prefill, then decode until every row has met a stop token or its
    max_new_tokens. Yields each step's token per row, None for rows already finished.

    The next step is queued on the device before this step's tokens are read back (the read waits
    for the device), so the GPU never idles while the host checks stops and hands tokens out. When
    every row stops on a stop token, that one queued step is wasted."""
    remaining = [p.max_new_tokens for p in params]
    sample = Sampler(params, device)
    logits = prefill()
    step = 0
    while True:
        sampled = sample(logits)
        ahead = decode(sampled, step) if any(r > 1 for r in remaining) else None
        out: list[int | None] = []
        for row, token in enumerate(sampled.tolist()):
            if remaining[row] <= 0:
                out.append(None)
                continue
            out.append(token)
            stops = token in stop_ids and not params[row].ignore_eos
            remaining[row] = 0 if stops else remaining[row] - 1
        yield out
        if not any(r > 0 for r in remaining):
            return
        logits = ahead
        step += 1


class StaticEngine:
    """Generation over serve/decoder.py's Decoder with a static KV cache of `context` positions."""

    def __init__(self, decoder, stop_ids: set[int], *, context: int, cuda_graphs: bool | None = None):
        self.decoder = decoder
        self.stop_ids = stop_ids
        self.context = context
        self.device = decoder.device
        self.cuda_graphs = decoder.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.spans = attention_spans(context)
        self._graphs: dict[tuple[int, int], _StepGraph] = {}  # by batch bucket and attention span
        self._decode_layers = self._prefill_layers = None
        if self.cuda_graphs:
            # The layers run compiled: one compiled region serves every layer of a model. Decode steps
            # have static shapes, one per batch bucket; prompts come in every length, so prefill is
            # compiled for dynamic shapes (eagerly, its launches would outlast its kernels). Each
            # model type held by a process adds its own entries: more than dynamo's default limit of
            # 8, past which it would quietly run eagerly.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self._decode_layers = [torch.compile(layer, dynamic=False) for layer in decoder.layers]
            self._prefill_layers = [torch.compile(layer, dynamic=True) for layer in decoder.layers]

    @property
    def max_batch(self) -> int:
        return BATCH_BUCKETS[-1]

    def warm_up(self, batch_sizes=(1,)) -> None:
        """On CUDA, compile and capture what requests at these batch sizes will run, so that the
        first requests pay for no compilation or graph capture: prompts of one token and of 64 (4-bit
        weights take another path for long prompts), and a decode step over every attention span.
        On the CPU nothing is compiled, so there is nothing to do."""
        if not self.cuda_graphs:
            return
        length = min(64, self.context - 2)
        for size in batch_sizes:
            for prompt in ([0], [0] * length):
                for _ in self.generate([prompt] * size, [SamplingParams(max_new_tokens=2, temperature=0)] * size):
                    pass
            bucket = buckets_up_to(size)[-1]
            self.decoder.use_cache(bucket, self.context)
            for span in self.spans:
                # Writes slot span - 1 of the cache: a request writes every slot it attends to first.
                self._graph(bucket, span, (torch.zeros((bucket, 1), dtype=torch.long, device=self.device),
                                           torch.full((1,), span - 1, device=self.device),
                                           torch.zeros(bucket, dtype=torch.long, device=self.device)))

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> Iterator[list[int | None]]:
        if not prompts or len(prompts) > self.max_batch:
            raise ValueError(f"a batch holds 1 to {self.max_batch} prompts (got {len(prompts)})")
        longest = max(len(p) for p in prompts)
        if longest + max(p.max_new_tokens for p in params) > self.context:
            raise ValueError(f"prompt ({longest} tokens) plus max_tokens exceeds the context of {self.context}")
        bucket = buckets_up_to(len(prompts))[-1]
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
            # output is never used, and no real token attends to it). The mask covers the prompt's
            # slots only, so attention reads no more of the cache than the prompt wrote.
            causal = steps[None, None, :] <= steps[None, :, None]
            real = steps[None, None, :] >= pads[:, None, None]
            own = steps[None, None, :] == steps[None, :, None]
            mask = (causal & (real | own)).unsqueeze(1)
            with torch.inference_mode():
                return self.decoder(tokens, positions, steps, mask, layers=self._prefill_layers)

        slot = torch.full((1,), longest, device=self.device)  # the cache slot of the next decode step

        def decode(last: torch.Tensor, step: int):
            inputs = (last[:, None], slot, pads)
            span = next(s for s in self.spans if s > longest + step)  # the slot this step writes, and before
            if not self.cuda_graphs:
                with torch.inference_mode():
                    logits = self._decode_step(*inputs, span=span)
            else:
                logits = self._graph(bucket, span, inputs).replay(inputs)
            slot.add_(1)  # on the device: no host value enters the loop
            return logits

        for step_tokens in _run(padded_prompts, padded_params, self.stop_ids, prefill, decode, self.device):
            yield step_tokens[:rows]

    def _graph(self, bucket: int, span: int, inputs: tuple[torch.Tensor, ...]) -> _StepGraph:
        graph = self._graphs.get((bucket, span))
        if graph is None:
            graph = self._graphs[bucket, span] = _StepGraph(functools.partial(self._decode_step, span=span), inputs)
        return graph

    def _decode_step(self, tokens: torch.Tensor, slot: torch.Tensor, pads: torch.Tensor, *, span: int) -> torch.Tensor:
        """One token per row at cache slot `slot` [1], attending over the cache's first `span` slots;
        rows are left-padded by `pads` [B]. Everything derived from the step number is computed
        here, inside the captured graph."""
        slots = torch.arange(span, device=self.device)
        positions = (slot - pads)[:, None]
        mask = ((slots[None, :] <= slot) & (slots[None, :] >= pads[:, None]))[:, None, None, :]
        # The compiled layers take the span as a dynamic size: one compilation serves every span
        # but the whole context (a slice of the whole cache specializes).
        torch._dynamo.maybe_mark_dynamic(mask, 3)
        return self.decoder(tokens, positions, slot, mask, layers=self._decode_layers)


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

        yield from _run(prompts, params, self.stop_ids, lambda: forward(ids), decode, self.device)
