"""Which models a replica holds, and which one leaves when another must load.

Serve's own multiplexing keeps the least recently used models of any tenant and unloads one at once,
requests in flight or not, so one tenant cycling through its own model ids (two merge bases × three
schemes) evicts everyone else's hot models, and an unloaded engine lived on in its batcher. Here:
- **Room** is counted in models (serve.max_resident_models) and, where set, in bytes (a GPU's memory).
- **Fair shares.** Each model takes a fraction of the room (its bytes of the budget, or one model's
  slot, whichever is more). A tenant that already holds its share (the room divided among the tenants
  resident and the one asking) makes room from its own idle models; otherwise from the idle models of
  tenants over their share, least recently used first, then from any idle model.
- **Eviction waits for in-flight requests**: only idle models leave; a load with no idle model to
  evict waits for one. An evicted model's batcher stops and its memory is freed before the next load.
- **Loads are bounded per tenant**: at most serve.loads_per_tenant of one tenant's loads run or wait
  on a replica; a request that would start another is answered 429 with Retry-After. Loads run one
  at a time, so room is counted against what is really resident.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from qlora_ray.serve.catalog import ModelEntry

log = logging.getLogger(__name__)


class TenantLoadsExceeded(Exception):
    """A tenant asked for more model loads at once than a replica allows it."""


@dataclass(frozen=True)
class Holding:
    """A resident model as the eviction choice sees it."""

    id: str
    tenant: str
    last_used: float
    busy: bool
    fraction: float  # of the replica's room


def choose_victim(holdings: list[Holding], requester: str) -> str | None:
    """The model to evict so that `requester` can load one (see the module docstring), or None when
    every candidate is busy and the load must wait for one to go idle."""
    tenants = {h.tenant for h in holdings} | {requester}
    share = 1.0 / len(tenants)
    used: dict[str, float] = {}
    for h in holdings:
        used[h.tenant] = used.get(h.tenant, 0.0) + h.fraction
    idle = sorted((h for h in holdings if not h.busy), key=lambda h: h.last_used)
    if used.get(requester, 0.0) >= share - 1e-9:
        own = [h for h in idle if h.tenant == requester]
        return own[0].id if own else None
    over = [h for h in idle if used[h.tenant] > share + 1e-9]
    candidates = over or idle
    return candidates[0].id if candidates else None


@dataclass
class _Resident:
    """A model of the replica, or one loading (model None, `ready` pending). in_flight counts the
    requests holding it, and those waiting for its load: a model just loaded is never idle before its
    first requests get to it."""

    tenant: str
    ready: asyncio.Future
    model: Any = None
    bytes: int = 0
    last_used: float = field(default_factory=time.monotonic)
    in_flight: int = 0
    task: asyncio.Task | None = None


class ResidentModels:
    """The models of one replica. `load(entry)` builds one (awaitable; run it off the event loop);
    `release(model)` frees one (called on a thread), or keeps what the load that follows its
    eviction can reuse, and then `settle()` (on a thread; optional) lets go of what no load took:
    after each load, and before a load waits for a model to go idle. All are injected: tests drive
    this with fakes."""

    def __init__(self, load: Callable[[ModelEntry], Awaitable[Any]], release: Callable[[Any], None], *,
                 max_models: int, memory_budget: int | None = None, loads_per_tenant: int = 1,
                 settle: Callable[[], None] | None = None):
        self._load_fn, self._release_fn, self._settle_fn = load, release, settle
        self.max_models, self.memory_budget, self.loads_per_tenant = max_models, memory_budget, loads_per_tenant
        self._resident: dict[str, _Resident] = {}
        self._loading: dict[str, _Resident] = {}
        self._load_lock = asyncio.Lock()
        self._changed = asyncio.Event()  # replaced after each set: a waiter holds the one it saw

    # -- what callers use
    @contextlib.asynccontextmanager
    async def use(self, entry: ModelEntry) -> AsyncIterator[Any]:
        """The model of `entry`, loaded if needed, held resident for the block. Raises
        TenantLoadsExceeded, or what loading raised."""
        held = self._resident.get(entry.id) or self._loading.get(entry.id)
        if held is None:
            loads = sum(1 for waiting in self._loading.values() if waiting.tenant == entry.tenant)
            if loads >= self.loads_per_tenant:
                raise TenantLoadsExceeded(f"tenant {entry.tenant!r} already has {loads} model load(s) under way "
                                          "on this replica")
            held = _Resident(entry.tenant, asyncio.get_running_loop().create_future())
            self._loading[entry.id] = held
            # A task of its own, not the request's: a client gone does not cancel a load others wait for.
            held.task = asyncio.create_task(self._load(entry, held))
        held.in_flight += 1
        try:
            await asyncio.shield(held.ready)
            held.last_used = time.monotonic()
            yield held.model
        finally:
            held.in_flight -= 1
            held.last_used = time.monotonic()
            self._signal()

    def models(self) -> list[Any]:
        return [held.model for held in self._resident.values()]

    def is_resident(self, model_id: str) -> bool:
        return model_id in self._resident

    def resident_ids(self) -> list[str]:
        return list(self._resident)

    # -- the mechanics
    def _signal(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _load(self, entry: ModelEntry, held: _Resident) -> None:
        try:
            evicted: list[str] = []
            while True:
                async with self._load_lock:
                    if await self._make_room(entry.tenant, entry.size_bytes, evicted):
                        started = time.perf_counter()
                        held.model = await self._load_fn(entry)
                        seconds = time.perf_counter() - started
                        held.bytes = int(getattr(held.model, "resident_bytes", 0) or entry.size_bytes)
                        self._resident[entry.id] = held
                        # The estimate (the artifact's size) may have been low: within the budget after all.
                        await self._make_room(entry.tenant, 0, evicted, keep=entry.id)
                        await self._settle()
                        break
                    changed = self._changed  # before any await: a model going idle meanwhile must wake this load
                    await self._settle()
                # Outside the lock, so that another tenant's load may go ahead meanwhile.
                await changed.wait()  # a request ends, or a load finishes
            log.info("loaded %s in %.2f s%s", entry.id, seconds, f" (evicted {', '.join(evicted)})" if evicted else "")
            held.ready.set_result(None)
        except BaseException as exc:  # noqa: BLE001 - handed to every request waiting for this load
            held.ready.set_exception(exc if isinstance(exc, Exception) else RuntimeError(f"loading stopped: {exc!r}"))
            held.ready.exception()  # retrieved: no "never retrieved" warning when no request waits any more
            if not isinstance(exc, Exception):
                raise
        finally:
            del self._loading[entry.id]
            self._signal()

    async def _settle(self) -> None:
        if self._settle_fn is not None:
            await asyncio.to_thread(self._settle_fn)

    def _fraction(self, nbytes: int) -> float:
        slot = 1.0 / self.max_models
        return max(slot, nbytes / self.memory_budget) if self.memory_budget else slot

    def _over(self, extra_models: int, extra_bytes: int) -> bool:
        count = len(self._resident) + extra_models
        used = sum(held.bytes for held in self._resident.values()) + extra_bytes
        return count > self.max_models or bool(self.memory_budget and used > self.memory_budget)

    async def _make_room(self, tenant: str, nbytes: int, evicted: list[str], keep: str | None = None) -> bool:
        """Evict idle models until one of `nbytes` fits (keep: already resident, never evicted); each
        id evicted is appended to `evicted`. False when it does not fit yet and only busy models could
        make room. A model larger than the whole room still loads, alone."""
        extra = 0 if keep else 1
        while self._over(extra, nbytes) and any(i != keep for i in self._resident):
            holdings = [Holding(i, held.tenant, held.last_used, held.in_flight > 0, self._fraction(held.bytes))
                        for i, held in self._resident.items() if i != keep]
            victim = choose_victim(holdings, tenant)
            if victim is None:
                return False
            await self._evict(victim)
            evicted.append(victim)
        return True

    async def _evict(self, model_id: str) -> None:
        held = self._resident.pop(model_id)
        await asyncio.to_thread(self._release_fn, held.model)
        held.model = None
        log.info("evicted %s (tenant %s)", model_id, held.tenant)
