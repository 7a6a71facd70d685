"""The serving engines and the scheduler on a tiny random Llama (fp32, CPU): every sequence must
generate exactly what transformers generates for that prompt alone, whether it runs in a batch,
joins one mid-generation, or is prefilled in chunks between other sequences' decode steps."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest
import torch
from transformers import LlamaForCausalLM

from qlora_ray.serve.batcher import Batcher
from qlora_ray.serve.engine import (
    FIRST_PREFILL_SPAN,
    FIRST_SPAN,
    PREFILL_ROW_BUCKETS,
    StaticEngine,
    TransformersEngine,
    buckets_up_to,
    prefill_groups,
)
from qlora_ray.serve.sampling import SamplingParams
from qlora_ray.serve.scheduler import Scheduler, Sequence, generate
from qlora_ray.serve.step_loop import StepLoop
from qlora_ray.serve.weights import build_decoder
from qlora_ray.shapes import shape_config

PROMPTS = [[5, 17, 99, 3, 42], [7] * 3 + list(range(20, 34)), [250, 1, 2, 3, 4, 5, 6, 7, 8]]
NEW_TOKENS = 12


def greedy(max_new_tokens: int = NEW_TOKENS, **kwargs) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0, **kwargs)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = LlamaForCausalLM(shape_config("tiny")).eval()
    # The engines are given no stop token here; transformers' reference must not know one either
    # (with min_new_tokens it would forbid the EOS token wherever greedy decoding picks it).
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module")
def decoder(model):
    return build_decoder(model.config, dict(model.state_dict()), None, device=torch.device("cpu"), dtype=torch.float32)


@pytest.fixture(params=[False, True], ids=["prefill-as-is", "static-prefill"])
def static_engine(decoder, request):
    """The engine with prompts prefilled at their own shapes, and padded to the static shapes that
    CUDA graphs replay on a GPU (here run eagerly)."""
    return StaticEngine(decoder, set(), context=64, max_batch=8, static_prefill=request.param)


def alone(model, prompt: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def columns(steps: list[list[int | None]]) -> list[list[int]]:
    """Per-step rows of tokens -> per-row token lists (None, a finished row's filler, dropped)."""
    return [[step[row] for step in steps if step[row] is not None] for row in range(len(steps[0]))]


@pytest.mark.parametrize("engine_kind", ["static", "transformers"])
def test_each_row_of_a_batch_generates_as_if_alone(model, static_engine, engine_kind):
    engine = static_engine if engine_kind == "static" else TransformersEngine(model, set(), context=64)
    rows = columns(list(generate(engine, PROMPTS, [greedy()] * len(PROMPTS))))
    assert rows == [alone(model, prompt) for prompt in PROMPTS]


def test_decoding_across_attention_spans_generates_as_if_alone(model, decoder):
    """Decode steps attend over a span of the cache that doubles as the answer grows: tokens on
    either side of each span boundary are the same as transformers' (which attends over all)."""
    engine = StaticEngine(decoder, set(), context=2 * FIRST_SPAN + 40, max_batch=2)
    assert engine.spans == [FIRST_SPAN, 2 * FIRST_SPAN, 2 * FIRST_SPAN + 40]
    long_prompt = [(7 * i) % 200 + 3 for i in range(FIRST_SPAN - 8)]
    rows = columns(list(generate(engine, [long_prompt, PROMPTS[0]], [greedy(FIRST_SPAN + 20)] * 2)))
    assert rows == [alone(model, long_prompt, FIRST_SPAN + 20), alone(model, PROMPTS[0], FIRST_SPAN + 20)]


def test_a_stop_token_ends_its_row_only(model, decoder):
    expected = [alone(model, prompt) for prompt in PROMPTS]
    stop = expected[0][3]
    engine = StaticEngine(decoder, {stop}, context=64)
    params = [greedy(), greedy(ignore_eos=True), greedy()]
    rows = columns(list(generate(engine, PROMPTS, params)))
    for row, (got, want) in enumerate(zip(rows, expected)):
        if params[row].ignore_eos or stop not in want:
            assert got == want
        else:
            assert got == want[:want.index(stop) + 1]


def test_rows_end_at_their_own_max_tokens(model, static_engine):
    steps = list(generate(static_engine, PROMPTS[:2], [greedy(3), greedy(7)]))
    assert len(steps) == 7
    assert columns(steps) == [alone(model, PROMPTS[0], 3), alone(model, PROMPTS[1], 7)]


def test_sampling_with_a_tiny_top_p_is_greedy_and_rows_keep_their_own_settings(model, static_engine):
    params = [SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.5, top_p=1e-6), greedy(),
              SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0, top_p=1.0)]
    rows = columns(list(generate(static_engine, PROMPTS, params)))
    assert rows[:2] == [alone(model, PROMPTS[0]), alone(model, PROMPTS[1])]
    assert len(rows[2]) == NEW_TOKENS and all(0 <= t < model.config.vocab_size for t in rows[2])


