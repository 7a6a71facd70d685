"""Iteration-level scheduling (continuous batching) over one engine (serve/engine.py).

Every `step()`:
1. samples the tokens of the decode step launched by the previous one;
2. admits waiting sequences into free slots and prefills prompts: at most PREFILL_TOKENS_PER_STEP
   prompt tokens a step (so decode is never stalled for long), first come first served (a burst
   of prompts gets its first tokens one after another rather than all after the last), in chunks
   of at most PREFILL_CHUNK tokens; a prompt's last chunk gives its first token;
3. launches the next decode step for every sequence still generating, the ones that just got their
   first token included, before reading the sampled tokens back: their copies to the host are queued
   ahead of that step (serve/transfers.py), so the device runs the next step while the host checks
   stops and hands tokens out, and no copy or sampling on the way makes the host wait for the
   device (with StaticEngine: TransformersEngine's own forward reads values back, as a plain
   transformers server's does);
4. reads the tokens back and returns them; a sequence that meets a stop token or its max_new_tokens
   leaves at once, and its slot is free for the next step.

So a request joins the running batch at the next step, and a short answer is not held back by a
long one. A sequence's output for a step launched before it was known to be finished is dropped.
Engines that cannot batch sequences at different positions (`continuous = False`) get whole groups:
a group is admitted only when the previous one is over, and its slots are released together.

The scheduler is plain synchronous Python, so tests drive it directly with a fake engine;
serve/batcher.py runs it for the async server, in the replica's step loop (serve/step_loop.py)
with its other models, and `generate` runs it to the end.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from qlora_ray.serve.engine import Engine
from qlora_ray.serve.sampling import Sampler, SamplingParams
from qlora_ray.serve.transfers import HostCopy, to_device

# The longest chunk of one prompt in one forward (the longest static prefill shape, serve/engine.py:
# a longer chunk runs without a CUDA graph, so a lone long prompt too is prefilled in chunks), and
# the prompt tokens of all sequences in a step. A prefill of 512 tokens takes about as long as two
# decode steps of an 8B model at batch 32: a step with a full budget delays the others' next tokens
# by several steps' time, once, while a burst of new requests gets its first tokens that many times
# sooner than at one chunk a step.
PREFILL_CHUNK = 512
PREFILL_TOKENS_PER_STEP = 2048


@dataclass(eq=False)
class Sequence:
    """One request as the scheduler sees it."""

    prompt: list[int]
    params: SamplingParams
    slot: int | None = None
    prefilled: int = 0
    generated: int = 0
    done: bool = False
    cancelled: bool = field(default=False, repr=False)


@dataclass(frozen=True)
class Emitted:
    """A sequence's new token; `finished` if it is its last (a stop token or max_new_tokens)."""

    sequence: Sequence
    token: int
    finished: bool


