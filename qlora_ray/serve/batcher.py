"""Requests to one model, generated together in batches on a worker thread.

A decode step reads every weight once whatever the batch size, so eight requests in one batch cost
little more than one: on the H100, the fused bf16 engine makes 1,153.6 tok/s at batch 8 against
154.5 at batch 1 (benchmarks/results/2026-11-23-h100-serve.md, run A). Requests
that arrive within `wait` of each other, or while a batch is generating, start together as the next
batch (static batching: a request does not join a batch already generating).

The engine runs on a thread started when requests arrive and ending when none are left, so an
evicted model leaves no thread behind holding its weights.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

_DONE = object()


@dataclass
class _Request:
    ids: list[int]
    params: object  # engine.SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class Batcher:
    def __init__(self, engine, max_batch: int, wait: float):
        self.engine = engine
        self.max_batch = min(max_batch, engine.max_batch)
        self.wait = wait
        self._pending: deque[_Request] = deque()
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._working = False
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # recent batches, for the resident route

    async def tokens(self, ids: list[int], params) -> AsyncIterator[int]:
        """The tokens generated for one prompt. Closing the iterator early (a stop string, a client
        gone) drops the request: from its batch at once if it has not started, else at the next step."""
        request = _Request(ids, params, asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            self._pending.append(request)
            self._arrived.notify()
            if not self._working:
                self._working = True
                threading.Thread(target=self._work, name="qlora-ray-batcher", daemon=True).start()
        try:
            while True:
                item = await request.queue.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            request.cancelled.set()

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                return
            self._generate(batch)

    def _next_batch(self) -> list[_Request]:
        """Up to max_batch live requests, once the batch is full or the first has waited `wait`."""
        with self._lock:
            if self._pending:
                deadline = time.monotonic() + self.wait
                while len(self._pending) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                    self._arrived.wait(left)
            batch: list[_Request] = []
            left_for_later: deque[_Request] = deque()
            while self._pending:
                request = self._pending.popleft()
                if request.cancelled.is_set():
                    continue
                if len(batch) < self.max_batch and self._fits(batch + [request]):
                    batch.append(request)
                else:
                    left_for_later.append(request)
            self._pending = left_for_later
            if not batch and not self._pending:
                self._working = False  # under the lock: a request arriving now starts a new thread
            return batch

    def _fits(self, batch: list[_Request]) -> bool:
        """Rows are left-padded to the longest prompt: it and the largest max_tokens must fit the cache."""
        context = getattr(self.engine, "context", None)
        return context is None or max(len(r.ids) for r in batch) + max(r.params.max_new_tokens for r in batch) <= context

    def _generate(self, batch: list[_Request]) -> None:
        self.batch_sizes.append(len(batch))
        try:
            for step in self.engine.generate([r.ids for r in batch], [r.params for r in batch]):
                live = False
                for request, token in zip(batch, step):
                    if token is not None and not request.cancelled.is_set():
                        request.put(token)
                        live = True
                if not live:
                    break  # every row has finished or been dropped
        except BaseException as exc:  # noqa: BLE001 - handed to each request's event loop, raised there
            for request in batch:
                request.put(exc)
        for request in batch:
            request.put(_DONE)