def prefill_alone(decoder, context: int, chunks: list[tuple[int, list[int], int]]) -> list[torch.Tensor]:
    """Each (slot, chunk, start) prefilled by itself, in order, on a fresh engine: the logits of each."""
    engine = StaticEngine(decoder, set(), context=context, max_batch=4)
    return [engine.prefill([slot], [chunk], [start])[0] for slot, chunk, start in chunks]


@pytest.mark.parametrize("static_prefill", [False, True])
def test_prompts_of_different_lengths_are_prefilled_in_one_forward_with_the_logits_each_gives_alone(decoder, static_prefill):
    """Three prompts (one of them a second chunk after an earlier one) padded to the longest (or to
    the static shape of 4 rows by 32 tokens) in one forward: each row's logits are the ones it gives
    alone, and each slot's position is its own."""
    engine = StaticEngine(decoder, set(), context=64, max_batch=4, static_prefill=static_prefill)
    engine.prefill([3], [PROMPTS[2][:4]], [0])
    forwards = []
    original = decoder.forward
    decoder.forward = lambda *args, **kwargs: forwards.append(args[0].shape) or original(*args, **kwargs)
    try:
        together = engine.prefill([0, 1, 3], [PROMPTS[1], PROMPTS[0], PROMPTS[2][4:]], [0, 0, 4])
    finally:
        del decoder.forward
    assert forwards == [torch.Size([4, 32] if static_prefill else [3, len(PROMPTS[1])])]
    expected = prefill_alone(decoder, 64, [(0, PROMPTS[1], 0), (1, PROMPTS[0], 0), (3, PROMPTS[2][:4], 0),
                                           (3, PROMPTS[2][4:], 4)])
    torch.testing.assert_close(together, torch.stack([expected[0], expected[1], expected[3]]), rtol=1e-4, atol=1e-4)
    assert engine.host_positions[:4] == [len(PROMPTS[1]), len(PROMPTS[0]), 0, len(PROMPTS[2])]


@pytest.mark.parametrize("static_prefill", [False, True])
def test_padding_that_runs_past_the_context_leaves_every_row_right(model, decoder, static_prefill):
    """A short last chunk that fills the context, padded to a long one: its padding writes past the
    context (the cache's spare position), not over its last token; both rows' logits are their
    own, and the other row generates as if alone."""
    context = 32
    long_prompt = [(5 * i) % 200 + 3 for i in range(context)]
    engine = StaticEngine(decoder, set(), context=context, max_batch=2, static_prefill=static_prefill)
    engine.prefill([1], [long_prompt[:29]], [0])
    logits = engine.prefill([0, 1], [PROMPTS[1], long_prompt[29:]], [0, 29])
    expected = prefill_alone(decoder, context, [(0, PROMPTS[1], 0), (1, long_prompt[:29], 0),
                                                (1, long_prompt[29:], 29)])
    torch.testing.assert_close(logits, torch.stack([expected[0], expected[2]]), rtol=1e-4, atol=1e-4)
    tokens = logits[:1].argmax(-1)
    answer = tokens.tolist()
    for _ in range(3):
        tokens = engine.decode([0], tokens).argmax(-1)
        answer += tokens.tolist()
    assert answer == alone(model, PROMPTS[1], 4)


def test_prefill_groups_hold_a_bounded_number_of_padded_tokens_and_rows():
    assert prefill_groups([3, 5, 100, 2000], tokens_per_forward=200) == [[0, 1], [2], [3]]
    assert prefill_groups([50, 50, 50, 50], tokens_per_forward=200) == [[0, 1, 2, 3]]
    assert prefill_groups([1] * 5, tokens_per_forward=2) == [[0, 1], [2, 3], [4]]
    assert prefill_groups([1] * 5, max_rows=2) == [[0, 1], [2, 3], [4]]


