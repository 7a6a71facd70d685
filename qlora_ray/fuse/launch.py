"""The fuse stage on Ray: one pass over the base for all tenants, through a pool of actors.

The driver:
1. reads the base's layout (index and config, not its weights) and what it needs of every tenant's
   adapter, and plans the builds (fuse/plan.py): an adapter for another base, or with targets the
   base lacks, fails that tenant now, before anything is written, and the others go on;
2. skips artifacts already complete, and begins a new version (Store.begin) of each shard-wise one
   (bf16, nf4, and gptq-int4 in bulk mode);
3. for bulk gptq-int4 with pooled Hessians, has the pool capture each Hessian set the builds read
   (one per merge base), unless the store holds it from the same inputs; a set that fails fails its
   builds;
4. hands the work to `fuse.workers` actors: for bulk gptq-int4 with per-tenant Hessians, one walk of
   the base per group of tenants (each shard's part of their artifacts uploaded as the walk completes
   it); one unit per base shard (every tenant's other shard-wise outputs for that shard, uploaded
   into their versions); then one unit per tenant and merge base for per-tenant gptq-int4, which
   publishes its own;
5. seals each shard-wise version (config, tokenizer, index, manifest, _SUCCESS) once all its
   shards are in. A version with a failed part is abandoned, never sealed; a failure removes only
   this run's version, never a complete artifact another run published meanwhile.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from qlora_ray.adapter_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, check_adapter_files
from qlora_ray.bases import INDEX_NAME
from qlora_ray.cluster import (copies_that_fit, describe_request, error_text, init_ray, joined_existing_cluster,
                               live_node_resources, node_request, ray_resource_names, refuse_process_local_store)
from qlora_ray.errors import AdapterError, StoreError, UserError
from qlora_ray.fuse.layout import BaseLayout, adapter_problems, read_layout
from qlora_ray.fuse.gptq_bulk import quantize_config
from qlora_ray.fuse.plan import (AdapterFacts, Build, FuseOutcome, GptqUnit, HessianUnit, ShardUnit, StreamUnit,
                                  TenantPlan, adapter_format, fuse_units, gptq_problems, hessian_units, plan_tenant,
                                  stream_units)
from qlora_ray.fuse.worker import FuseWorker, load_adapter_deltas
from qlora_ray.local_disk import scratch_dir
from qlora_ray.manifest import manifest_digest
from qlora_ray.spec import JobSpec, TenantSpec
from qlora_ray.store import AlreadyPublished, Draft, Store, adapter_key, base_key, data_key, fused_key, hessian_key
from qlora_ray.tables import text_table
from qlora_ray.work_orders import GptqOrder

# Restarts of a dead fuse actor (its unfinished unit runs again after each) before it counts as gone.
MAX_RESTARTS = 3
# Tries of a unit that failed reading or writing the store, before its artifacts count as failed.
STORE_ATTEMPTS = 3


@dataclass
class _Artifact:
    """A bf16/nf4 artifact being assembled from shard parts."""

    build: Build
    draft: Draft
    parts: dict[str, dict] = field(default_factory=dict)
    error: str | None = None

    @property
    def name(self) -> str:
        return f"{self.build.tenant}/{self.build.variant.name}"


def fuse_job(spec: JobSpec, *, progress: Callable[[str], None] = print) -> list[FuseOutcome]:
    """Fuse every tenant's adapter into every variant the job asks for. Returns one outcome per variant."""
    store = Store(spec.store, spec.storage_options)
    refuse_process_local_store(store, spec.store, "fusing")
    bkey = base_key(spec.base.name)
    if not store.is_complete(bkey):
        raise UserError(f"{store.url(bkey)}: the base is not in the store; run `qlora-ray base import --job JOB` "
                        "or `qlora-ray run JOB` first")
    base_manifest = store.read_manifest(bkey)
    outcomes: list[FuseOutcome] = []
    with scratch_dir("fuse-driver") as tmp:
        small_files = [rel for rel in base_manifest["files"] if not rel.endswith(".safetensors")]
        base_dir = tmp / "base"
        store.fetch(bkey, base_dir, only=small_files)
        layout = read_layout(base_dir)
        problems_of_gptq = gptq_problems(spec, layout)
        artifacts, gptq_builds = [], []
        for tenant in spec.tenants:
            builds, settled = _tenant_builds(spec, store, tenant, layout, manifest_digest(base_manifest),
                                             problems_of_gptq, tmp / "adapters", progress)
            outcomes += settled
            for build in builds:
                if not build.drafted:
                    gptq_builds.append(build)
                    continue
                try:
                    draft = store.begin(fused_key(spec.name, tenant.id, build.variant.name))
                except AlreadyPublished:  # another run of this job published it since the plan
                    outcomes.append(_published_meanwhile(store, spec, tenant.id, build.variant.name, progress))
                    continue
                artifacts.append(_Artifact(build, draft))
        if artifacts or gptq_builds:
            outcomes += _run_pool(spec, store, layout, artifacts, gptq_builds, base_dir, progress)
    order = {(t.id, v.name): i for i, t in enumerate(spec.tenants) for v in spec.fused_variants(t)}
    return sorted(outcomes, key=lambda o: order.get((o.tenant, o.variant), len(order)))


