"""What a stage's driver sends a Ray task or actor: a small frozen order holding only what that worker
needs, rather than the whole JobSpec.

A job's spec grows with its tenants, and every task of a stage used to be sent all of it (N tasks
carrying N tenants' settings each), and could read any part of it: which settings a worker really
depends on was nowhere written down. An order says it, and is built on the driver from the spec the
user gave, so a worker never sees a job file.
"""

from __future__ import annotations

from dataclasses import dataclass

from qlora_ray.spec import FusedVariant, GptqSpec, JobSpec, TenantSpec
from qlora_ray.store import Store


@dataclass(frozen=True)
class StoreAddress:
    """Where the job's store is and how to reach it; each worker opens its own Store from it."""

    url: str
    options: dict

    @classmethod
    def of(cls, spec: JobSpec) -> StoreAddress:
        return cls(spec.store, dict(spec.storage_options))

    def open(self) -> Store:
        return Store(self.url, self.options)


@dataclass(frozen=True)
class TrainOrder:
    """One tenant's fine-tune: its settings and data, the base it trains on, and the job's digest
    (which the adapter's manifest records)."""

    store: StoreAddress
    job: str
    base: str
    spec_sha256: str
    tenant: TenantSpec

    @classmethod
    def of(cls, spec: JobSpec, tenant_id: str) -> TrainOrder:
        return cls(StoreAddress.of(spec), spec.name, spec.base.name, spec.spec_hash(), spec.tenant(tenant_id))


@dataclass(frozen=True)
class GptqOrder:
    """A GPTQ-quantizing worker's job: the fuse actors (which merge and quantize tenants' models) and
    the eval stage's naive-PTQ base. The GPTQ settings are the job's, for every tenant."""

    store: StoreAddress
    job: str
    base: str
    gptq: GptqSpec

    @classmethod
    def of(cls, spec: JobSpec) -> GptqOrder:
        return cls(StoreAddress.of(spec), spec.name, spec.base.name, spec.fuse.gptq)


@dataclass(frozen=True)
class EvalOrder:
    """One tenant's evaluation: the artifacts to score (its fused variants, the naive-PTQ row if the
    job makes GPTQ models) and how."""

    store: StoreAddress
    job: str
    base: str
    tenant: TenantSpec
    fused_variants: tuple[FusedVariant, ...]
    naive_ptq: bool  # the job makes gptq-int4 models, so the GPTQ base alone + the adapter is a row
    batch_size: int
    share_compiled_kernels: bool  # serve.share_compiled_kernels: the eval task loads the store's kernel builds too

    @classmethod
    def of(cls, spec: JobSpec, tenant_id: str) -> EvalOrder:
        tenant = spec.tenant(tenant_id)
        return cls(StoreAddress.of(spec), spec.name, spec.base.name, tenant, tuple(spec.fused_variants(tenant)),
                   "gptq-int4" in spec.fuse.schemes, spec.eval.batch_size, spec.serve.share_compiled_kernels)
