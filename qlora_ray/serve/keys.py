"""Per-tenant API keys: a key opens its own tenant's models and nothing else.

`qlora-ray keys JOB TENANT` makes a key and prints it once; the store keeps only its sha256 (in
store.api_keys_key), so a leaked store listing leaks no key. The gateway rereads the record at most
every RELOAD_SECONDS, so a new key works without a restart and a revoked one stops working within
that time.
"""

from __future__ import annotations

import hashlib
import secrets
import time

from qlora_ray.errors import UserError
from qlora_ray.store import Store, api_keys_key

RELOAD_SECONDS = 10.0
KEY_PREFIX = "qr-"


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key(store: Store, job: str, tenant: str) -> str:
    """A fresh key for `tenant`, recorded (as its digest) in the store; the key is returned only here."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    record = store.read_record(api_keys_key(job)) or {"keys": {}}
    record["keys"][key_digest(key)] = {"tenant": tenant, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    store.write_record(api_keys_key(job), record)
    return key


def revoke_tenant(store: Store, job: str, tenant: str) -> int:
    """Remove every key of `tenant`; returns how many there were."""
    record = store.read_record(api_keys_key(job)) or {"keys": {}}
    kept = {digest: entry for digest, entry in record["keys"].items() if entry["tenant"] != tenant}
    removed = len(record["keys"]) - len(kept)
    store.write_record(api_keys_key(job), {"keys": kept})
    return removed


class KeyRing:
    """Resolves a bearer key to its tenant, from the store record plus keys given at start-up."""

    def __init__(self, store: Store | None, job: str, extra: dict[str, str] | None = None):
        self.store, self.job = store, job
        self.extra = {key_digest(key): tenant for key, tenant in (extra or {}).items()}
        self.known: dict[str, str] = {}
        self.loaded_at = float("-inf")
        self._reload()

    def tenant(self, key: str) -> str | None:
        digest = key_digest(key)
        if time.monotonic() - self.loaded_at > RELOAD_SECONDS:
            self._reload()
        return self.extra.get(digest) or self.known.get(digest)

    def _reload(self) -> None:
        self.loaded_at = time.monotonic()
        if self.store is None:
            return
        try:
            record = self.store.read_record(api_keys_key(self.job)) or {"keys": {}}
        except UserError:
            return  # the store is unreachable: keep the keys already known
        self.known = {digest: entry["tenant"] for digest, entry in record.get("keys", {}).items()}