def _tenant_builds(spec: JobSpec, store: Store, tenant: TenantSpec, layout: BaseLayout, base_manifest_sha256: str,
                   gptq_problems: list[str], scratch: Path,
                   progress: Callable[[str], None]) -> tuple[list[Build], list[FuseOutcome]]:
    """(the builds of one tenant's variants not yet complete; outcomes settled now: skipped, failed)."""
    todo, settled = [], []
    for variant in spec.fused_variants(tenant):
        key = fused_key(spec.name, tenant.id, variant.name)
        if store.is_complete(key):
            settled.append(FuseOutcome(tenant.id, variant.name, "skipped", store.read_manifest(key)["metrics"]))
        else:
            todo.append(variant)
    if not todo:
        return [], settled
    facts = _read_adapter(spec, store, tenant, layout, scratch / tenant.id)
    plan = (TenantPlan([], [FuseOutcome(tenant.id, v.name, "failed", error=facts) for v in todo]) if isinstance(facts, str)
            else plan_tenant(spec, tenant, todo, facts, base_manifest_sha256, gptq_problems))
    for message in dict.fromkeys(outcome.error for outcome in plan.failed):
        progress(f"fuse {tenant.id}: failed: {message}")
    return plan.builds, settled + plan.failed


def _read_adapter(spec: JobSpec, store: Store, tenant: TenantSpec, layout: BaseLayout, folder: Path) -> AdapterFacts | str:
    """What the plan needs to know of a tenant's adapter and data, or why it cannot be fused. The
    factors' shapes are enough to check the adapter against the base: no weights are read."""
    akey = adapter_key(spec.name, tenant.id)
    if not store.is_complete(akey):
        return f"no adapter at {store.url(akey)}; train it first (qlora-ray train JOB)"
    try:
        manifest = store.read_manifest(akey)
        check_adapter_files(list(manifest["files"]), store.url(akey))
        store.fetch(akey, folder, only=[ADAPTER_CONFIG, ADAPTER_WEIGHTS])
        deltas = load_adapter_deltas(folder, device="meta")
        trained = adapter_format(tenant, manifest)
    except (AdapterError, StoreError) as exc:
        return str(exc)
    except ValueError as exc:
        return f"the adapter cannot be merged: {exc}"
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    dkey = data_key(spec.name, tenant.id)
    return AdapterFacts(manifest, manifest_digest(manifest), trained, adapter_problems(layout, deltas),
                        store.read_manifest(dkey) if store.is_complete(dkey) else None)


