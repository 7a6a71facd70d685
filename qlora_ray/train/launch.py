"""The train stage on Ray: one task per tenant, with the resources its spec asks for.

The driver validates and stages every tenant's data first (a bad file fails that tenant at once,
with its message, and the others go on), skips tenants whose adapter is complete, and launches one
task per remaining tenant. Fractional `num_gpus` packs several tenants on one GPU; custom
resources steer tasks to node types. Ray retries a task whose worker or node dies, and the retry
resumes from the tenant's last checkpoint in the store. One tenant's failure never stops the others.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from qlora_ray.cluster import (as_completed, error_text, init_ray, joined_existing_cluster, largest_node_resources,
                               ray_resource_names, refuse_process_local_store, task_options)
from qlora_ray.errors import DataError
from qlora_ray.library_output import route_library_output, say
from qlora_ray.spec import JobSpec, TenantSpec
from qlora_ray.store import Store, adapter_key
from qlora_ray.tables import text_table
from qlora_ray.train.status import StatusWriter
from qlora_ray.work_orders import TrainOrder

# Attempts after a worker or node dies (Ray's own default is 3); each resumes from a checkpoint.
MAX_RETRIES = 3


@dataclass
class TenantOutcome:
    tenant: str
    state: str  # "done" | "skipped" | "failed"
    metrics: dict | None = None
    error: str | None = None


def _train_task(order: TrainOrder) -> dict:
    """Body of the Ray task: runs in a fresh worker process (max_calls=1), so memory and peak RSS
    are per tenant."""
    import ray

    from qlora_ray.train.tenant import train_tenant

    route_library_output(worker=True)
    context = ray.get_runtime_context()
    where = {"node_id": context.get_node_id(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}
    return train_tenant(order, where=where, say=say)


def train_job(spec: JobSpec, *, progress: Callable[[str], None] = print) -> list[TenantOutcome]:
    """Train every tenant of the job that has no complete adapter yet. Returns one outcome per tenant."""
    import ray

    from qlora_ray.train.tenant import stage_data, training_fingerprint

    store = Store(spec.store, spec.storage_options)
    refuse_process_local_store(store, spec.store, "training")
    outcomes: dict[str, TenantOutcome] = {}
    pending: list[TenantSpec] = []
    for tenant in spec.tenants:
        key = adapter_key(spec.name, tenant.id)
        done = store.read_manifest(key) if store.is_complete(key) else None
        try:
            data_manifest = stage_data(spec, tenant, store)
        except DataError as exc:
            if done is not None:  # the adapter exists; its data has gone bad since, which it does not need
                outcomes[tenant.id] = TenantOutcome(tenant.id, "skipped", done["metrics"])
                continue
            StatusWriter(store, spec.name, tenant.id).state("failed", error=str(exc))
            outcomes[tenant.id] = TenantOutcome(tenant.id, "failed", error=str(exc))
            progress(f"tenant {tenant.id}: failed before training: {exc}")
            continue
        if done is not None:
            if done["inputs"].get("training_fingerprint") != training_fingerprint(tenant, data_manifest["inputs"]):
                progress(f"tenant {tenant.id}: keeping its adapter, trained with other settings or data; delete "
                         f"{store.url(key)} to train it again")
            outcomes[tenant.id] = TenantOutcome(tenant.id, "skipped", done["metrics"])
            continue
        pending.append(tenant)
    if pending:
        init_ray()
        pending = _drop_unschedulable(pending, outcomes, store, spec, progress)
    if pending:
        remote = ray.remote(max_calls=1)(_train_task)
        refs = {remote.options(**task_options(t.training.resources, name=f"train:{t.id}", max_retries=MAX_RETRIES))
                .remote(TrainOrder.of(spec, t.id)): t.id for t in pending}
        progress(f"training {len(refs)} tenant(s) on Ray: {', '.join(refs.values())}")
        started = time.monotonic()
        for tenant_id, ref in as_completed(refs):
            outcome = outcomes[tenant_id] = _collect(ref, tenant_id, store, spec)
            elapsed = time.monotonic() - started
            if outcome.state == "done":
                m = outcome.metrics
                progress(f"tenant {tenant_id}: done in {elapsed:.0f} s: {m['steps']} steps, final loss "
                         f"{m['final_loss']}, {m['tokens_per_second']} tok/s")
            else:
                progress(f"tenant {tenant_id}: FAILED: {outcome.error}")
    return [outcomes[t.id] for t in spec.tenants]


def _drop_unschedulable(pending: list[TenantSpec], outcomes: dict, store: Store, spec: JobSpec,
                        progress: Callable[[str], None]) -> list[TenantSpec]:
    """Tenants asking for more than any node of this cluster has would wait forever.

    A cluster we started ourselves (no RAY_ADDRESS) has no autoscaler: such tenants fail now, with
    what they asked for. On a cluster that may scale up, they wait, with a warning.
    """
    largest = largest_node_resources()
    schedulable = []
    for tenant in pending:
        wanted = ray_resource_names(tenant.training.resources)
        missing = {k: v for k, v in wanted.items() if v > largest.get(k, 0.0)}
        if not missing:
            schedulable.append(tenant)
            continue
        detail = ", ".join(f"{k} {v:g} (largest node has {largest.get(k, 0.0):g})" for k, v in missing.items())
        if joined_existing_cluster():
            progress(f"tenant {tenant.id}: waiting for a node with {detail}; no node has that now")
            schedulable.append(tenant)
            continue
        message = f"no node of this Ray cluster can run it: it asks for {detail}"
        StatusWriter(store, spec.name, tenant.id).state("failed", error=message)
        outcomes[tenant.id] = TenantOutcome(tenant.id, "failed", error=message)
        progress(f"tenant {tenant.id}: failed: {message}")
    return schedulable


def _collect(ref, tenant_id: str, store: Store, spec: JobSpec) -> TenantOutcome:
    import ray

    try:
        return TenantOutcome(tenant_id, "done", ray.get(ref)["metrics"])
    except ray.exceptions.RayError as exc:
        if not isinstance(exc, ray.exceptions.RayTaskError):  # the worker or node died and the retries ran out
            StatusWriter(store, spec.name, tenant_id).state("failed", error=error_text(exc))
        return TenantOutcome(tenant_id, "failed", error=error_text(exc))


def render_outcomes(outcomes: list[TenantOutcome]) -> str:
    rows = []
    for outcome in outcomes:
        m = outcome.metrics or {}
        rows.append([outcome.tenant, outcome.state, m.get("steps"), m.get("final_loss"), m.get("eval_loss"),
                     m.get("tokens_per_second"), _gib(m.get("peak_memory_bytes")), (outcome.error or "")[:70]])
    return text_table(["tenant", "state", "steps", "loss", "eval loss", "tok/s", "peak GiB", "error"], rows)


def _gib(value: int | None) -> float | None:
    return None if value is None else round(value / 2**30, 2)
