"""Live per-tenant progress, kept as small records in the store so any process can read it.

A training task writes its record when it starts, every few seconds while it trains, and when it
ends; `qlora-ray status` and the driver read them. Records are advisory: what is complete is decided
only by the artifacts' _SUCCESS markers.

A task killed with its node (or a driver killed with it) cannot write "failed", so while a record
says "running" a heartbeat rewrites its `updated_at` every HEARTBEAT_SECONDS, even while the task
loads a model and no step is logged. A "running" record that has not been written for STALE_SECONDS
is shown as "stale": its writer is most likely gone, and a rerun resumes the tenant from its last
checkpoint.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from datetime import datetime, timezone

from qlora_ray.errors import UserError
from qlora_ray.store import Store, status_key

log = logging.getLogger(__name__)

WRITE_EVERY_SECONDS = 5.0
HEARTBEAT_SECONDS = 30.0
# Ten missed heartbeats: a writer that is alive but slow to reach the store is not called stale,
# nor is one on a node whose clock runs a few minutes behind.
STALE_SECONDS = 10 * HEARTBEAT_SECONDS


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class StatusWriter:
    """Writes one tenant's record; progress updates are throttled, state changes are not. While the
    state is "running", a daemon thread keeps `updated_at` fresh (call `close` when done)."""

    def __init__(self, store: Store, job: str, tenant: str):
        self.store, self.key = store, status_key(job, tenant)
        self.record: dict = {"tenant": tenant, "host": socket.gethostname(), "pid": os.getpid()}
        self.last_write = 0.0
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def state(self, state: str, **fields) -> None:
        with self._lock:
            self.record.update(fields, state=state, updated_at=now_iso())
            self._write()
        if state == "running":
            self._start_heartbeat()
        else:
            self.close()

    def progress(self, **fields) -> None:
        with self._lock:
            self.record.update(fields, updated_at=now_iso())
            if time.monotonic() - self.last_write >= WRITE_EVERY_SECONDS:
                self._write()

    def close(self) -> None:
        """Stop the heartbeat (a state other than "running" does this too)."""
        self._stopped.set()

    def _start_heartbeat(self) -> None:
        if self._heartbeat is not None and self._heartbeat.is_alive():
            return
        self._stopped.clear()
        self._heartbeat = threading.Thread(target=self._beat, name=f"status-heartbeat-{self.record['tenant']}",
                                           daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
        while not self._stopped.wait(HEARTBEAT_SECONDS):
            with self._lock:
                if self._stopped.is_set() or self.record.get("state") != "running":
                    return
                self.record["updated_at"] = now_iso()
                try:
                    self._write()
                except UserError as exc:  # a store hiccup must not end the training it reports on
                    log.warning("status heartbeat not written: %s", exc)

    def _write(self) -> None:
        self.store.write_record(self.key, self.record)
        self.last_write = time.monotonic()


def read_status(store: Store, job: str, tenant: str) -> dict | None:
    return store.read_record(status_key(job, tenant))


def silent_seconds(record: dict, now: datetime | None = None) -> float | None:
    """Seconds since a record was last written (None if it does not say when)."""
    try:
        updated = datetime.fromisoformat(record["updated_at"])
    except (KeyError, TypeError, ValueError):
        return None
    if updated.tzinfo is None:
        updated = updated.replace(tzinfo=timezone.utc)
    return ((now or datetime.now(timezone.utc)) - updated).total_seconds()


def is_stale(record: dict, now: datetime | None = None) -> bool:
    """A "running" record not written for STALE_SECONDS: its writer is most likely gone."""
    silent = silent_seconds(record, now)
    return record.get("state") == "running" and silent is not None and silent > STALE_SECONDS
