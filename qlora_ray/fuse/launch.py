"""The fuse stage on Ray: one pass over the base for all tenants, through a pool of actors.

The driver:
1. reads the base's layout (index and config, not its weights) and checks every tenant's adapter
   against it: an adapter for another base, or with targets the base lacks, fails that tenant
   now, before anything is written, and the others go on;
2. skips artifacts already complete, and begins a new version (Store.begin) of each bf16/nf4 one;
3. hands the work to `fuse.workers` actors: one unit per base shard (every tenant's bf16 and nf4
   outputs for that shard, uploaded into their versions), then one unit per tenant and merge base
   for gptq-int4, which publishes its own;
4. seals each bf16/nf4 version (config, tokenizer, index, manifest, _SUCCESS) once all its
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
from qlora_ray.errors import AdapterError, StoreError, UserError
from qlora_ray.fuse.layout import BaseLayout, adapter_problems, read_layout
from qlora_ray.fuse.quant import FourBit, trained_format
from qlora_ray.fuse.shards import SHARD_SCHEMES, ShardTarget
from qlora_ray.fuse.worker import FuseWorker, load_adapter_deltas
from qlora_ray.local_disk import scratch_dir
from qlora_ray.manifest import manifest_digest
from qlora_ray.spec import FusedVariant, JobSpec, TenantSpec
from qlora_ray.store import AlreadyPublished, Draft, Store, adapter_key, base_key, data_key, fused_key
from qlora_ray.tables import text_table

# Restarts of a dead fuse actor (its unfinished unit runs again after each) before it counts as gone.
MAX_RESTARTS = 3
# Tries of a unit that failed reading or writing the store, before its artifacts count as failed.
STORE_ATTEMPTS = 3


@dataclass
class FuseOutcome:
    tenant: str
    variant: str
    state: str  # "done" | "skipped" | "failed"
    metrics: dict = field(default_factory=dict)
    error: str | None = None


@dataclass
class _Artifact:
    """A bf16/nf4 artifact being assembled from shard parts."""

    tenant: str
    variant: FusedVariant
    target: ShardTarget
    inputs: dict
    draft: Draft
    parts: dict[str, dict] = field(default_factory=dict)
    error: str | None = None


def adapter_format(tenant: TenantSpec, adapter_manifest: dict) -> FourBit | None:
    """The format the tenant's adapter was trained against, by its manifest (fuse/quant.trained_format)."""
    return trained_format(adapter_manifest, tenant.training.quantization, tenant.training.double_quant)


def output_format(tenant: TenantSpec) -> FourBit:
    """The nf4 scheme's format: NF4, with the tenant's double-quantization choice."""
    return FourBit("nf4", tenant.training.double_quant)


def fuse_job(spec: JobSpec, *, progress: Callable[[str], None] = print) -> list[FuseOutcome]:
    """Fuse every tenant's adapter into every variant the job asks for. Returns one outcome per variant."""
    store = Store(spec.store, spec.storage_options)
    if "memory" in store.fs.protocol:
        raise UserError(f"store {spec.store}: a memory:// store lives in one process, and Ray's workers are "
                        "others; use a folder or s3:// for fusing")
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
        gptq_problems = _gptq_problems(spec, layout)
        artifacts, gptq_jobs = [], []
        for tenant in spec.tenants:
            planned, settled = _plan_tenant(spec, store, tenant, layout, base_manifest, gptq_problems, tmp, progress)
            outcomes += settled
            for variant, inputs, trained in planned:
                target = ShardTarget(tenant.id, variant.merge_base, (variant.scheme,), trained, output_format(tenant))
                if variant.scheme not in SHARD_SCHEMES:
                    gptq_jobs.append((target, inputs))
                    continue
                try:
                    draft = store.begin(fused_key(spec.name, tenant.id, variant.name))
                except AlreadyPublished:  # another run of this job published it since the plan
                    outcomes.append(_published_meanwhile(store, spec, tenant.id, variant.name, progress))
                    continue
                artifacts.append(_Artifact(tenant.id, variant, target, inputs, draft))
        if artifacts or gptq_jobs:
            outcomes += _run_pool(spec, store, layout, artifacts, gptq_jobs, base_dir, progress)
    order = {(t.id, v.name): i for i, t in enumerate(spec.tenants) for v in spec.fused_variants(t)}
    return sorted(outcomes, key=lambda o: order.get((o.tenant, o.variant), len(order)))