def test_the_buckets_that_sizes_up_to_a_bound_run_in():
    assert buckets_up_to(1) == [1] and buckets_up_to(5) == [1, 2, 4, 8] and buckets_up_to(64)[-1] == 64
    assert buckets_up_to(8, PREFILL_ROW_BUCKETS) == buckets_up_to(64, PREFILL_ROW_BUCKETS) == [1, 2, 4, 8]


def test_static_prefills_pick_their_span_and_their_padding_disturbs_no_sequence(model, decoder):
    """Static prefill shapes: a 500-token prompt runs as 512 tokens over the first span, its 20-token
    second chunk as 32 tokens over the whole context (it reaches past the first span); three
    prompts run as four rows while another sequence is mid-answer in slot 2, the fourth row all
    padding in the first prompt's cache row. Every answer is transformers' own."""
    context = FIRST_PREFILL_SPAN + 88
    engine = StaticEngine(decoder, set(), context=context, max_batch=4, static_prefill=True)
    long_prompt = [(7 * i) % 200 + 3 for i in range(520)]
    shapes = []
    original = decoder.forward
    decoder.forward = lambda *args, **kwargs: shapes.append((*args[0].shape, args[2].shape[-1])) or \
        original(*args, **kwargs)
    try:
        engine.prefill([2], [long_prompt[:500]], [0])
        first = engine.prefill([2], [long_prompt[500:]], [500]).argmax(-1)
        middle = [first.item(), engine.decode([2], first).argmax(-1).item()]
        logits = engine.prefill([0, 1, 3], PROMPTS, [0, 0, 0])
    finally:
        del decoder.forward
    assert shapes[:2] == [(1, 512, FIRST_PREFILL_SPAN), (1, 32, context)] and shapes[-1] == (4, 32, FIRST_PREFILL_SPAN)
    answers = {slot: [token] for slot, token in zip([0, 1, 3], logits.argmax(-1).tolist())}
    answers[2] = middle
    for _ in range(3):
        tokens = engine.decode([0, 1, 2, 3], torch.tensor([answers[slot][-1] for slot in range(4)])).argmax(-1)
        for slot in range(4):
            answers[slot].append(tokens[slot].item())
    assert [answers[slot] for slot in (0, 1, 3)] == [alone(model, prompt, 4) for prompt in PROMPTS]
    assert answers[2] == alone(model, long_prompt, 5)


def test_a_batch_beyond_the_cache_is_refused(static_engine):
    with pytest.raises(ValueError, match="context of 64"):
        list(generate(static_engine, [[1] * 60], [greedy(8)]))


def test_sequences_joining_mid_generation_and_prefilled_in_chunks_generate_as_if_alone(model, static_engine):
    """Continuous batching: a sequence is added while others decode (it joins at the next step),
    its prompt prefilled 4 tokens a step between their decode steps; one finishes early and its
    slot is taken by a later one. Every answer equals transformers' for its prompt alone."""
    scheduler = Scheduler(static_engine, max_batch=2, prefill_chunk=4)
    prompts = PROMPTS + [[11, 12, 13, 14, 15, 16, 17]]
    lengths = [NEW_TOKENS, 3, NEW_TOKENS, 6]
    sequences = [Sequence(prompt, greedy(n)) for prompt, n in zip(prompts, lengths)]
    got = {id(s): [] for s in sequences}
    arrivals = {0: [sequences[0]], 2: [sequences[1]], 5: [sequences[2], sequences[3]]}
    step = 0
    while step < 100 and (step <= max(arrivals) or scheduler.has_work()):
        for sequence in arrivals.get(step, []):
            scheduler.add(sequence)
        for item in scheduler.step():
            got[id(item.sequence)].append(item.token)
        step += 1
    assert [got[id(s)] for s in sequences] == [alone(model, p, n) for p, n in zip(prompts, lengths)]
    assert max(rows for _, rows in scheduler.decode_batches) == 2 and not scheduler.has_work()


def collect(batcher: Batcher, prompt: list[int], params: SamplingParams, take: int | None = None):
    async def run():
        tokens = []
        async with contextlib.aclosing(batcher.tokens(prompt, params)) as stream:
            async for batch in stream:
                tokens.extend(batch)
                if take is not None and len(tokens) >= take:
                    break
        return tokens[:take] if take is not None else tokens
    return run()


