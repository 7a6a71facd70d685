"""The engines that run a loaded model for the scheduler (serve/scheduler.py), one step at a time.

An engine holds a KV cache of `max_batch` slots, one per sequence, and does three things: prefill a
prompt (or a chunk of one) into a slot, run one decode step over a set of slots, and free a slot.
The scheduler decides which sequences run, samples their tokens and hands them out; the engine
knows nothing of requests. Two engines:

- `StaticEngine` runs serve/decoder.py's Decoder over a static KV cache in which every slot keeps its
  own position, so sequences join and leave between any two decode steps (continuous batching). On
  CUDA each decode step runs through per-layer compiled code and is captured once per batch bucket
  and attention span as a CUDA graph: a token costs one graph replay plus sampling. Prompts are
  padded to a few fixed shapes and replayed from CUDA graphs too: run eagerly, a prompt's hundreds
  of kernel launches take several times as long as its kernels.
- `TransformersEngine` runs any transformers model (and a base with unmerged peft adapters, the
  baseline the fused models are compared with) through its own forward with a dynamic cache, the
  way a plain transformers server generates: rows start together and decode together until the last
  one ends (`continuous = False`: the scheduler admits a new group only when the last one is done).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from qlora_ray.serve.transfers import to_device

log = logging.getLogger(__name__)

# Batch sizes with their own CUDA graph: a decode step runs in the smallest bucket that holds the
# highest occupied slot (the scheduler fills the lowest free slots first).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

# The shortest span of the KV cache a decode step attends over; spans double up to the context.
# Attention reads the span, not the whole cache: a 256-token answer in a 2048-token context reads
# an eighth of it.
FIRST_SPAN = 128


# The shapes a prefill is padded to on CUDA, each with its own CUDA graph: its rows (prompts prefilled
# together), their chunks' length, and the span of the cache it attends over (from FIRST_PREFILL_SPAN,
# doubling: a prompt's attention is a small part of its cost). Longer chunks (the scheduler's are at
# most the longest) and more rows run without a graph.
PREFILL_ROW_BUCKETS = (1, 2, 4, 8)
PREFILL_LENGTH_BUCKETS = (32, 64, 128, 256, 512)
FIRST_PREFILL_SPAN = 512

# Prompt tokens, padding included, that one prefill forward may hold: several prompts arriving
# together are prefilled in one forward (the scheduler's budget per step is smaller while others
# decode); an 8B model's activations for this many tokens take well under a GiB.
PREFILL_TOKENS_PER_FORWARD = 8192


def attention_spans(context: int, first: int = FIRST_SPAN) -> list[int]:
    """The spans steps attend over: `first`, doubling, and the context last."""
    spans = []
    span = first
    while span < context:
        spans.append(span)
        span *= 2
    return spans + [context]


def bucket_for(size: int, buckets: Sequence[int] = BATCH_BUCKETS) -> int:
    """The smallest of `buckets` that holds `size` (by default: the batch bucket `size` rows run in)."""
    return next(bucket for bucket in buckets if bucket >= size)


def prefill_groups(lengths: list[int], tokens_per_forward: int = PREFILL_TOKENS_PER_FORWARD,
                   max_rows: int | None = None) -> list[list[int]]:
    """Chunks of these lengths, shortest first, split into the groups prefilled in one forward each:
    a group's rows padded to its longest (last) chunk hold at most `tokens_per_forward` tokens (a
    longer chunk goes alone), which bounds a forward's activations, and at most `max_rows` rows."""
    groups: list[list[int]] = []
    for index, length in enumerate(lengths):
        if groups and (len(groups[-1]) + 1) * length <= tokens_per_forward and \
                (max_rows is None or len(groups[-1]) < max_rows):
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


def buckets_up_to(size: int, buckets: tuple[int, ...] = BATCH_BUCKETS) -> list[int]:
    """The buckets that sizes 1 to `size` run in (all of them if `size` exceeds the last)."""
    top = bucket_for(min(size, buckets[-1]), buckets)
    return [bucket for bucket in buckets if bucket <= top]


