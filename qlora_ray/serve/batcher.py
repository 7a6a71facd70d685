"""The async server's side of a model's scheduler: requests in from the event loop, tokens out to it.

The replica's step loop (serve/step_loop.py) runs the scheduler (serve/scheduler.py), one step at a
time in turn with the replica's other models: each request's tokens are handed to its own asyncio
queue the moment they are read back, and a request that ends (a stop token, max_tokens, or its
client gone) leaves the batch at the next step, while others keep generating and new ones join.
close() refuses new requests and waits until what is running has finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator

from qlora_ray.serve import step_loop
from qlora_ray.serve.engine import Engine
from qlora_ray.serve.sampling import SamplingParams
from qlora_ray.serve.scheduler import Scheduler, Sequence

_DONE = object()


class Batcher:
    def __init__(self, engine: Engine, max_batch: int, *, stream_interval: float = 0.0,
                 loop: step_loop.StepLoop | None = None):
        """`loop`: the step loop to run in (default: the replica's, step_loop.SHARED)."""
        self.engine = engine
        self.stream_interval = stream_interval  # seconds: each stream hands out at most one list per interval
        self.scheduler = Scheduler(engine, max_batch=max_batch)
        self.loop = loop or step_loop.SHARED
        # per stream: its event loop, its queue, and an event set once its end (or error) is queued
        self._queues: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue, asyncio.Event]] = {}
        self._lock = threading.Lock()
        self._closed = False

    @property
    def batch_sizes(self):
        """(wall-clock time, rows) of the recent decode steps (the resident route reports their mean)."""
        return self.scheduler.decode_batches

    async def tokens(self, ids: list[int], params: SamplingParams) -> AsyncIterator[list[int]]:
        """The tokens generated for one prompt, in lists: each holds every token that arrived since the
        last one was taken, so a consumer whose every item costs a hop (a Serve stream) falls behind by
        items, not by tokens. With a stream_interval, lists after the first are handed out at most once
        per interval, holding the tokens that came meanwhile: a replica streaming to many clients
        then pays its per-item cost per interval, not per token, as Ray Serve LLM's
        stream_batching_interval_ms does. The first token (the time to first token) and the last
        (the stream's end) are never held back. Closing the iterator early (a stop string, a client
        gone) drops the request from the batch at the next step. ValueError if it cannot fit."""
        sequence = Sequence(list(ids), params)
        queue: asyncio.Queue = asyncio.Queue()
        ended = asyncio.Event()
        loop = asyncio.get_running_loop()
        with self._lock:  # the queue first: the worker may emit as soon as the sequence is added
            if self._closed:
                raise RuntimeError("this model was unloaded")
            self._queues[id(sequence)] = (loop, queue, ended)
        try:
            self.scheduler.add(sequence)
        except ValueError:
            with self._lock:
                self._queues.pop(id(sequence), None)
            raise
        self.loop.wake(self)
        handed_out = None  # when the last list was
        try:
            while True:
                items = [await queue.get()]
                if handed_out is not None and self.stream_interval and not _ends(items):
                    with contextlib.suppress(TimeoutError):  # tokens gather meanwhile; the end cuts it short
                        await asyncio.wait_for(ended.wait(), handed_out + self.stream_interval - loop.time())
                while not queue.empty():
                    items.append(queue.get_nowait())
                tokens = [item for item in items if isinstance(item, int)]
                if tokens:
                    yield tokens
                    handed_out = loop.time()
                if any(isinstance(item, BaseException) for item in items):
                    raise next(item for item in items if isinstance(item, BaseException))
                if _DONE in items:
                    return
        finally:
            self.scheduler.cancel(sequence)
            with self._lock:
                self._queues.pop(id(sequence), None)

    def stalled_for(self) -> float:
        """Seconds the replica's running step has taken (0 when none runs): minutes mean a wedged device."""
        return self.loop.stalled_for()

    def step_stack(self) -> str:
        """Where the replica's step loop is now, as a stack trace."""
        return self.loop.stack()

    def close(self) -> None:
        """Refuse new requests and return once what is running has finished; a request that could not
        get a turn before (it arrived as the model closed) ends with an error."""
        with self._lock:
            self._closed = True
        self.loop.finish(self)
        self._hand_out([(sequence, item) for sequence in self.scheduler.reset()
                        for item in (RuntimeError("this model was unloaded"), _DONE)])

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> None:
        """One scheduler step (run by the step loop), its tokens handed to their streams; an error
        ends every request of the batch with it."""
        try:
            emitted = self.scheduler.step()
        except BaseException as exc:  # noqa: BLE001 - handed to each request's event loop, raised there
            self._hand_out([(sequence, item) for sequence in self.scheduler.reset() for item in (exc, _DONE)])
            return
        self._hand_out([(e.sequence, item) for e in emitted for item in ((e.token, _DONE) if e.finished else (e.token,))])

    def _hand_out(self, items: list[tuple[Sequence, object]]) -> None:
        """Each item to its stream's queue, in order, with one call into each event loop: a step of 64
        streams wakes their loop once, not 64 times (each call writes to the loop's wake-up pipe, and
        the step thread holds the GIL for each)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for sequence, item in items:
                target = self._queues.get(id(sequence))
                if target is not None:
                    loop, queue, ended = target
                    by_loop.setdefault(loop, []).append((queue, ended, item))
        for loop, deliveries in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, deliveries)
            except RuntimeError:  # its event loop has closed since: nobody is left to read it
                pass


def _deliver(deliveries: list[tuple[asyncio.Queue, asyncio.Event, object]]) -> None:
    for queue, ended, item in deliveries:
        queue.put_nowait(item)
        if _ends([item]):
            ended.set()


def _ends(items: list) -> bool:
    """Whether the stream's end (or its error) is among the items: then nothing is held back."""
    return any(item is _DONE or isinstance(item, BaseException) for item in items)