@pytest.mark.parametrize("engine_kind", ["static", "transformers"])
def test_concurrent_requests_each_get_their_own_answer(model, static_engine, engine_kind):
    engine = static_engine if engine_kind == "static" else TransformersEngine(model, set(), context=64)
    batcher = Batcher(engine, max_batch=8)

    async def main():
        return await asyncio.gather(*(collect(batcher, prompt, greedy()) for prompt in PROMPTS),
                                    collect(batcher, PROMPTS[0], greedy(), take=2),
                                    collect(batcher, list(range(1, 51)), greedy(10)))

    *answers, cut, long_answer = asyncio.run(main())
    assert answers == [alone(model, prompt) for prompt in PROMPTS]
    assert cut == alone(model, PROMPTS[0])[:2]
    assert long_answer == alone(model, list(range(1, 51)), 10)


def test_an_engine_error_reaches_every_request_and_the_next_ones_still_run(model, static_engine):
    class Broken(StaticEngine):
        broken = True

        def decode(self, slots, tokens):
            if self.broken:
                raise RuntimeError("device lost")
            return super().decode(slots, tokens)

    engine = Broken(static_engine.decoder, set(), context=64)
    batcher = Batcher(engine, max_batch=8)

    async def main():
        return await asyncio.gather(*(collect(batcher, [1, 2], greedy()) for _ in range(2)), return_exceptions=True)

    assert [str(e) for e in asyncio.run(main())] == ["device lost", "device lost"]
    engine.broken = False
    assert asyncio.run(collect(batcher, PROMPTS[0], greedy())) == alone(model, PROMPTS[0])


class GatedEngine:
    """Next token = last token + 1; each decode step after the first waits for a permit from the
    test, so the test decides when tokens come. `entered` counts the decode steps begun."""

    continuous, device, stop_ids, context, max_batch = True, torch.device("cpu"), set(), 64, 2

    def __init__(self):
        import threading

        self.permits = threading.Semaphore(1)
        self.entered = 0

    def prefill(self, slots, chunks, starts):
        return torch.nn.functional.one_hot(torch.tensor([chunk[-1] + 1 for chunk in chunks]), 100).float()

    def decode(self, slots, tokens):
        self.entered += 1
        assert self.permits.acquire(timeout=30), "the test gave no permit"
        return torch.nn.functional.one_hot(tokens + 1, 100).float()

    def release(self, slot):
        pass


@pytest.mark.parametrize("interval", [0.0, 60.0])
def test_a_stream_interval_gathers_tokens_between_lists_but_holds_back_neither_the_first_nor_the_end(interval):
    engine = GatedEngine()
    batcher = Batcher(engine, max_batch=2, stream_interval=interval)

    async def one_token_at_a_time():
        for step in range(2, 6):  # decode step `step` waits: the tokens before it are out
            while engine.entered < step:
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.05)  # time for the stream to take them
            engine.permits.release()

    async def main():
        feeder = asyncio.create_task(one_token_at_a_time())
        async with contextlib.aclosing(batcher.tokens([10], greedy(max_new_tokens=6))) as stream:
            lists = [tokens async for tokens in stream]
        await feeder
        return lists

    # wait_for: the end of the answer cuts the interval short, while waiting it out would take a minute
    lists = asyncio.run(asyncio.wait_for(main(), timeout=20))
    if interval:
        assert lists == [[11], [12, 13, 14, 15, 16]]
    else:  # a list per token while the stream keeps up (the last two come one step apart)
        assert lists[:4] == [[11], [12], [13], [14]] and sum(lists[4:], []) == [15, 16]


class ThreadRecordingEngine(GatedEngine):
    """GatedEngine without the gate, recording the thread each prefill ran on."""

    def __init__(self):
        super().__init__()
        self.threads = []

    def prefill(self, slots, chunks, starts):
        import threading

        self.threads.append(threading.current_thread())
        return super().prefill(slots, chunks, starts)

    def decode(self, slots, tokens):
        return torch.nn.functional.one_hot(tokens + 1, 100).float()


def test_one_worker_thread_serves_request_after_request_and_ends_when_idle():
    engine = ThreadRecordingEngine()
    loop = StepLoop(idle_seconds=0.5)
    batcher = Batcher(engine, max_batch=2, loop=loop)

    async def one_after_another(count):
        return [await collect(batcher, [10], greedy(max_new_tokens=3)) for _ in range(count)]

    assert asyncio.run(one_after_another(3)) == [[11, 12, 13]] * 3
    first = engine.threads[0]
    assert engine.threads == [first] * 3  # a thread's first prefill is its slowest on a GPU
    first.join(timeout=10)
    assert not first.is_alive() and loop.thread is None  # idle past idle_seconds: it ended
    assert asyncio.run(one_after_another(1)) == [[11, 12, 13]]
    second = engine.threads[-1]
    assert second is not first and second.is_alive()
    batcher.close()
    with pytest.raises(RuntimeError, match="unloaded"):
        asyncio.run(one_after_another(1))