def _run_pool(spec: JobSpec, store: Store, layout: BaseLayout, artifacts: list[_Artifact], gptq_builds: list[Build],
              base_dir: Path, progress: Callable[[str], None]) -> list[FuseOutcome]:
    import ray

    init_ray()
    resources = spec.fuse.resources
    hessian_sets = [unit for unit in hessian_units(spec, [a.build for a in artifacts])
                    if not _hessians_current(store, spec, unit)]
    streamed = {a.name: (a.build, a.draft) for a in artifacts if a.build.streamed}
    shard_wise = {a.name: (a.build, a.draft) for a in artifacts if not a.build.streamed}
    units = fuse_units(layout.shard_files, shard_wise, gptq_builds)
    pool_size = _pool_size(spec, max(len(units) + len(streamed), len(hessian_sets)), progress)
    if not pool_size:
        asked = describe_request(ray_resource_names(resources))
        error = f"fuse.resources: no node of this Ray cluster has room for one fuse worker ({asked}); lower fuse.resources"
        progress(f"fuse: failed: {error}")
        return _refuse_all(store, artifacts, gptq_builds, error)
    # max_task_retries=-1: a unit whose actor died runs again once the actor is back, however many
    # times Ray tries in between; a bounded count is spent in the instant before a dead node is
    # known dead. The restarts bound it: past them the actor is gone and its unit fails.
    actor_class = ray.remote(FuseWorker).options(**node_request(resources), max_restarts=MAX_RESTARTS,
                                                 max_task_retries=-1)
    workers = [actor_class.remote(GptqOrder.of(spec), layout.quantized, int(resources.num_cpus), resources.num_gpus)
               for _ in range(pool_size)]
    started = time.monotonic()
    by_name = {artifact.name: artifact for artifact in artifacts}
    if hessian_sets:
        progress(f"fusing: capturing {len(hessian_sets)} Hessian set(s) for bulk GPTQ on {len(workers)} worker(s)")
        failed_pools = {}

        def settle_hessians(unit: HessianUnit, result: dict | None, error: str | None) -> None:
            if error:
                failed_pools[unit.pool] = error
                progress(f"fuse: {unit.name} FAILED: {error}")
            else:
                progress(f"fuse: {unit.name} captured from {result['metrics']['calibration_rows']} row(s) in "
                         f"{result['metrics']['seconds']:.0f} s [{time.monotonic() - started:.0f} s]")

        _schedule(workers, hessian_sets, lambda worker, unit: worker.capture_hessians.remote(unit), settle_hessians,
                  progress)
        for artifact in artifacts:
            pool = artifact.build.target.hessian_pool
            if pool in failed_pools:
                artifact.error = f"hessians {pool}: {failed_pools[pool]}"
        if failed_pools:
            units = fuse_units(layout.shard_files, {name: entry for name, entry in shard_wise.items()
                                                    if not by_name[name].error}, gptq_builds)
    # The walks first: each is a whole model's work for several tenants, against a shard's for the shard units.
    walks = stream_units(streamed, len(workers))
    units = walks + units
    shard_artifacts = sum(1 for name in shard_wise if not by_name[name].error)
    progress(f"fusing on {len(workers)} worker(s): "
             + (f"{len(streamed)} gptq-int4 model(s) with their own Hessians in {len(walks)} walk(s) of the base, "
                if walks else "")
             + f"{len(layout.shard_files)} base shard(s) x {shard_artifacts} shard-wise artifact(s), then "
             f"{len(gptq_builds)} per-tenant GPTQ quantization(s)")
    outcomes: list[FuseOutcome] = []
    shards_done = 0

    def settle(unit: ShardUnit | StreamUnit | GptqUnit, result: dict | None, error: str | None) -> None:
        nonlocal shards_done
        elapsed = time.monotonic() - started
        if isinstance(unit, StreamUnit):
            for name in unit.drafts:
                artifact = by_name[name]
                problem = error or result["failed"].get(name)
                if problem:
                    artifact.error = artifact.error or f"{unit.name}: {problem}"
                    progress(f"fuse {name}: FAILED: {problem}")
                else:
                    facts = {k: v for k, v in result.items() if k.startswith("worker_")} | result["calibration"][name]
                    artifact.parts.update({shard: part | facts for shard, part in result["parts"][name].items()})
            if not error:
                progress(f"fuse: {unit.name}: done for {len(result['parts'])} model(s) in {result['seconds']:.0f} s "
                         f"[{elapsed:.0f} s]")
        elif isinstance(unit, ShardUnit):
            shards_done += 1
            for name in unit.drafts:
                artifact = by_name[name]
                if error:
                    artifact.error = artifact.error or f"{unit.name}: {error}"
                else:
                    artifact.parts[unit.shard_file] = result["parts"][name] | {
                        k: v for k, v in result.items() if k.startswith("worker_")}
            progress(f"fuse: shard {shards_done}/{len(layout.shard_files)} {unit.shard_file} "
                     + (f"FAILED: {error}" if error else
                        f"done for {len(result['parts'])} artifact(s) in {result['seconds']:.1f} s") + f" [{elapsed:.0f} s]")
        else:
            build = unit.build
            if error:  # the worker's publish removed its own version; nothing else is touched
                outcomes.append(FuseOutcome(build.tenant, build.variant.name, "failed", error=error))
                progress(f"fuse {unit.name}: FAILED: {error}")
            else:
                outcomes.append(FuseOutcome(build.tenant, build.variant.name, "done", result["metrics"]))
                progress(f"fuse {unit.name}: done in {result['metrics']['seconds']:.0f} s [{elapsed:.0f} s]")

    def call(worker, unit: ShardUnit | StreamUnit | GptqUnit):
        if isinstance(unit, StreamUnit):
            return worker.fuse_gptq_stream.remote(unit)
        if isinstance(unit, ShardUnit):
            return worker.fuse_shard.remote(unit.shard_file, list(unit.targets), unit.drafts)
        return worker.fuse_gptq.remote(unit.build.target, unit.build.inputs)

    _schedule(workers, units, call, settle, progress)
    for worker in workers:
        try:
            ray.get(worker.close.remote())
        except ray.exceptions.RayError:
            pass  # a worker that died has no cache left to clear on this node
        ray.kill(worker)
    for artifact in artifacts:
        outcomes.append(_seal(spec, store, layout, artifact, base_dir))
    return outcomes


