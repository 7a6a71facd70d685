"""The async server's side of the scheduler: requests in from the event loop, tokens out to it.

A worker thread runs the scheduler (serve/scheduler.py) step after step while it has work: each
request's tokens are handed to its own asyncio queue the moment they are read back, and a request
that ends (a stop token, max_tokens, or its client gone) leaves the batch at the next step, while
others keep generating and new ones join.

The worker outlives the requests: a thread's first prefill costs tens of milliseconds more than
its next ones on a GPU (torch's per-thread set-up; figures in benchmarks/results/), which a thread
per burst of requests would add to every lone request's first token. Idle, it waits for the next
request; after `idle_seconds` without one it ends, so that a batcher nobody closes does not keep
its engine's weights alive through its thread. close() refuses new requests and waits for the
worker to finish what is running.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator

from qlora_ray.serve.engine import Engine
from qlora_ray.serve.sampling import SamplingParams
from qlora_ray.serve.scheduler import Scheduler, Sequence

_DONE = object()
# How long an idle worker waits for a request before it ends (the next request starts a new one).
IDLE_SECONDS = 60.0


class Batcher:
    def __init__(self, engine: Engine, max_batch: int, *, stream_interval: float = 0.0,
                 idle_seconds: float = IDLE_SECONDS):
        self.engine = engine
        self.stream_interval = stream_interval  # seconds: each stream hands out at most one list per interval
        self.scheduler = Scheduler(engine, max_batch=max_batch)
        # per stream: its event loop, its queue, and an event set once its end (or error) is queued
        self._queues: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue, asyncio.Event]] = {}
        self.idle_seconds = idle_seconds
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # notified when a request arrives or the batcher closes
        self._working = False  # the worker has work (for stalled_for)
        self._thread: threading.Thread | None = None
        self._closed = False
        self.last_step_at = time.monotonic()  # when the worker last finished a step (or started)

    @property
    def batch_sizes(self):
        """Rows of the recent decode steps (the resident route reports their mean)."""
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
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="qlora-ray-scheduler", daemon=True)
                self._thread.start()
            self._wake.notify()
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
        """Seconds the worker has spent on its current step while it has work (0 when idle): a step
        takes milliseconds, so minutes mean a wedged device."""
        return time.monotonic() - self.last_step_at if self._working else 0.0

    def close(self) -> None:
        """Refuse new requests and wait for the worker to finish (it does once no request is left)."""
        with self._lock:
            self._closed = True
            self._wake.notify()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _wait_for_work(self) -> bool:
        """Block until the scheduler has work (True), or until the batcher is closed or idle for
        `idle_seconds` with none (False: the worker ends; under the lock, so a request arriving
        after that starts a new one)."""
        with self._lock:
            deadline = time.monotonic() + self.idle_seconds
            while not self.scheduler.has_work():
                self._working = False
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    self._thread = None
                    return False
                self._wake.wait(left)
            if not self._working:
                self._working = True
                self.last_step_at = time.monotonic()
            return True

    def _work(self) -> None:
        while self._wait_for_work():
            try:
                emitted = self.scheduler.step()
                self.last_step_at = time.monotonic()
            except BaseException as exc:  # noqa: BLE001 - handed to each request's event loop, raised there
                for sequence in self.scheduler.reset():
                    self._put(sequence, exc)
                    self._put(sequence, _DONE)
                continue
            for item in emitted:
                self._put(item.sequence, item.token)
                if item.finished:
                    self._put(item.sequence, _DONE)

    def _put(self, sequence: Sequence, item) -> None:
        with self._lock:
            target = self._queues.get(id(sequence))
        if target is not None:
            loop, queue, ended = target
            try:
                loop.call_soon_threadsafe(_deliver, queue, ended, item)
            except RuntimeError:  # its event loop has closed since: nobody is left to read it
                pass


def _deliver(queue: asyncio.Queue, ended: asyncio.Event, item) -> None:
    queue.put_nowait(item)
    if _ends([item]):
        ended.set()


def _ends(items: list) -> bool:
    """Whether the stream's end (or its error) is among the items: then nothing is held back."""
    return any(item is _DONE or isinstance(item, BaseException) for item in items)
