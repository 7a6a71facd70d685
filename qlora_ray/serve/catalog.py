"""What the gateway answers to: the job's model names, each with the artifact it serves, and the
tenants' keys, read from the store in a thread and served from memory.

Reading the store costs about four reads per model and one for the quality verdicts, and may stall
(a slow S3, a network partition); the gateway's event loop carries every tenant's streams, so it
never reads the store itself. A daemon thread rereads keys and catalog every
serve.catalog_refresh_s; requests see the last complete reading. While the store cannot be read,
the last reading stays in force and the log says so once.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from qlora_ray.errors import UserError
from qlora_ray.manifest import manifest_digest
from qlora_ray.quality.verdicts import read_verdicts
from qlora_ray.serve.keys import KeyRing
from qlora_ray.spec import FusedVariant, JobSpec
from qlora_ray.store import Store, adapter_key, base_key, fused_key

log = logging.getLogger(__name__)
UNMERGED = "unmerged"


@dataclass(frozen=True)
class ModelEntry:
    id: str  # "<tenant>/<variant>" or "<tenant>/unmerged": the model a replica loads
    tenant: str
    variant: str
    key: str  # the store key it loads from (the adapter's, for unmerged)
    size_bytes: int = 0  # its files in the store (with the base's, for unmerged): what a replica must make room for
    refused: str | None = None  # why it is not served: it failed the quality gate
    version: str = ""  # the fused artifact's manifest digest as the catalog read it: a model fused again is another

    @property
    def deployment(self) -> str:
        return UNMERGED if self.variant == UNMERGED else "fused"


def _size(manifest: dict) -> int:
    return sum(entry["size"] for entry in manifest["files"].values())


def model_catalog(spec: JobSpec, store: Store) -> dict[str, ModelEntry]:
    """Every model name this job answers to now, each with the model it serves:
    - `<tenant>/<scheme>.<merge base>` for every complete fused artifact; one the eval stage's
      verdicts say failed the quality gate is refused, unless serve.allow_failed_quality is set;
    - `<tenant>/<scheme>`: the scheme's default merge base (the better one by the eval stage, else
      the first of the job's);
    - `<tenant>/unmerged`: base + adapter through peft."""
    entries = {}
    base_size = None
    verdicts = read_verdicts(store, spec.name)
    for tenant in spec.tenants:
        defaults: dict[str, ModelEntry] = {}
        failed: dict[FusedVariant, tuple[dict, int]] = {}  # variant -> its quality verdict, its size
        for variant in spec.fused_variants(tenant):
            key = fused_key(spec.name, tenant.id, variant.name)
            if not store.is_complete(key):
                continue
            manifest = store.read_manifest(key)
            quality = verdicts.of(tenant.id, variant.name, manifest) or {}
            if quality.get("passed") is False and not spec.serve.allow_failed_quality:
                failed[variant] = (quality, _size(manifest))
                continue
            entry = ModelEntry(f"{tenant.id}/{variant.name}", tenant.id, variant.name, key, _size(manifest),
                               version=manifest_digest(manifest))
            entries[entry.id] = entry
            if variant.scheme not in defaults or quality.get("default_for_scheme"):
                defaults[variant.scheme] = entry
        for scheme, entry in defaults.items():
            entries[f"{tenant.id}/{scheme}"] = entry
        for variant, (quality, size) in failed.items():
            instead = f"{tenant.id}/{variant.scheme}" if variant.scheme in defaults else f"{tenant.id}/{UNMERGED}"
            refused = (f"failed the quality gate ({'; '.join(quality.get('reasons', []))}); use {instead} instead, "
                       "or set serve.allow_failed_quality")
            name = f"{tenant.id}/{variant.name}"
            entries[name] = ModelEntry(name, tenant.id, variant.name, fused_key(spec.name, tenant.id, variant.name),
                                       size, refused)
        if spec.serve.unmerged_baseline and store.is_complete(adapter_key(spec.name, tenant.id)):
            if base_size is None:
                base_size = _size(store.read_manifest(base_key(spec.base.name)))
            name = f"{tenant.id}/{UNMERGED}"
            entries[name] = ModelEntry(name, tenant.id, UNMERGED, adapter_key(spec.name, tenant.id),
                                       base_size + _size(store.read_manifest(adapter_key(spec.name, tenant.id))))
    return entries


class StoreView:
    """The catalog and the key ring as last read, refreshed by a daemon thread (see the module
    docstring). The first reading happens in the constructor: a gateway that cannot read its store
    at start fails to start, which Serve reports."""

    def __init__(self, spec: JobSpec, store: Store, extra_keys: dict[str, str] | None = None):
        self.spec, self.store = spec, store
        self.keys = KeyRing(store, spec.name, extra_keys)
        self.catalog: dict[str, ModelEntry] = model_catalog(spec, store)
        self._stale_since: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh_forever, name="qlora-ray-store-view", daemon=True)
        self._thread.start()

    def tenant(self, key: str) -> str | None:
        return self.keys.tenant(key)

    def refresh(self) -> None:
        """One reading of keys and catalog (on the calling thread); the last reading stays on failure."""
        self.keys.reload()
        try:
            catalog = model_catalog(self.spec, self.store)
        except UserError as exc:
            if self._stale_since is None:
                self._stale_since = time.monotonic()
                log.warning("model catalog not reloaded (%s); the %d names known last stay in force until the "
                            "store answers", exc, len(self.catalog))
            return
        if self._stale_since is not None:
            log.warning("model catalog reloaded after %.0f s without the store", time.monotonic() - self._stale_since)
            self._stale_since = None
        self.catalog = catalog  # one assignment: readers see the old reading or the new one

    def close(self) -> None:
        self._stop.set()

    def _refresh_forever(self) -> None:
        while not self._stop.wait(self.spec.serve.catalog_refresh_s):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - the thread must outlive any one bad reading
                log.exception("reading the model catalog failed; the last reading stays in force")