def test_a_step_wakes_each_event_loop_once_whatever_its_number_of_streams():
    """Each hand-out into an event loop writes to its wake-up pipe while the step thread holds the
    GIL: a step's tokens for all of a loop's streams go in one call."""
    engine = ThreadRecordingEngine()
    engine.max_batch = 8
    batcher = Batcher(engine, max_batch=8, loop=StepLoop())
    steps = []
    step = batcher.step
    batcher.step = lambda: (steps.append(1), step())[1]

    async def main():
        event_loop = asyncio.get_running_loop()
        calls = []
        call_soon_threadsafe = event_loop.call_soon_threadsafe
        event_loop.call_soon_threadsafe = lambda *args: (calls.append(1), call_soon_threadsafe(*args))[1]
        answers = await asyncio.gather(*(collect(batcher, [10 * i], greedy(max_new_tokens=5)) for i in range(1, 9)))
        return answers, len(calls)

    answers, calls = asyncio.run(main())
    assert answers == [[10 * i + k for k in range(1, 6)] for i in range(1, 9)]
    assert 0 < calls <= len(steps) < 40  # 40 tokens and 8 ends, handed out one call a step
    batcher.close()


class CountingEngine(ThreadRecordingEngine):
    """ThreadRecordingEngine that logs its decode steps, by name, in a log shared with other engines."""

    def __init__(self, name: str, log: list[str]):
        super().__init__()
        self.name, self.log = name, log

    def decode(self, slots, tokens):
        self.log.append(self.name)
        time.sleep(0.002)
        return super().decode(slots, tokens)


def test_the_models_of_a_replica_take_turns_in_one_thread():
    """A model with a long answer under way does not hold back another model's short one: their
    steps alternate, in one worker thread."""
    log: list[str] = []
    loop = StepLoop()
    long_engine, short_engine = CountingEngine("long", log), CountingEngine("short", log)
    long_model, short_model = Batcher(long_engine, 2, loop=loop), Batcher(short_engine, 2, loop=loop)
    ended = []

    async def answer(batcher, name, new_tokens):
        tokens = await collect(batcher, [1], greedy(max_new_tokens=new_tokens))
        ended.append(name)
        return tokens

    async def main():
        long = asyncio.create_task(answer(long_model, "long", 60))
        while "long" not in log:  # the long answer is decoding
            await asyncio.sleep(0.001)
        return await asyncio.gather(long, answer(short_model, "short", 4))

    long_tokens, short_tokens = asyncio.run(asyncio.wait_for(main(), timeout=30))
    assert long_tokens == list(range(2, 62)) and short_tokens == [2, 3, 4, 5]
    assert ended == ["short", "long"]
    first_short = log.index("short")
    assert log[first_short:first_short + 6] == ["short", "long"] * 3  # turns, one step each
    assert {thread for engine in (long_engine, short_engine) for thread in engine.threads} == {loop.thread}


def test_closing_a_model_waits_for_its_requests_while_the_other_models_go_on():
    log: list[str] = []
    loop = StepLoop()
    leaving, staying = Batcher(CountingEngine("leaving", log), 2, loop=loop), Batcher(CountingEngine("staying", log), 2, loop=loop)

    async def main():
        staying_answer = asyncio.create_task(collect(staying, [1], greedy(max_new_tokens=40)))
        leaving_answer = asyncio.create_task(collect(leaving, [1], greedy(max_new_tokens=10)))
        while "leaving" not in log:
            await asyncio.sleep(0.001)
        await asyncio.to_thread(leaving.close)  # returns once its answer is finished
        assert not leaving.has_work()
        with pytest.raises(RuntimeError, match="unloaded"):
            await collect(leaving, [1], greedy())
        return await leaving_answer, await staying_answer

    leaving_tokens, staying_tokens = asyncio.run(asyncio.wait_for(main(), timeout=30))
    assert leaving_tokens == list(range(2, 12)) and staying_tokens == list(range(2, 42))