class Scheduler:
    def __init__(self, engine: Engine, *, max_batch: int | None = None, prefill_chunk: int = PREFILL_CHUNK,
                 prefill_tokens_per_step: int = PREFILL_TOKENS_PER_STEP):
        self.engine = engine
        self.rows = min(max_batch or engine.max_batch, engine.max_batch)
        self.prefill_chunk = prefill_chunk
        self.prefill_tokens_per_step = prefill_tokens_per_step
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.running: list[Sequence] = []  # sequences whose next token comes from a decode step
        self.free = list(range(self.rows))
        self._inflight: tuple[list[Sequence], torch.Tensor] | None = None  # a decode step not yet sampled
        self._samplers: dict[tuple[int, ...], Sampler] = {}
        self._lock = threading.Lock()  # add and cancel come from other threads than step
        # (wall-clock time, rows) of recent decode steps: the resident route reports their mean since a time
        self.decode_batches: deque[tuple[float, int]] = deque(maxlen=10_000)

    def add(self, sequence: Sequence) -> None:
        """Queue a sequence; ValueError if its prompt and max_new_tokens do not fit a slot."""
        needed = len(sequence.prompt) + sequence.params.max_new_tokens
        if not sequence.prompt or sequence.params.max_new_tokens < 1 or needed > self.engine.context:
            raise ValueError(f"prompt ({len(sequence.prompt)} tokens) plus max_tokens "
                             f"({sequence.params.max_new_tokens}) exceeds the context of {self.engine.context}")
        with self._lock:
            self.waiting.append(sequence)

    def cancel(self, sequence: Sequence) -> None:
        """Drop a sequence (its client is gone): its slot is free at the next step."""
        sequence.cancelled = True

    def has_work(self) -> bool:
        with self._lock:
            return bool(self.waiting or self.prefilling or self.running or self._inflight)

    def step(self) -> list[Emitted]:
        self._retire_cancelled()
        decoded_rows, decoded = self._sample_inflight()
        first_rows, firsts = self._prefill()
        readback = HostCopy([decoded, firsts])  # queued before the next decode step, so not waiting for it
        self._launch(decoded_rows, decoded, first_rows, firsts)
        emitted = []
        for rows, tokens in zip((decoded_rows, first_rows), readback.lists()):
            for sequence, token in zip(rows, tokens if rows else []):
                if sequence.done:
                    continue
                sequence.generated += 1
                finished = (token in self.engine.stop_ids and not sequence.params.ignore_eos) or \
                    sequence.generated >= sequence.params.max_new_tokens
                emitted.append(Emitted(sequence, token, finished))
                if finished:
                    self._finish(sequence)
        return emitted

    def reset(self) -> list[Sequence]:
        """Drop every sequence and free every slot (after an engine error); returns the dropped ones."""
        with self._lock:
            dropped = list(self.waiting) + self.prefilling + self.running
            self.waiting.clear()
        for sequence in self.prefilling + self.running:
            if sequence.slot is not None:
                self.engine.release(sequence.slot)
        self.prefilling, self.running, self._inflight = [], [], None
        self.free = list(range(self.rows))
        return dropped

    # -- the parts of a step -----------------------------------------------------------------
    def _retire_cancelled(self) -> None:
        with self._lock:
            self.waiting = deque(s for s in self.waiting if not s.cancelled)
        for sequence in [s for s in self.prefilling + self.running if s.cancelled and not s.done]:
            self._finish(sequence)

    def _sample_inflight(self) -> tuple[list[Sequence], torch.Tensor | None]:
        if self._inflight is None:
            return [], None
        rows, logits = self._inflight
        self._inflight = None
        return rows, self._sample(rows, logits)

    def _prefill(self) -> tuple[list[Sequence], torch.Tensor | None]:
        """Admit waiting sequences into free slots; prefill within the step's budget, first come first
        served: the earliest prompt takes what it needs (up to the budget) before the next one gets
        any, so a burst's prompts complete one after another instead of all in its last step (as
        vLLM's scheduler hands its token budget out). A sequence's part is cut into chunks of at
        most `prefill_chunk` tokens, each prefilled in its own round: one engine call per round, its
        chunks from several prompts together. Returns the sequences whose prompt is complete and
        their first tokens (sampled, on the device)."""
        self._admit()
        budget = self.prefill_tokens_per_step if self.engine.continuous else None  # else the whole group
        takes = []
        for sequence in self.prefilling:
            left = len(sequence.prompt) - sequence.prefilled
            take = left if budget is None else min(left, budget)
            if take <= 0:
                break
            takes.append((sequence, take))
            if budget is not None:
                budget -= take
        complete, last_logits = [], []
        step = self.prefill_chunk if self.engine.continuous else None
        while takes:
            work = [(sequence, min(take, step or take)) for sequence, take in takes]
            logits = self.engine.prefill(
                [s.slot for s, _ in work],
                [s.prompt[s.prefilled:s.prefilled + length] for s, length in work],
                [s.prefilled for s, _ in work])
            done_here = []
            for index, (sequence, length) in enumerate(work):
                sequence.prefilled += length
                if sequence.prefilled == len(sequence.prompt):
                    done_here.append(index)
            if done_here:
                complete += [work[index][0] for index in done_here]
                last_logits.append(logits if len(done_here) == len(work)
                                   else logits[to_device(done_here, logits.device, torch.long)])
            takes = [(sequence, take - length) for (sequence, take), (_, length) in zip(takes, work) if take > length]
        if not complete:
            return [], None
        for sequence in complete:
            self.prefilling.remove(sequence)
            self.running.append(sequence)
        chosen = last_logits[0] if len(last_logits) == 1 else torch.cat(last_logits)
        return complete, self._sample(complete, chosen)

    def _admit(self) -> None:
        if not self.engine.continuous and (self.running or self.prefilling):
            return  # a group at a time
        with self._lock:
            while self.waiting and self.free:
                sequence = self.waiting.popleft()
                if sequence.cancelled:
                    continue
                sequence.slot = self.free.pop(0)
                self.prefilling.append(sequence)

    def _launch(self, decoded_rows, decoded, first_rows, firsts) -> None:
        """Queue the next decode step for every sequence that may still generate. Whether a sampled
        token is a stop token is not known before it is read back, so such rows are included; their
        output is dropped if it was. Engines of whole groups decode every row of the group."""
        rows, parts = [], []
        for group, sampled in ((decoded_rows, decoded), (first_rows, firsts)):
            keep = [index for index, sequence in enumerate(group)
                    if not sequence.done and sequence.generated + 1 < sequence.params.max_new_tokens]
            if keep:
                rows += [group[index] for index in keep]
                # one op for the group's tokens, not a slice a row (64 at batch 64, each an op's host time)
                parts.append(sampled if len(keep) == len(group) else sampled[to_device(keep, sampled.device, torch.long)])
        if not rows:
            return
        tokens = parts[0] if len(parts) == 1 else torch.cat(parts)
        if not self.engine.continuous:
            # the whole group, its finished rows with a filler token
            position = {id(sequence): index for index, sequence in enumerate(rows)}
            rows = list(self.running)
            tokens = torch.cat([tokens, tokens.new_zeros(1)])[
                to_device([position.get(id(s), len(position)) for s in rows], tokens.device, torch.long)]
        self.decode_batches.append((time.time(), len(rows)))
        logits = self.engine.decode([s.slot for s in rows], tokens)
        self._inflight = (rows, logits)

    def _finish(self, sequence: Sequence) -> None:
        sequence.done = True
        if sequence in self.prefilling:
            self.prefilling.remove(sequence)
        if not self.engine.continuous:
            if all(s.done for s in self.running + self.prefilling):
                for member in self.running + self.prefilling:
                    self.engine.release(member.slot)
                    self.free.append(member.slot)
                self.running, self.prefilling = [], []
                self.free.sort()
            return
        if sequence in self.running:
            self.running.remove(sequence)
        # The step already launched for it (if any) runs first: the device works in order.
        self.engine.release(sequence.slot)
        self.free.append(sequence.slot)
        self.free.sort()

    def _sample(self, rows: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        key = tuple((id(s), s.params) for s in rows)  # params too: a finished sequence's id may be reused
        sampler = self._samplers.get(key)
        if sampler is None:
            if len(self._samplers) > 64:
                self._samplers.clear()
            sampler = self._samplers[key] = Sampler([s.params for s in rows], logits.device)
        return sampler(logits)


def generate(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]) -> Iterator[list[int | None]]:
    """Run prompts to the end together, as one batch: yields per step each row's new token (None for
    a row that is done). Warm-ups, benchmarks and tests use it; the server uses the scheduler itself."""
    if not prompts or len(prompts) > engine.max_batch:
        raise ValueError(f"a batch holds 1 to {engine.max_batch} prompts (got {len(prompts)})")
    scheduler = Scheduler(engine)
    sequences = [Sequence(list(prompt), p) for prompt, p in zip(prompts, params)]
    for sequence in sequences:
        scheduler.add(sequence)
    row_of = {id(s): row for row, s in enumerate(sequences)}
    while scheduler.has_work():
        emitted = scheduler.step()
        if emitted:
            out: list[int | None] = [None] * len(sequences)
            for item in emitted:
                out[row_of[id(item.sequence)]] = item.token
            yield out
