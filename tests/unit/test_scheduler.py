"""The scheduler's rules, driven with a fake engine (the Engine protocol) whose answers are known:
each token is the previous one plus one, so any mix-up between sequences shows."""

from __future__ import annotations

import pytest
import torch

from qlora_ray.serve import scheduler as scheduler_module
from qlora_ray.serve.sampling import SamplingParams
from qlora_ray.serve.scheduler import Scheduler, Sequence
from qlora_ray.serve.transfers import HostCopy

VOCAB = 1000


class CountingEngine:
    """Next token = last token + 1. Records every prefill chunk and decode step it is asked for."""

    device = torch.device("cpu")

    def __init__(self, *, continuous: bool = True, max_batch: int = 4, context: int = 256, stop_ids=()):
        self.continuous, self.max_batch, self.context, self.stop_ids = continuous, max_batch, context, set(stop_ids)
        self.positions = [0] * max_batch
        self.prefills: list[list[tuple[int, int, int]]] = []  # per call: (slot, start, tokens)
        self.decodes: list[list[int]] = []  # per call: the slots
        self.released: list[int] = []

    def prefill(self, slots, chunks, starts):
        self.prefills.append([(slot, start, len(chunk)) for slot, chunk, start in zip(slots, chunks, starts)])
        for slot, chunk, start in zip(slots, chunks, starts):
            assert self.positions[slot] == start, "a chunk must continue where its slot is"
            self.positions[slot] = start + len(chunk)
        return torch.stack([self._logits(chunk[-1] + 1) for chunk in chunks])

    def decode(self, slots, tokens):
        self.decodes.append(list(slots))
        for slot in slots:
            self.positions[slot] += 1
        return torch.stack([self._logits(int(token) + 1) for token in tokens])

    def release(self, slot):
        self.released.append(slot)
        self.positions[slot] = 0

    @staticmethod
    def _logits(token: int) -> torch.Tensor:
        logits = torch.zeros(VOCAB)
        logits[token % VOCAB] = 1.0
        return logits


def greedy(n: int, **kwargs) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0, **kwargs)


def run(scheduler: Scheduler, steps: int, arrivals: dict[int, list[Sequence]] | None = None,
        cancels: dict[int, list[Sequence]] | None = None) -> list[list[tuple[int, int, bool]]]:
    """Steps the scheduler; per step, (sequence's first prompt token, token, finished) emitted."""
    log = []
    for step in range(steps):
        for sequence in (arrivals or {}).get(step, []):
            scheduler.add(sequence)
        for sequence in (cancels or {}).get(step, []):
            scheduler.cancel(sequence)
        log.append([(item.sequence.prompt[0], item.token, item.finished) for item in scheduler.step()])
    return log


def test_a_request_sent_mid_generation_joins_the_running_batch_at_the_next_step():
    engine = CountingEngine()
    scheduler = Scheduler(engine)
    first, second = Sequence([100], greedy(10)), Sequence([500, 501], greedy(3))
    log = run(scheduler, 6, arrivals={0: [first], 3: [second]})
    assert log[0] == [(100, 101, False)]  # the prompt's token
    assert log[3] == [(100, 104, False), (500, 502, False)]  # it joined at once
    assert log[4] == [(100, 105, False), (500, 503, False)]
    assert engine.decodes[3] == [0, 1]  # one decode step for both, launched at the step it joined


def test_a_short_request_next_to_a_long_one_ends_first_and_frees_its_slot():
    engine = CountingEngine()
    scheduler = Scheduler(engine)
    long, short = Sequence([100], greedy(20)), Sequence([500], greedy(3))
    log = run(scheduler, 4, arrivals={0: [long, short]})
    ends = [(step, first) for step, items in enumerate(log) for first, _, finished in items if finished]
    assert ends == [(2, 500)]  # the short one's third token ends it; the long one goes on
    assert engine.released == [1] and scheduler.free == [1, 2, 3]
    assert [token for items in log for first, token, _ in items if first == 500] == [501, 502, 503]
    assert engine.decodes[-1] == [0]  # the next step holds the long one only


def test_a_stop_token_ends_a_sequence_and_ignore_eos_runs_past_it():
    engine = CountingEngine(stop_ids={103})
    scheduler = Scheduler(engine)
    log = run(scheduler, 6, arrivals={0: [Sequence([100], greedy(10)), Sequence([100], greedy(5, ignore_eos=True))]})
    assert [[(token, finished) for _, token, finished in items] for items in log] == [
        [(101, False), (101, False)], [(102, False), (102, False)], [(103, True), (103, False)],
        [(104, False)], [(105, True)], []]


def test_a_cancelled_stream_frees_its_slot_at_the_next_step_for_a_waiting_request():
    engine = CountingEngine(max_batch=1)
    scheduler = Scheduler(engine)
    first, waiting = Sequence([100], greedy(50)), Sequence([500], greedy(2))
    log = run(scheduler, 5, arrivals={0: [first, waiting]}, cancels={2: [first]})
    assert [first for first, _, _ in log[1]] == [100] and log[2] != []  # the waiting one ran at step 2
    assert (500, 501, False) in log[2] and engine.released[0] == 0
    assert all(first == 500 for items in log[2:] for first, _, _ in items)