def _hessians_current(store: Store, spec: JobSpec, unit: HessianUnit) -> bool:
    """Whether the store holds this Hessian set captured from the same inputs (then it is used as it is)."""
    key = hessian_key(spec.name, unit.pool)
    return store.is_complete(key) and store.read_manifest(key)["inputs"] == unit.inputs


def _pool_size(spec: JobSpec, units: int, progress: Callable[[str], None]) -> int:
    """How many fuse workers to start: fuse.workers, no more than there are units, and, on a cluster
    we started (no autoscaler: no node will join), no more than its nodes have room for. A worker no
    node can place waits without end, and so would every unit handed to it. 0: not even one fits."""
    wanted = min(spec.fuse.workers, units)
    if joined_existing_cluster():
        return wanted
    room = copies_that_fit(live_node_resources(), ray_resource_names(spec.fuse.resources))
    if room < wanted:
        progress(f"fuse.workers: {wanted} asked, but this machine has room for {room} worker(s) of "
                 f"{describe_request(ray_resource_names(spec.fuse.resources))} (fuse.resources); fusing on {room}")
    return min(wanted, room)


def _refuse_all(store: Store, artifacts: list[_Artifact], gptq_builds: list[Build], error: str) -> list[FuseOutcome]:
    """Every build of the pool failed with one error, before any work: drafts removed, nothing published."""
    for artifact in artifacts:
        store.abandon(artifact.draft)
    builds = [a.build for a in artifacts] + gptq_builds
    return [FuseOutcome(build.tenant, build.variant.name, "failed", error=error) for build in builds]


def _schedule(workers: list, units: list, call: Callable, settle: Callable[[object, dict | None, str | None], None],
              progress: Callable[[str], None]) -> None:
    """Run every unit on the pool (call(worker, unit) starts one), settling each as it ends. A worker
    that died past its restarts leaves `workers`."""
    import ray

    # A small scheduling loop rather than ray.util.ActorPool: a failed unit must be known by name
    # (to fail its artifacts, or to try it again), while ActorPool raises its error without saying
    # which unit it was.
    pending = list(range(len(units)))
    attempts = [0] * len(units)
    running: dict = {}
    idle = list(workers)
    while pending or running:
        while idle and pending:
            worker, index = idle.pop(), pending.pop(0)
            running[call(worker, units[index])] = (worker, index)
        if not running:  # every worker is gone for good
            for index in pending:
                settle(units[index], None, f"no fuse worker left: each died {MAX_RESTARTS + 1} times")
            break
        ready, _ = ray.wait(list(running), num_returns=1)
        worker, index = running.pop(ready[0])
        try:
            result, error = ray.get(ready[0]), None
        except ray.exceptions.RayError as exc:
            result, error = None, error_text(exc)
            if isinstance(exc, ray.exceptions.ActorDiedError):
                workers.remove(worker)
                progress(f"fuse: a worker died past its {MAX_RESTARTS} restarts; {len(workers)} left")
                settle(units[index], None, error)
                continue
            attempts[index] += 1
            # A flaky store is worth another try; a damaged file fails every time, hence the bound.
            if isinstance(getattr(exc, "cause", None), StoreError) and attempts[index] < STORE_ATTEMPTS:
                progress(f"fuse: {units[index].name}: {error}; trying again ({attempts[index]}/{STORE_ATTEMPTS})")
                idle.append(worker)
                pending.append(index)
                continue
        idle.append(worker)
        settle(units[index], result, error)