def _gptq_problems(spec: JobSpec, layout: BaseLayout) -> list[str]:
    from qlora_ray.fuse.gptq import group_size_problems

    if "gptq-int4" not in spec.fuse.schemes:
        return []
    return group_size_problems(spec.fuse.gptq, {name: layout.shapes[name][-1] for name in layout.quantized})


def _plan_tenant(spec, store, tenant, layout, base_manifest, gptq_problems, tmp, progress):
    """(variants to build, each with its manifest inputs and the adapter's trained format; outcomes
    settled now: skipped or failed) for one tenant."""
    akey = adapter_key(spec.name, tenant.id)
    todo, skipped = [], []
    for variant in spec.fused_variants(tenant):
        key = fused_key(spec.name, tenant.id, variant.name)
        if store.is_complete(key):
            skipped.append(FuseOutcome(tenant.id, variant.name, "skipped", store.read_manifest(key)["metrics"]))
        else:
            todo.append(variant)
    if not todo:
        return [], skipped

    def fail(message: str, variants=todo):
        progress(f"fuse {tenant.id}: failed: {message}")
        return [FuseOutcome(tenant.id, v.name, "failed", error=message) for v in variants]

    if not store.is_complete(akey):
        return [], skipped + fail(f"no adapter at {store.url(akey)}; train it first (qlora-ray train JOB)")
    folder = tmp / "adapters" / tenant.id
    try:  # the factors' shapes are enough to check the adapter against the base
        adapter_manifest = store.read_manifest(akey)
        check_adapter_files(list(adapter_manifest["files"]), store.url(akey))
        store.fetch(akey, folder, only=[ADAPTER_CONFIG, ADAPTER_WEIGHTS])
        deltas = load_adapter_deltas(folder, device="meta")
        trained = adapter_format(tenant, adapter_manifest)
    except (AdapterError, StoreError) as exc:
        return [], skipped + fail(str(exc))
    except ValueError as exc:
        return [], skipped + fail(f"the adapter cannot be merged: {exc}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    problems = adapter_problems(layout, deltas)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return [], skipped + fail(f"the adapter does not fit base {spec.base.name}: {problems[0]}{more}")
    failed = []
    if gptq_problems and any(v.scheme == "gptq-int4" for v in todo):
        failed = fail(gptq_problems[0], [v for v in todo if v.scheme == "gptq-int4"])
        todo = [v for v in todo if v.scheme != "gptq-int4"]
    data_manifest = store.read_manifest(data_key(spec.name, tenant.id)) if store.is_complete(data_key(spec.name, tenant.id)) else None
    planned = []
    for variant in todo:
        inputs = {
            "job": spec.name, "tenant": tenant.id, "scheme": variant.scheme, "merge_base": variant.merge_base,
            "spec_sha256": spec.spec_hash(),
            "base": {"key": base_key(spec.base.name), "manifest_sha256": manifest_digest(base_manifest)},
            "adapter": {"key": akey, "manifest_sha256": manifest_digest(adapter_manifest),
                        "training_fingerprint": adapter_manifest["inputs"].get("training_fingerprint")},
        }
        if variant.merge_base == "nf4-dequantized":
            if trained is None:
                failed += fail("its adapter was trained on the 16-bit base (the adapter's manifest says so): there is "
                               "no 4-bit base to merge into; use merge_base: original", [variant])
                continue
            inputs["trained_format"] = vars(trained)
        if variant.scheme == "nf4":
            inputs["output_format"] = vars(output_format(tenant))
        if variant.scheme == "gptq-int4":
            if data_manifest is None:
                failed += fail("its training data is not in the store to calibrate GPTQ on; run train first", [variant])
                continue
            inputs["gptq"] = spec.fuse.gptq.model_dump(mode="json")
            inputs["calibration"] = {"key": data_key(spec.name, tenant.id),
                                     "train_sha256": data_manifest["inputs"].get("train_sha256")}
        planned.append((variant, inputs, trained))
    return planned, skipped + failed


def _run_pool(spec, store, layout, artifacts, gptq_jobs, base_dir, progress) -> list[FuseOutcome]:
    import ray

    from qlora_ray.train.launch import init_ray

    init_ray()
    resources = spec.fuse.resources
    targets = _shard_targets(artifacts)
    drafts = {f"{a.tenant}/{a.variant.name}": a.draft for a in artifacts}
    units = [("shard", shard_file, (targets, drafts)) for shard_file in layout.shard_files] if targets else []
    units += [("gptq", target, (inputs,)) for target, inputs in gptq_jobs]
    # max_task_retries=-1: a unit whose actor died runs again once the actor is back, however many
    # times Ray tries in between; a bounded count is spent in the instant before a dead node is
    # known dead. The restarts bound it: past them the actor is gone and its unit fails.
    actor_class = ray.remote(FuseWorker).options(
        num_cpus=resources.num_cpus, num_gpus=resources.num_gpus, resources=dict(resources.custom),
        max_restarts=MAX_RESTARTS, max_task_retries=-1,
    )
    workers = [actor_class.remote(spec, layout.quantized, int(resources.num_cpus))
               for _ in range(min(spec.fuse.workers, len(units)))]
    progress(f"fusing on {len(workers)} worker(s): {len(layout.shard_files)} base shard(s) x {len(artifacts)} "
             f"bf16/nf4 artifact(s), then {len(gptq_jobs)} GPTQ quantization(s)")
    started = time.monotonic()
    outcomes: list[FuseOutcome] = []
    by_key = {(a.tenant, a.variant.name): a for a in artifacts}
    shards_done = 0

    def settle(unit, result: dict | None, error: str | None) -> None:
        nonlocal shards_done
        elapsed = time.monotonic() - started
        if unit[0] == "shard":
            shards_done += 1
            for target in unit[2][0]:
                for scheme in target.schemes:
                    artifact = by_key[(target.tenant, FusedVariant(scheme, target.merge_base).name)]
                    if error:
                        artifact.error = artifact.error or f"shard {unit[1]}: {error}"
                    else:
                        artifact.parts[unit[1]] = result["parts"][f"{artifact.tenant}/{artifact.variant.name}"] | {
                            k: v for k, v in result.items() if k.startswith("worker_")}
            progress(f"fuse: shard {shards_done}/{len(layout.shard_files)} {unit[1]} "
                     + (f"FAILED: {error}" if error else
                        f"done for {len(result['parts'])} artifact(s) in {result['seconds']:.1f} s") + f" [{elapsed:.0f} s]")
        else:
            target = unit[1]
            variant = FusedVariant("gptq-int4", target.merge_base).name
            if error:  # the worker's publish removed its own version; nothing else is touched
                outcomes.append(FuseOutcome(target.tenant, variant, "failed", error=error))
                progress(f"fuse {target.tenant} {variant}: FAILED: {error}")
            else:
                outcomes.append(FuseOutcome(target.tenant, variant, "done", result["metrics"]))
                progress(f"fuse {target.tenant} {variant}: done in {result['metrics']['seconds']:.0f} s [{elapsed:.0f} s]")

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
            kind, subject, extra = units[index]
            call = worker.fuse_shard if kind == "shard" else worker.fuse_gptq
            running[call.remote(subject, *extra)] = (worker, index)
        if not running:  # every worker is gone for good
            for index in pending:
                settle(units[index], None, f"no fuse worker left: each died {MAX_RESTARTS + 1} times")
            break
        ready, _ = ray.wait(list(running), num_returns=1)
        worker, index = running.pop(ready[0])
        try:
            result, error = ray.get(ready[0]), None
        except ray.exceptions.RayError as exc:
            result, error = None, _error_text(exc)
            if isinstance(exc, ray.exceptions.ActorDiedError):
                workers_left = len(idle) + len(running)
                progress(f"fuse: a worker died past its {MAX_RESTARTS} restarts; {workers_left} left")
                settle(units[index], None, error)
                continue
            attempts[index] += 1
            # A flaky store is worth another try; a damaged file fails every time, hence the bound.
            if isinstance(getattr(exc, "cause", None), StoreError) and attempts[index] < STORE_ATTEMPTS:
                progress(f"fuse: {_unit_name(units[index])}: {error}; trying again ({attempts[index]}/{STORE_ATTEMPTS})")
                idle.append(worker)
                pending.append(index)
                continue
        idle.append(worker)
        settle(units[index], result, error)
    for worker in workers:
        try:
            ray.get(worker.close.remote())
        except ray.exceptions.RayError:
            pass  # a worker that died has no cache left to clear on this node
        ray.kill(worker)
    for artifact in artifacts:
        outcomes.append(_seal(spec, store, layout, artifact, base_dir))
    return outcomes


def _unit_name(unit) -> str:
    kind, subject, _ = unit
    return f"shard {subject}" if kind == "shard" else f"{subject.tenant} {FusedVariant('gptq-int4', subject.merge_base).name}"


def _shard_targets(artifacts: list[_Artifact]) -> list[ShardTarget]:
    """One target per tenant and merge base, with every shard-wise scheme it wants."""
    grouped: dict[tuple[str, str], ShardTarget] = {}
    for artifact in artifacts:
        key = (artifact.tenant, artifact.variant.merge_base)
        target = grouped.get(key)
        schemes = (target.schemes if target else ()) + (artifact.variant.scheme,)
        grouped[key] = ShardTarget(artifact.tenant, artifact.variant.merge_base, schemes,
                                   artifact.target.trained_format, artifact.target.output_format)
    return list(grouped.values())


def _seal(spec: JobSpec, store: Store, layout: BaseLayout, artifact: _Artifact, base_dir: Path) -> FuseOutcome:
    name = artifact.variant.name
    missing = [f for f in layout.shard_files if f not in artifact.parts]
    if artifact.error or missing:
        store.abandon(artifact.draft)
        return FuseOutcome(artifact.tenant, name, "failed", error=artifact.error or f"shards missing: {missing}")
    try:
        with scratch_dir("fuse-seal") as folder:
            _write_model_files(base_dir, folder, artifact)
            files = {rel: store.put_part(artifact.draft, rel, folder / rel) for rel in sorted(p.name for p in folder.iterdir())}
        files.update({shard: {"sha256": part["sha256"], "size": part["size"]} for shard, part in artifact.parts.items()})
        parts = artifact.parts.values()
        metrics = {
            "seconds": round(sum(p["seconds"] for p in parts), 2),
            "size_bytes": sum(f["size"] for f in files.values()),
            "shards": len(artifact.parts),
            **{k: max(p.get(k, 0) for p in parts) for k in ("worker_peak_rss_bytes", "worker_peak_gpu_bytes")
               if any(k in p for p in parts)},
            "worker_node_ids": sorted({p["worker_node_id"] for p in parts}),
        }
        manifest = store.seal(artifact.draft, files, kind="fused", inputs=artifact.inputs, metrics=metrics)
    except AlreadyPublished:  # sealed by another run of this job first; this run's version is gone
        return _published_meanwhile(store, spec, artifact.tenant, name)
    except StoreError as exc:
        store.abandon(artifact.draft)
        return FuseOutcome(artifact.tenant, name, "failed", error=str(exc))
    return FuseOutcome(artifact.tenant, name, "done", manifest["metrics"])


def _published_meanwhile(store: Store, spec: JobSpec, tenant: str, variant: str,
                         progress: Callable[[str], None] | None = None) -> FuseOutcome:
    """The outcome of a variant another run published while this one planned or built it: kept."""
    key = fused_key(spec.name, tenant, variant)
    if progress:
        progress(f"fuse {tenant} {variant}: published meanwhile by another run; kept")
    return FuseOutcome(tenant, variant, "skipped", store.read_manifest(key)["metrics"])


def _write_model_files(base_dir: Path, folder: Path, artifact: _Artifact) -> None:
    """The small files of a fused HF folder: the base's tokenizer and configs, config.json with the
    scheme's quantization_config, and the index of the fused shards."""
    for path in base_dir.iterdir():
        if path.is_file() and path.name not in ("config.json", INDEX_NAME):
            shutil.copy2(path, folder / path.name)
    config = json.loads((base_dir / "config.json").read_text())
    if artifact.variant.scheme == "nf4":
        config["quantization_config"] = artifact.target.output_format.quantization_config()
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    weight_map = {name: shard for shard, part in sorted(artifact.parts.items()) for name in part["tensors"]}
    total = sum(part["tensor_bytes"] for part in artifact.parts.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))


def _error_text(exc: Exception) -> str:
    import ray

    if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None:
        cause = exc.cause
        return str(cause) if isinstance(cause, UserError) else f"{type(cause).__name__}: {cause}"[:2000]
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


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
