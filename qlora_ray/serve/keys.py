"""Per-tenant API keys: a key opens its own tenant's models and nothing else.

`qlora-ray keys JOB TENANT` makes a key and prints it once; the store keeps only its sha256 (in
store.api_keys_key), so a leaked store listing leaks no key. Changes go through
Store.update_record, so concurrent `keys` commands neither lose a key nor bring a revoked one back,
and a damaged record is refused rather than overwritten. The gateway rereads the record in a thread
every serve.catalog_refresh_s (serve/catalog.py), so a new key works without a restart and a revoked
one stops working within that time; while the store cannot be read, the keys known last stay valid,
and the log says so.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time

from qlora_ray.errors import StoreError, UserError
from qlora_ray.store import Store, api_keys_key

log = logging.getLogger(__name__)

KEY_PREFIX = "qr-"


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key(store: Store, job: str, tenant: str) -> str:
    """A fresh key for `tenant`, recorded (as its digest) in the store; the key is returned only here."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    entry = {"tenant": tenant, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    store.update_record(api_keys_key(job), lambda record: {"keys": {**_keys_of(store, job, record), key_digest(key): entry}})
    return key


def revoke_tenant(store: Store, job: str, tenant: str) -> int:
    """Remove every key of `tenant`; returns how many there were."""
    removed = 0

    def without_tenant(record: dict | None) -> dict:
        nonlocal removed
        keys = _keys_of(store, job, record)
        kept = {digest: entry for digest, entry in keys.items() if entry["tenant"] != tenant}
        removed = len(keys) - len(kept)
        return {"keys": kept}

    store.update_record(api_keys_key(job), without_tenant)
    return removed


def _keys_of(store: Store, job: str, record: dict | None) -> dict[str, dict]:
    """The digest -> entry map of a key record (None: no record yet). A record of another shape is
    refused, never replaced: it holds every tenant's keys."""
    keys = (record or {"keys": {}}).get("keys")
    if not (isinstance(keys, dict) and all(isinstance(e, dict) and isinstance(e.get("tenant"), str) for e in keys.values())):
        raise StoreError(f"{store.url(api_keys_key(job))}: the key record is damaged (not a map of key digests to "
                         "tenants); fix or delete it by hand, nothing was changed")
    return keys


class KeyRing:
    """Resolves a bearer key to its tenant, from the store record as last reloaded plus keys given at
    start-up. Lookups never read the store; reload() does."""

    def __init__(self, store: Store | None, job: str, extra: dict[str, str] | None = None):
        self.store, self.job = store, job
        self.extra = {key_digest(key): tenant for key, tenant in (extra or {}).items()}
        self.known: dict[str, str] = {}
        self.stale_since: float | None = None  # when reloading started to fail, while it does
        self.reload()

    def tenant(self, key: str) -> str | None:
        digest = key_digest(key)
        return self.extra.get(digest) or self.known.get(digest)

    def reload(self) -> None:
        if self.store is None:
            return
        try:
            record = self.store.read_record(api_keys_key(self.job))
            known = {digest: entry["tenant"] for digest, entry in _keys_of(self.store, self.job, record).items()}
        except UserError as exc:
            # Keep the keys known last: refusing every tenant would turn a store outage into an API
            # outage. The price is that a key revoked meanwhile still works, which the log must say.
            if self.stale_since is None:
                self.stale_since = time.monotonic()
                log.warning("API keys not reloaded (%s); until the store answers, the %d keys known last stay valid "
                            "and keys revoked meanwhile still work", exc, len(self.known))
            return
        if self.stale_since is not None:
            log.warning("API keys reloaded after %.0f s without the store", time.monotonic() - self.stale_since)
            self.stale_since = None
        self.known = known