def _seal(spec: JobSpec, store: Store, layout: BaseLayout, artifact: _Artifact, base_dir: Path) -> FuseOutcome:
    tenant, name = artifact.build.tenant, artifact.build.variant.name
    missing = [f for f in layout.shard_files if f not in artifact.parts]
    if artifact.error or missing:
        store.abandon(artifact.draft)
        return FuseOutcome(tenant, name, "failed", error=artifact.error or f"shards missing: {missing}")
    try:
        with scratch_dir("fuse-seal") as folder:
            _write_model_files(spec, base_dir, folder, artifact)
            files = {rel: store.put_part(artifact.draft, rel, folder / rel) for rel in sorted(p.name for p in folder.iterdir())}
        files.update({shard: {"sha256": part["sha256"], "size": part["size"]} for shard, part in artifact.parts.items()})
        parts = artifact.parts.values()
        metrics = {
            "seconds": round(sum(p["seconds"] for p in parts), 2),
            "size_bytes": sum(f["size"] for f in files.values()),
            "shards": len(artifact.parts),
            **{k: max(p.get(k, 0) for p in parts)
               for k in ("worker_peak_rss_bytes", "worker_peak_gpu_bytes", "calibration_rows", "calibration_tokens")
               if any(k in p for p in parts)},
            "worker_node_ids": sorted({p["worker_node_id"] for p in parts}),
            "worker_gpu_ids": sorted({gpu for p in parts for gpu in p.get("worker_gpu_ids", ())}),
        }
        manifest = store.seal(artifact.draft, files, kind="fused", inputs=artifact.build.inputs, metrics=metrics)
    except AlreadyPublished:  # sealed by another run of this job first; this run's version is gone
        return _published_meanwhile(store, spec, tenant, name)
    except StoreError as exc:
        store.abandon(artifact.draft)
        return FuseOutcome(tenant, name, "failed", error=str(exc))
    return FuseOutcome(tenant, name, "done", manifest["metrics"])


def _published_meanwhile(store: Store, spec: JobSpec, tenant: str, variant: str,
                         progress: Callable[[str], None] | None = None) -> FuseOutcome:
    """The outcome of a variant another run published while this one planned or built it: kept."""
    key = fused_key(spec.name, tenant, variant)
    if progress:
        progress(f"fuse {tenant} {variant}: published meanwhile by another run; kept")
    return FuseOutcome(tenant, variant, "skipped", store.read_manifest(key)["metrics"])


def _write_model_files(spec: JobSpec, base_dir: Path, folder: Path, artifact: _Artifact) -> None:
    """The small files of a fused HF folder: the base's tokenizer and configs, config.json with the
    scheme's quantization_config, and the index of the fused shards."""
    for path in base_dir.iterdir():
        if path.is_file() and path.name not in ("config.json", INDEX_NAME):
            shutil.copy2(path, folder / path.name)
    config = json.loads((base_dir / "config.json").read_text())
    if artifact.build.variant.scheme == "nf4":
        config["quantization_config"] = artifact.build.target.output_format.quantization_config()
    if artifact.build.variant.scheme == "gptq-int4":  # as GPTQModel's save writes them
        gptq = quantize_config(spec.fuse.gptq)
        config["quantization_config"] = gptq.to_dict()
        gptq.save_pretrained(str(folder))
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    weight_map = {name: shard for shard, part in sorted(artifact.parts.items()) for name in part["tensors"]}
    total = sum(part["tensor_bytes"] for part in artifact.parts.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))


def render_fuse_outcomes(outcomes: list[FuseOutcome]) -> str:
    rows = []
    for o in outcomes:
        m = o.metrics or {}
        rows.append([o.tenant, o.variant, o.state, m.get("seconds"), _mb(m.get("size_bytes")),
                     _gib(m.get("worker_peak_rss_bytes")), (o.error or "")[:80]])
    return text_table(["tenant", "variant", "state", "seconds", "size MB", "worker peak GiB", "error"], rows)


def _mb(value: int | None) -> float | None:
    return None if value is None else round(value / 1e6, 1)


def _gib(value: int | None) -> float | None:
    return None if value is None else round(value / 2**30, 2)