def test_a_long_prompt_is_spread_over_steps_by_the_budget_and_decode_never_stalls():
    engine = CountingEngine(context=2048)
    scheduler = Scheduler(engine, prefill_chunk=64, prefill_tokens_per_step=64)
    decoding, long_prompt = Sequence([100], greedy(30)), Sequence(list(range(300, 500)), greedy(2))
    log = run(scheduler, 8, arrivals={0: [decoding], 1: [long_prompt]})
    assert [call for call in engine.prefills[1:]] == [[(1, start, 64)] for start in (0, 64, 128)] + [[(1, 192, 8)]]
    assert all(any(first == 100 for first, _, _ in items) for items in log)  # a token every step
    assert (300, 500, False) in log[4]  # the first token once its last chunk is in


def test_while_others_decode_a_step_prefills_up_to_its_budget_across_prompts():
    engine = CountingEngine(context=2048)
    scheduler = Scheduler(engine, prefill_chunk=64, prefill_tokens_per_step=100)
    decoding = Sequence([100], greedy(30))
    burst = [Sequence(list(range(first, first + 40)), greedy(2)) for first in (300, 400, 500)]
    log = run(scheduler, 4, arrivals={0: [decoding], 1: burst})
    assert engine.prefills[1:] == [[(1, 0, 40), (2, 0, 40), (3, 0, 20)], [(3, 20, 20)]]
    assert {first for first, _, _ in log[1]} == {100, 300, 400}  # two first tokens at the burst's first step
    assert all(any(first == 100 for first, _, _ in items) for items in log)  # a token every step


def test_a_lone_long_prompt_is_prefilled_in_chunks_within_one_step():
    engine = CountingEngine(context=2048)
    scheduler = Scheduler(engine, prefill_chunk=128)
    log = run(scheduler, 1, arrivals={0: [Sequence(list(range(1, 301)), greedy(2))]})
    assert engine.prefills == [[(0, 0, 128)], [(0, 128, 128)], [(0, 256, 44)]]
    assert log[0] == [(1, 301, False)]


def test_the_earliest_prompt_of_a_burst_completes_before_a_later_one_takes_the_budget():
    engine = CountingEngine(context=2048)
    scheduler = Scheduler(engine, prefill_chunk=64, prefill_tokens_per_step=200)
    burst = [Sequence(list(range(first, first + 150)), greedy(2)) for first in (300, 500)]
    log = run(scheduler, 2, arrivals={0: burst})
    # Step 0: all of the first prompt in three rounds of chunks, the rest of the budget to the second.
    assert engine.prefills[:3] == [[(0, 0, 64), (1, 0, 50)], [(0, 64, 64)], [(0, 128, 22)]]
    assert engine.prefills[3:] == [[(1, 50, 64)], [(1, 114, 36)]]
    assert log[0] == [(300, 450, False)] and (500, 650, False) in log[1]


def test_a_burst_into_an_idle_engine_gets_its_first_tokens_budget_by_budget():
    engine = CountingEngine(context=2048)
    scheduler = Scheduler(engine, prefill_chunk=64, prefill_tokens_per_step=100)
    burst = [Sequence(list(range(first, first + 50)), greedy(3)) for first in (300, 400, 500)]
    log = run(scheduler, 3, arrivals={0: burst})
    assert engine.prefills == [[(0, 0, 50), (1, 0, 50)], [(2, 0, 50)]]
    assert {first for first, _, _ in log[0]} == {300, 400}  # the first two answer before the third is in


def test_a_group_engine_gets_whole_groups_and_releases_them_together():
    engine = CountingEngine(continuous=False)
    scheduler = Scheduler(engine)
    short, long, late = Sequence([100], greedy(2)), Sequence([200], greedy(4)), Sequence([300], greedy(2))
    log = run(scheduler, 7, arrivals={0: [short, long], 1: [late]})
    assert engine.prefills[0] == [(0, 0, 1), (1, 0, 1)]
    assert engine.decodes[:3] == [[0, 1]] * 3  # the finished short row stays in its group's steps
    assert [first for items in log[:4] for first, _, _ in items].count(300) == 0  # the late one waits
    assert engine.released[:2] == [0, 1]
    assert any(first == 300 for items in log[4:] for first, _, _ in items)


def test_a_request_that_cannot_fit_its_slot_is_refused():
    scheduler = Scheduler(CountingEngine(context=64))
    with pytest.raises(ValueError, match="exceeds the context of 64"):
        scheduler.add(Sequence([1] * 60, greedy(8)))


def test_a_step_queues_its_tokens_copy_to_the_host_before_the_next_decode_step_and_reads_them_after(monkeypatch):
    """The read-back must not wait for the decode step launched in the same step: on a GPU the copy
    queued after that step would wait for it (tests/gpu/test_serve_gpu.py checks the device side)."""
    calls = []

    class RecordingCopy(HostCopy):
        def __init__(self, tensors):
            calls.append("copy")
            super().__init__(tensors)

        def lists(self):
            calls.append("read")
            return super().lists()

    monkeypatch.setattr(scheduler_module, "HostCopy", RecordingCopy)
    engine = CountingEngine()
    decode = engine.decode
    engine.decode = lambda slots, tokens: (calls.append("decode"), decode(slots, tokens))[1]
    log = run(Scheduler(engine), 3, arrivals={0: [Sequence([100], greedy(3))]})
    assert log == [[(100, 101, False)], [(100, 102, False)], [(100, 103, True)]]
    assert calls == ["copy", "decode", "read"] * 2 + ["copy", "read"]  # no step after the last token
