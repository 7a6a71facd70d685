"""One worker thread that steps every model of a replica, one step of each model with work in turn.

Each model keeps its own scheduler (serve/scheduler.py: its engine's KV cache and batch); a model's
batcher (serve/batcher.py) hands its requests in and its tokens out. The loop decides whose step runs
next, so a replica serving many tenants' models at once runs one schedule across them:
- turns are fair by steps: a model with a full batch cannot starve one with a single request, and
  a step is milliseconds, so a model waits for at most one step of each other busy model;
- the models' steps never compete for the GIL and the device from threads of their own, and on a
  single CUDA stream each model's next step is already queued while the host reads another's tokens
  back (each scheduler launches its next decode before reading the previous one);
- one thread serves model after model: on a GPU a thread's first prefill costs tens of
  milliseconds more than its next ones, which a thread per model paid again for each model loaded.

The thread outlives the requests; after `idle_seconds` with no model to step it ends, and the next
request starts another. Only models with work are held, so an idle model's engine is not kept alive
by the loop.

A model loading while others serve captures its CUDA graphs on another thread. CUDA and PyTorch
allow one capture at a time in a process, and a capture in CUDA's global mode fails on (and is
broken by) another thread's unsafe calls: so each capture runs inside `paused()`, between two steps,
and the steps wait for it (a capture takes a fraction of a second; the load's other work goes on
beside the steps).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterator
from typing import Protocol

# How long the idle worker waits for work before it ends (the next request starts a new one).
IDLE_SECONDS = 60.0


class Steppable(Protocol):
    """What the loop steps: a model's batcher."""

    def has_work(self) -> bool: ...

    def step(self) -> None:
        """One scheduler step, its tokens handed out; never raises (errors go to its requests)."""


class StepLoop:
    def __init__(self, idle_seconds: float = IDLE_SECONDS):
        self.idle_seconds = idle_seconds
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # work arrived, a step ended, or a model left
        self._turns: deque[Steppable] = deque()  # models with work, in the order their steps come
        self._stepping: Steppable | None = None
        self._step_began = 0.0
        self._thread: threading.Thread | None = None
        self._pauses: dict[int, float] = {}  # blocks inside paused() (by thread) and since when: no step starts meanwhile

    def wake(self, model: Steppable) -> None:
        """`model` has work: it gets a turn (and the loop a thread, if it had none)."""
        with self._lock:
            if model is not self._stepping and model not in self._turns:
                self._turns.append(model)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="qlora-ray-steps", daemon=True)
                self._thread.start()
            self._changed.notify_all()

    def finish(self, model: Steppable) -> None:
        """Return once `model` has no work left and no step of it is running, its turns given up:
        what it was generating is finished, and the loop no longer holds it."""
        with self._lock:
            while self._stepping is model or (model in self._turns and model.has_work()):
                self._changed.wait()
            if model in self._turns:
                self._turns.remove(model)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No model's step runs while the block does: it waits for the running step to end (unless
        it is that step's own thread), and the steps wait for it."""
        me = threading.get_ident()
        with self._lock:
            nested = me in self._pauses
            self._pauses.setdefault(me, time.monotonic())
            while self._stepping is not None and threading.current_thread() is not self._thread:
                self._changed.wait()
        try:
            yield
        finally:
            with self._lock:
                if not nested:
                    del self._pauses[me]
                self._changed.notify_all()

    def stalled_for(self) -> float:
        """Seconds the running step has taken, or the oldest pause while work waits for it (0 when
        neither): a step or a capture takes well under a second, so minutes mean a wedged device,
        for every model of the replica."""
        with self._lock:
            now = time.monotonic()
            if self._stepping is not None:
                return now - self._step_began
            return now - min(self._pauses.values()) if self._pauses and self._turns else 0.0

    def stack(self) -> str:
        """Where the worker thread and any thread holding a pause are now (for the log of a replica
        whose step has stalled)."""
        frames = sys._current_frames()
        threads = [("the step loop's thread", self._thread.ident if self._thread is not None else None)]
        threads += [("a thread holding a pause", ident) for ident in list(self._pauses)]
        parts = [f"{name}:\n" + "".join(traceback.format_stack(frames[ident]))
                 for name, ident in threads if ident in frames]
        return "\n".join(parts) or "(no worker thread)"

    @property
    def thread(self) -> threading.Thread | None:
        """The worker thread, while there is one."""
        return self._thread

    def _next(self) -> Steppable | None:
        """The model whose step comes next, or None once the loop has been idle for idle_seconds
        (under the lock, so work that arrives after that starts a new thread)."""
        with self._lock:
            deadline = time.monotonic() + self.idle_seconds
            while not self._turns or self._pauses:
                if self._turns:  # work waits for a pause to end
                    self._changed.wait()
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    self._thread = None
                    return None
                self._changed.wait(left)
            self._stepping, self._step_began = self._turns.popleft(), time.monotonic()
            return self._stepping

    def _work(self) -> None:
        while True:
            model = self._next()
            if model is None:
                return
            try:
                model.step()
            finally:
                with self._lock:  # has_work under the lock: work added meanwhile has called wake, or is seen here
                    self._stepping = None
                    if model.has_work():
                        self._turns.append(model)
                    self._changed.notify_all()
            del model  # not held while the loop waits: a model that left is not kept alive by this frame


# The replica's loop: one per process, which is one Serve replica.
SHARED = StepLoop()