class Engine(Protocol):
    """What the scheduler drives. Slots are 0 .. max_batch - 1; each slot's next position is kept by
    the engine: a prefill of n tokens from `start` leaves it at start + n, a decode step advances it
    by one, and a release sets it back to 0."""

    stop_ids: set[int]
    context: int  # prompt and answer tokens a slot holds
    max_batch: int  # slots
    device: torch.device
    continuous: bool  # False: a group of slots is prefilled together and decoded together to its end

    def prefill(self, slots: list[int], chunks: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Write each chunk into its slot from position `start`; the logits [len(slots), vocab] after
        each chunk's last token."""

    def decode(self, slots: list[int], tokens: torch.Tensor) -> torch.Tensor:
        """One token per slot (tokens [len(slots)], on the device) at the slot's next position; the
        logits [len(slots), vocab] after it."""

    def release(self, slot: int) -> None:
        """The slot's sequence is over: its cache may be reused."""


class StaticEngine:
    """Continuous batching over serve/decoder.py's Decoder: a static cache of `max_batch` slots by
    `context` positions, each slot at its own position.

    `static_prefill` (default: with CUDA graphs) pads prefills to the PREFILL_* shapes, which the
    CUDA graphs replay."""

    continuous = True

    def __init__(self, decoder, stop_ids: set[int], *, context: int, max_batch: int = 8, cuda_graphs: bool | None = None,
                 static_prefill: bool | None = None,
                 capturing: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        """`capturing`: a context each CUDA graph is captured in; a replica's keeps its other models'
        steps from running meanwhile (serve/step_loop.StepLoop.paused)."""
        if max_batch > BATCH_BUCKETS[-1]:
            raise ValueError(f"max_batch is at most {BATCH_BUCKETS[-1]} (got {max_batch})")
        self.decoder = decoder
        self.stop_ids = stop_ids
        self.capturing = capturing
        self.context = context
        self.max_batch = max_batch
        self.device = decoder.device
        self.cuda_graphs = decoder.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.spans = attention_spans(context)
        self.static_prefill = self.cuda_graphs if static_prefill is None else static_prefill
        self.prefill_spans = attention_spans(context, FIRST_PREFILL_SPAN)
        # A slot's next position: on the device, read by decode steps (no host value enters a step);
        # on the host, to choose the attention span. A slot that is free or half prefilled is at the
        # slot its next prefill chunk will write, so a decode step's write there is overwritten.
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.host_positions = [0] * max_batch
        decoder.reserve_cache(max_batch, context)
        self._graphs: dict[tuple[int, int], _StepGraph] = {}  # by batch bucket and attention span
        self._prefill_graphs: dict[tuple[int, int, int], _StepGraph] = {}  # by rows, length and span
        # One memory pool for the prefill graphs' activations: they never run at the same time.
        self._prefill_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self._decode_layers = self._prefill_layers = None
        if self.cuda_graphs:
            # The layers run compiled: one compiled region serves every layer of a model. Decode steps
            # have static shapes, one per batch bucket; prompts come in every length, so prefill is
            # compiled for dynamic shapes: one compilation serves every static prefill shape's
            # graph and the prompts beyond them (uncompiled, their launches would outlast their
            # kernels even more). Each
            # model type held by a process adds its own entries: more than dynamo's default limit of
            # 8, past which it would quietly run eagerly.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self._decode_layers = [torch.compile(layer, dynamic=False) for layer in decoder.layers]
            self._prefill_layers = [torch.compile(layer, dynamic=True) for layer in decoder.layers]

    def warm_up(self) -> None:
        """On CUDA, compile and capture what requests will run, so that the first requests pay for no
        compilation or graph capture: a prefill graph for every shape prompts are padded to, prompts
        of one token and of 64 (4-bit weights take another path for long prompts), alone and two
        together (a batch of one row compiles on its own), and a decode step in every batch bucket
        over every attention span. On the CPU nothing is compiled, so there is nothing to do."""
        if not self.cuda_graphs:
            return
        if self.static_prefill:
            lengths = buckets_up_to(self.context, PREFILL_LENGTH_BUCKETS)
            for rows in buckets_up_to(self.max_batch, PREFILL_ROW_BUCKETS):
                for length in lengths:
                    for span in self.prefill_spans:
                        self._prefill_graph((rows, length, span))
        for prompt in ([0], [0] * min(64, self.context - 1)):
            for rows in ([0], [0, 1])[:self.max_batch]:
                self.prefill(rows, [prompt] * len(rows), [0] * len(rows))
                for row in rows:
                    self.release(row)
        for bucket in buckets_up_to(self.max_batch):
            positions = torch.zeros(bucket, dtype=torch.long, device=self.device)
            for span in self.spans:
                # Writes slot span - 1 of free rows: a sequence writes every slot it attends to first.
                self._graph(bucket, span, (torch.zeros((bucket, 1), dtype=torch.long, device=self.device),
                                           positions.fill_(span - 1).clone()))
        torch.cuda.synchronize()

    def prefill(self, slots: list[int], chunks: list[list[int]], starts: list[int]) -> torch.Tensor:
        for chunk, start in zip(chunks, starts):
            if not chunk or start + len(chunk) > self.context:
                raise ValueError(f"a prompt chunk must hold 1 to {self.context - start} tokens (got {len(chunk)})")
        # Shortest first, so that the chunks padded together are of similar lengths.
        order = sorted(range(len(chunks)), key=lambda index: len(chunks[index]))
        logits = []
        max_rows = PREFILL_ROW_BUCKETS[-1] if self.static_prefill else None
        for group in prefill_groups([len(chunks[index]) for index in order], max_rows=max_rows):
            chosen = [order[position] for position in group]
            logits.append(self._prefill_together([slots[i] for i in chosen], [chunks[i] for i in chosen],
                                                 [starts[i] for i in chosen]))
        logits = torch.cat(logits)
        if order != sorted(order):
            logits = logits[to_device(torch.tensor(order).argsort(), self.device)]
        for slot, chunk, start in zip(slots, chunks, starts):
            # fill_: a Python number assigned by indexing travels as a host tensor, a copy that waits
            # for the device
            self.positions[slot].fill_(start + len(chunk))
            self.host_positions[slot] = start + len(chunk)
        return logits

    def _prefill_together(self, slots: list[int], chunks: list[list[int]], starts: list[int]) -> torch.Tensor:
        """One forward over several chunks, each in its own row, padded to the longest (or to a static
        prefill's shape): a batch of prompts costs about one forward of its tokens, not one per
        prompt. A padding token sits at the positions after its row's chunk, which the row writes
        before it reads them (the last real token attends only up to itself), or at the cache's spare
        position past the context; a padding row has only padding tokens, all at that spare position
        (of the first chunk's cache row)."""
        longest, count = max(len(chunk) for chunk in chunks), len(chunks)
        seen = max(start + len(chunk) for chunk, start in zip(chunks, starts))
        shape = self._prefill_shape(count, longest, seen)
        rows, length = shape[:2] if shape else (count, longest)
        padding = rows - count
        tokens = torch.tensor([chunk + [0] * (length - len(chunk)) for chunk in chunks] + [[0] * length] * padding)
        positions = torch.tensor(starts + [self.context] * padding)[:, None] + torch.arange(length)[None, :]
        last = torch.tensor([len(chunk) - 1 for chunk in chunks] + [0] * padding)
        # One copy to the device for all four.
        packed = to_device(torch.cat([tokens.flatten(), positions.clamp(max=self.context).flatten(), last,
                                      torch.tensor(slots + slots[:1] * padding)]), self.device)
        tokens, positions, last, cache_rows = packed.split([rows * length, rows * length, rows, rows])
        inputs = (tokens.view(rows, length), positions.view(rows, length), last, cache_rows)
        if shape is None:
            with torch.inference_mode():
                return self._prefill_step(*inputs, span=seen)
        if self.cuda_graphs:
            return self._prefill_graph(shape).replay(inputs)[:count]
        with torch.inference_mode():
            return self._prefill_step(*inputs, span=shape[2])[:count]

    def _prefill_shape(self, count: int, longest: int, seen: int) -> tuple[int, int, int] | None:
        """The static prefill shape (rows, length, span) that `count` chunks of at most `longest`
        tokens, reaching up to slot `seen`, are padded to; None without static prefills or beyond them."""
        if not self.static_prefill or count > PREFILL_ROW_BUCKETS[-1] or longest > PREFILL_LENGTH_BUCKETS[-1]:
            return None
        return (bucket_for(count, PREFILL_ROW_BUCKETS), bucket_for(longest, PREFILL_LENGTH_BUCKETS),
                bucket_for(seen, self.prefill_spans))

    def _prefill_step(self, tokens: torch.Tensor, positions: torch.Tensor, last: torch.Tensor, rows: torch.Tensor,
                      *, span: int) -> torch.Tensor:
        """Chunks (tokens [R, T]) at their positions ([R, T]: the slots they write) into cache rows
        [R], each token attending over its row's slots up to its own within the cache's first `span`;
        the logits after each row's token `last` [R]."""
        mask = (torch.arange(span, device=self.device)[None, None, :] <= positions[:, :, None])[:, None]
        return self.decoder(tokens, positions, mask, rows=rows, layers=self._prefill_layers, last=last)

    def _prefill_graph(self, shape: tuple[int, int, int]) -> _StepGraph:
        graph = self._prefill_graphs.get(shape)
        if graph is None:
            rows, length, span = shape
            # Captured on padding alone (the spare position): its warm-up runs write nowhere a
            # sequence reads.
            example = (torch.zeros((rows, length), dtype=torch.long, device=self.device),
                       torch.full((rows, length), self.context, dtype=torch.long, device=self.device),
                       torch.zeros(rows, dtype=torch.long, device=self.device),
                       torch.zeros(rows, dtype=torch.long, device=self.device))
            graph = self._prefill_graphs[shape] = _StepGraph(functools.partial(self._prefill_step, span=span), example,
                                                             self.capturing, pool=self._prefill_pool)
        return graph

    def decode(self, slots: list[int], tokens: torch.Tensor) -> torch.Tensor:
        bucket = bucket_for(max(slots) + 1)
        top = max(self.host_positions[slot] for slot in slots)
        if top >= self.context:
            raise ValueError(f"a decode step past the context of {self.context}")
        span = next(s for s in self.spans if s > top)  # the slots this step writes, and before
        index = to_device(slots, self.device, torch.long)
        step_tokens = torch.zeros((bucket, 1), dtype=torch.long, device=self.device)
        step_tokens[index, 0] = tokens
        inputs = (step_tokens, self.positions[:bucket].clone())
        if not self.cuda_graphs:
            with torch.inference_mode():
                logits = self._decode_step(*inputs, span=span)
        else:
            logits = self._graph(bucket, span, inputs).replay(inputs)
        self.positions[index] += 1  # on the device: queued behind the step, no wait
        for slot in slots:
            self.host_positions[slot] += 1
        return logits.index_select(0, index)

    def release(self, slot: int) -> None:
        self.positions[slot].zero_()
        self.host_positions[slot] = 0

    def serve_another(self, stop_ids: set[int]) -> None:
        """Start over for another model whose weights were just copied into this engine's tensors
        (serve/switching.py): every slot free. Its compiled layers and CUDA graphs stay: they read
        the same tensors."""
        self.stop_ids = stop_ids
        self.positions.zero_()
        self.host_positions = [0] * self.max_batch

    def _graph(self, bucket: int, span: int, inputs: tuple[torch.Tensor, ...]) -> _StepGraph:
        graph = self._graphs.get((bucket, span))
        if graph is None:
            graph = self._graphs[bucket, span] = _StepGraph(functools.partial(self._decode_step, span=span), inputs,
                                                            self.capturing)
        return graph

    def _decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, *, span: int) -> torch.Tensor:
        """One token per row (tokens [B, 1]) at its row's position (positions [B]: the slot it writes),
        attending over its row's slots up to its own within the cache's first `span`. Computed from
        the positions inside the captured graph."""
        slots = torch.arange(span, device=self.device)
        mask = (slots[None, :] <= positions[:, None])[:, None, None, :]
        # The compiled layers take the span as a dynamic size: one compilation serves every span.
        torch._dynamo.maybe_mark_dynamic(mask, 3)
        return self.decoder(tokens, positions[:, None], mask, layers=self._decode_layers)


class _StepGraph:
    """One step (a decode step, or a prefill of a static shape) captured as a CUDA graph over static
    input buffers."""

    def __init__(self, step, example: tuple[torch.Tensor, ...], capturing=contextlib.nullcontext, pool=None):
        """`capturing`: the context the capture itself runs in (StaticEngine's)."""
        self.inputs = tuple(t.clone() for t in example)
        with torch.inference_mode():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up runs compile the layers outside the capture
                for _ in range(3):
                    step(*self.inputs)
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: a CUDA call of another thread of the replica (its health check's
            # memory query) neither fails nor breaks the capture, as CUDA's global mode would.
            with capturing(), torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
                self.output = step(*self.inputs)

    def replay(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        for static, value in zip(self.inputs, inputs):
            static.copy_(value)
        self.graph.replay()
        return self.output


class TransformersEngine:
    """A transformers model's own forward and dynamic cache (peft models too): one group of rows at a
    time, left-padded to the longest prompt, decoded together until the scheduler releases them all."""

    continuous = False

    def __init__(self, model, stop_ids: set[int], *, context: int, max_batch: int = 8):
        self.model = model
        self.stop_ids = stop_ids
        self.context = context
        self.max_batch = max_batch
        self.device = next(model.parameters()).device
        self._group: list[int] = []  # the slots of the group being generated, in row order
        self._mask = self._cache = None

    def prefill(self, slots: list[int], chunks: list[list[int]], starts: list[int]) -> torch.Tensor:
        from transformers import DynamicCache

        if self._group or any(starts):
            raise ValueError("this engine prefills one whole group of prompts at a time")
        longest = max(len(chunk) for chunk in chunks)
        ids = torch.tensor([[0] * (longest - len(c)) + c for c in chunks], device=self.device)
        self._mask = torch.tensor([[0] * (longest - len(c)) + [1] * len(c) for c in chunks], device=self.device)
        self._cache, self._group = DynamicCache(), list(slots)
        return self._forward(ids)

    def decode(self, slots: list[int], tokens: torch.Tensor) -> torch.Tensor:
        if slots != self._group:
            raise ValueError(f"this engine decodes its whole group {self._group} at each step (got {slots})")
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(slots), 1)], dim=1)
        return self._forward(tokens[:, None])

    def release(self, slot: int) -> None:
        if slot in self._group:
            self._group.remove(slot)
        if not self._group:
            self._mask = self._cache = None

    def _forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = (self._mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        with torch.inference_mode():
            out = self.model(input_ids=input_ids, attention_mask=self._mask, position_ids=positions,
                             past_key_values=self._cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()
