"""One builder per artifact across a cluster: a claim record in the store beside the artifact.

Processes that need the same costly build at the same time (on a fresh cluster, every eval task
and model replica that loads GPTQ weights needs the Marlin kernel) would each compile it for minutes,
slowing one another down. The first to claim the build makes it; the others wait for its artifact
and load it. A claim is taken over when its builder gives it up (the build failed: the next one
tries) or stops refreshing it (it died): judged by each waiter's own clock, from when it last saw
the claim change, so clocks that disagree between nodes cannot make a live claim look stale. A
claim of this host whose process is gone is free at once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from typing import Iterator

from qlora_ray.errors import UserError
from qlora_ray.local_disk import process_identity, process_is_running

log = logging.getLogger(__name__)

# A builder rewrites its claim this often; a claim unchanged for CLAIM_STALE_SECONDS of a waiter's
# clock is taken over (several missed refreshes: a slow store is not a dead builder).
CLAIM_REFRESH_SECONDS = 15.0
CLAIM_STALE_SECONDS = 75.0
POLL_SECONDS = 2.0
# Past this a waiter takes the claim over even while it is refreshed: a build that slow has hung.
MAX_WAIT_SECONDS = 30 * 60.0
PROGRESS_EVERY_SECONDS = 30.0

BUILDING = "building"


class ClaimWatch:
    """A waiter's view of one claim record: whether it is free to take, now (time.monotonic())."""

    def __init__(self) -> None:
        self._seen: tuple | None = None
        self._seen_since = 0.0
        self._owner: str | None = None
        self._owner_since = 0.0

    def is_free(self, record: dict | None, now: float) -> bool:
        if not isinstance(record, dict) or record.get("state") != BUILDING:
            return True  # never claimed, given up, or not a claim at all
        builder = record.get("builder")
        if isinstance(builder, dict) and builder.get("host") == process_identity()["host"] \
                and not process_is_running(builder):
            return True
        if record.get("owner") != self._owner:
            self._owner, self._owner_since = record.get("owner"), now
        version = _version(record)
        if version != self._seen:
            self._seen, self._seen_since = version, now
            return False
        return now - self._seen_since > CLAIM_STALE_SECONDS

    def is_hung(self, now: float) -> bool:
        """Whether the claim last judged (not free) has been one builder's for MAX_WAIT_SECONDS."""
        return self._owner is not None and now - self._owner_since > MAX_WAIT_SECONDS


def _version(record: dict | None) -> tuple | None:
    return (record.get("owner"), record.get("beat")) if isinstance(record, dict) else None


class _Claim:
    """A claim this process holds, refreshed by a thread until released or no longer its own."""

    def __init__(self, store, key: str, owner: str):
        self.store, self.key, self.owner = store, key, owner
        self._stop = threading.Event()
        self._refresher = threading.Thread(target=self._refresh, name=f"claim {key}", daemon=True)
        self._refresher.start()

    def _ours(self, record: dict | None) -> bool:
        return isinstance(record, dict) and record.get("owner") == self.owner and record.get("state") == BUILDING

    def _change_if_ours(self, change) -> bool:
        """Apply change to the claim if it is still this process's (else write nothing): whether it was."""
        after = self.store.update_record(self.key, lambda record: change(record) if self._ours(record) else None)
        return isinstance(after, dict) and after.get("owner") == self.owner

    def _refresh(self) -> None:
        while not self._stop.wait(CLAIM_REFRESH_SECONDS):
            try:
                if not self._change_if_ours(lambda record: {**record, "beat": record.get("beat", 0) + 1}):
                    log.warning("the build claim %s was taken over; building on regardless", self.store.url(self.key))
                    return
            except Exception as error:  # noqa: BLE001 - the next beat may get through; waiters allow for misses
                log.warning("could not refresh the build claim %s (%s)", self.store.url(self.key), error)

    def release(self) -> None:
        self._stop.set()
        self._refresher.join()
        try:
            self._change_if_ours(lambda record: {**record, "state": "released"})
        except Exception as error:  # noqa: BLE001 - waiters take it over once it stops changing
            log.warning("could not give up the build claim %s (%s)", self.store.url(self.key), error)


def _try_claim(store, key: str, may_take) -> _Claim | None:
    """Take the claim at key if may_take(the record there now) (an atomic write: of two processes
    that both judged it free, one gets it)."""
    owner = uuid.uuid4().hex

    def take(record: dict | None) -> dict | None:
        if not may_take(record):
            return None
        return {"state": BUILDING, "owner": owner, "beat": 0, "builder": process_identity(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    written = store.update_record(key, take)
    return _Claim(store, key, owner) if isinstance(written, dict) and written.get("owner") == owner else None


@contextlib.contextmanager
def one_builder(store, artifact_key: str, claim_key: str, *, what: str) -> Iterator[bool]:
    """Yields True to the process that is to build `what` (it holds the claim at claim_key, refreshed
    until the block ends, then given up: publish the artifact inside the block), False once the
    artifact at artifact_key is complete, built by another. Where the store cannot keep the claim
    it yields True without one: building twice is slower, not wrong, since the first artifact
    published wins."""
    claim = None
    try:
        claim = _wait_for_claim(store, artifact_key, claim_key, what)
    except UserError as error:
        log.warning("%s: the store cannot keep a build claim (%s); building it here", what, error)
    if claim is False:
        yield False
        return
    try:
        yield True
    finally:
        if claim:
            claim.release()


def _wait_for_claim(store, artifact_key: str, claim_key: str, what: str) -> _Claim | bool:
    """The claim once this process holds it; False once the artifact is complete. A claim whose
    build has taken past MAX_WAIT_SECONDS is taken over as a stale one is: by one waiter, which
    builds it again, while the others go on waiting."""
    watch = ClaimWatch()
    started = last_said = time.monotonic()
    while True:
        if store.is_complete(artifact_key):
            return False
        now = time.monotonic()
        record = store.read_record(claim_key)
        free = watch.is_free(record, now)
        hung = not free and watch.is_hung(now)
        if free or hung:
            seen = _version(record)
            claim = _try_claim(store, claim_key, lambda current: _version(current) == seen)
            if claim is not None:
                if hung:
                    log.warning("%s: waited %.0f s for another process's build; building it here", what, now - started)
                try:
                    complete = store.is_complete(artifact_key)  # published and given up between the two reads
                except BaseException:
                    claim.release()
                    raise
                if complete:
                    claim.release()
                    return False
                return claim
        if now - last_said >= PROGRESS_EVERY_SECONDS:
            builder = (record or {}).get("builder") or {}
            log.info("%s: waiting for the build of %s (pid %s), %.0f s so far", what, builder.get("host", "?"),
                     builder.get("pid", "?"), now - started)
            last_said = now
        time.sleep(POLL_SECONDS)
