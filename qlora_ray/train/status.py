"""Live per-tenant progress, kept as small records in the store so any process can read it.

A training task writes its record when it starts, every few seconds while it trains, and when it
ends; `qlora-ray status` and the driver read them. Records are advisory: what is complete is decided
only by the artifacts' _SUCCESS markers.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import datetime, timezone

from qlora_ray.store import Store, status_key

WRITE_EVERY_SECONDS = 5.0


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class StatusWriter:
    """Writes one tenant's record; progress updates are throttled, state changes are not."""

    def __init__(self, store: Store, job: str, tenant: str):
        self.store, self.key = store, status_key(job, tenant)
        self.record: dict = {"tenant": tenant, "host": socket.gethostname(), "pid": os.getpid()}
        self.last_write = 0.0

    def state(self, state: str, **fields) -> None:
        self.record.update(fields, state=state, updated_at=now_iso())
        self._write()

    def progress(self, **fields) -> None:
        self.record.update(fields, updated_at=now_iso())
        if time.monotonic() - self.last_write >= WRITE_EVERY_SECONDS:
            self._write()

    def _write(self) -> None:
        self.store.write_record(self.key, self.record)
        self.last_write = time.monotonic()


def read_status(store: Store, job: str, tenant: str) -> dict | None:
    return store.read_record(status_key(job, tenant))