def test_no_step_runs_while_the_loop_is_paused_and_the_answer_is_unchanged():
    """As a model loading beside a generating one captures its CUDA graphs: each capture waits for
    the running step to end, no step starts while it runs, and the answer goes on after it. The step
    loop's own thread may pause inside a step (a capture during a step) without waiting for itself."""
    loop = StepLoop()

    class SteppingEngine(ThreadRecordingEngine):
        """Counts its decode steps, and says whether one is running."""

        def __init__(self):
            super().__init__()
            self.steps, self.inside = 0, False

        def decode(self, slots, tokens):
            self.inside = True
            time.sleep(0.002)
            self.steps += 1
            self.inside = False
            return super().decode(slots, tokens)

    engine = SteppingEngine()
    batcher = Batcher(engine, 2, loop=loop)
    captures = []  # (steps when it began, a step running then, steps during it)

    def capture():
        with loop.paused():
            began, inside = engine.steps, engine.inside
            time.sleep(0.05)  # a capture's time: no decode step may run meanwhile
            captures.append((began, inside, engine.steps - began))

    async def main():
        answer = asyncio.create_task(collect(batcher, [1], greedy(max_new_tokens=60)))
        while engine.steps < 3:
            await asyncio.sleep(0.001)
        for _ in range(3):
            await asyncio.to_thread(capture)
        return await answer

    assert asyncio.run(asyncio.wait_for(main(), timeout=30)) == list(range(2, 62))
    assert [(inside, during) for _, inside, during in captures] == [(False, 0)] * 3
    assert captures[-1][0] < 59  # the captures came between steps of the answer, not after its 59 decode steps

    class PausingEngine(ThreadRecordingEngine):
        def decode(self, slots, tokens):
            with loop.paused():  # from the loop's own thread, inside its step
                return super().decode(slots, tokens)

    assert asyncio.run(asyncio.wait_for(collect(Batcher(PausingEngine(), 2, loop=loop), [1], greedy(max_new_tokens=5)),
                                        timeout=30)) == [2, 3, 4, 5, 6]


def stack_showing(source, text: str, seconds: float = 10.0) -> str:
    """source()'s stack trace, once it shows `text` (a thread just woken may not be there yet)."""
    deadline = time.monotonic() + seconds
    while text not in (stack := source()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return stack


def test_a_stalled_step_loop_says_where_its_thread_is():
    loop = StepLoop()
    started, release = threading.Event(), threading.Event()

    class WedgedEngine(ThreadRecordingEngine):
        def decode(self, slots, tokens):
            started.set()
            release.wait(timeout=30)  # a device that does not answer
            return super().decode(slots, tokens)

    batcher = Batcher(WedgedEngine(), 2, loop=loop)

    async def main():
        answer = asyncio.create_task(collect(batcher, [1], greedy(max_new_tokens=2)))
        await asyncio.to_thread(started.wait, 30)
        stack = await asyncio.to_thread(stack_showing, batcher.step_stack, "release.wait")
        stalled = batcher.stalled_for()
        release.set()
        await answer
        return stack, stalled

    stack, stalled = asyncio.run(asyncio.wait_for(main(), timeout=30))
    assert "in decode" in stack and "release.wait" in stack and stalled > 0
    assert StepLoop().stack() == "(no worker thread)"


def test_a_pause_that_does_not_end_counts_as_a_stall_while_work_waits():
    """A capture wedged on the device holds every model's steps: the health check must see it, and
    the log must show the thread that holds the pause."""
    loop = StepLoop()
    batcher = Batcher(ThreadRecordingEngine(), 2, loop=loop)
    holding, release = threading.Event(), threading.Event()

    def wedged_capture():
        with loop.paused():
            holding.set()
            release.wait(timeout=30)

    async def main():
        capturer = threading.Thread(target=wedged_capture)
        capturer.start()
        await asyncio.to_thread(holding.wait, 30)
        assert batcher.stalled_for() == 0.0  # paused, but no work waits for it
        answer = asyncio.create_task(collect(batcher, [1], greedy(max_new_tokens=3)))
        await asyncio.sleep(0.2)
        stalled, stack = batcher.stalled_for(), batcher.step_stack()
        release.set()
        tokens = await answer
        capturer.join()
        return stalled, stack, tokens

    stalled, stack, tokens = asyncio.run(asyncio.wait_for(main(), timeout=30))
    assert stalled >= 0.2 and "a thread holding a pause" in stack and "wedged_capture" in stack
    assert tokens == [2, 3, 4] and batcher.stalled_for() == 0.0
