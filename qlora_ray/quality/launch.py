"""The eval stage on Ray: every tenant's configurations scored, the quality gate applied, the report.

The driver:
1. builds the naive-PTQ GPTQ base once (a Ray task), when the job fuses gptq-int4;
2. runs one Ray task per tenant with eval rows and an adapter (quality/tenant.py); each publishes
   its measurements, and a rerun skips tenants whose inputs did not change;
3. applies the job's quality gate to every fused artifact, against the adapter unmerged on the
   16-bit base, and publishes the verdicts (verdicts.py): serve refuses an artifact that failed, and
   serves each scheme's better merge base as `<tenant>/<scheme>`;
4. publishes the report (JSON, Markdown, PNG) at runs/<job>/eval/report and returns it.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Callable

from qlora_ray.cluster import as_completed, error_text, init_ray, refuse_process_local_store, task_options
from qlora_ray.hardware import preferred_device
from qlora_ray.library_output import route_library_output, say
from qlora_ray.local_disk import scratch_dir
from qlora_ray.manifest import manifest_digest
from qlora_ray.quality.configs import reference_name
from qlora_ray.quality.gate import default_variants, judge
from qlora_ray.quality.report import write_report
from qlora_ray.quality.tenant import RESULTS_FILE
from qlora_ray.quality.verdicts import publish_verdicts
from qlora_ray.spec import JobSpec
from qlora_ray.store import Store, adapter_key, data_key, eval_key, eval_report_key
from qlora_ray.work_orders import EvalOrder, GptqOrder

# A task whose worker or node died runs again this many times (the store keeps what was finished).
MAX_RETRIES = 3


def _ptq_task(order: GptqOrder, tenant_ids: list[str]) -> dict:
    from qlora_ray.quality.ptq import build_gptq_base

    route_library_output(worker=True)
    return build_gptq_base(order, tenant_ids, device=preferred_device())


def _eval_task(order: EvalOrder) -> dict:
    import ray

    from qlora_ray.quality.tenant import evaluate_tenant

    route_library_output(worker=True)
    return evaluate_tenant(order, device=preferred_device(), progress=say,
                           node_id=ray.get_runtime_context().get_node_id())


def eval_job(spec: JobSpec, *, progress: Callable[[str], None] = print) -> dict:
    """Evaluate every tenant that has eval rows and a trained adapter, gate the fused artifacts,
    publish and return the report. Tenants that could not be evaluated are listed in it."""
    import ray

    store = Store(spec.store, spec.storage_options)
    refuse_process_local_store(store, spec.store, "the eval stage")
    skipped: dict[str, str] = {}
    ready = []
    for tenant in spec.tenants:
        if not tenant.eval_data:
            skipped[tenant.id] = "no eval_data in the job file: nothing to evaluate its fused models on"
        elif not store.is_complete(adapter_key(spec.name, tenant.id)) or not store.is_complete(data_key(spec.name, tenant.id)):
            skipped[tenant.id] = "no trained adapter yet (qlora-ray train JOB)"
        elif store.read_manifest(data_key(spec.name, tenant.id))["inputs"].get("eval_sha256") is None:
            skipped[tenant.id] = ("its eval rows were not staged with its training data; `qlora-ray train JOB` "
                                  "stages them (a trained adapter is not trained again)")
        else:
            ready.append(tenant.id)
    for tenant_id, why in skipped.items():
        progress(f"eval {tenant_id}: skipped: {why}")
    failed: dict[str, str] = {}
    if ready:
        init_ray()
        resources = spec.eval.resources
        if "gptq-int4" in spec.fuse.schemes:
            progress(f"eval: quantizing the base with GPTQ alone (the naive-PTQ row), calibrated on {len(ready)} tenant(s)' rows")
            started = time.monotonic()
            try:
                ray.get(ray.remote(max_calls=1)(_ptq_task).options(
                    **task_options(resources, name="eval:ptq", max_retries=MAX_RETRIES)).remote(GptqOrder.of(spec), ready))
                progress(f"eval: GPTQ base ready ({time.monotonic() - started:.0f} s)")
            except ray.exceptions.RayError as exc:
                progress(f"eval: the GPTQ base failed, so no naive-PTQ row: {error_text(exc)}")
        remote = ray.remote(max_calls=1)(_eval_task)
        refs = {remote.options(**task_options(resources, name=f"eval:{t}", max_retries=MAX_RETRIES)).remote(EvalOrder.of(spec, t)): t
                for t in ready}
        progress(f"evaluating {len(refs)} tenant(s) on Ray: {', '.join(refs.values())}")
        for tenant_id, ref in as_completed(refs):
            try:
                ray.get(ref)
                progress(f"eval {tenant_id}: done")
            except ray.exceptions.RayError as exc:
                failed[tenant_id] = error_text(exc)
                progress(f"eval {tenant_id}: FAILED: {failed[tenant_id]}")
    report = build_report(spec, store, [t for t in ready if t not in failed])
    report["skipped"], report["failed"] = skipped, failed
    publish_verdicts(store, spec.name, report)
    publish_report(store, spec, report)
    return report


def build_report(spec: JobSpec, store: Store, tenant_ids: list[str]) -> dict:
    """The report over the tenants' published results, with the gate applied to every fused row."""
    tenants = {}
    for tenant_id in tenant_ids:
        tenant = spec.tenant(tenant_id)
        key = eval_key(spec.name, tenant_id)
        results = store.read_json(key, RESULTS_FILE)
        rows = [{k: v for k, v in row.items() if k != "answers"} for row in results["rows"]]
        by_name = {row["name"]: row for row in rows}
        reference = by_name.get(reference_name(spec, rows))
        variants = [v for v in spec.fused_variants(tenant) if v.name in by_name]
        verdicts = {v.name: judge(by_name[v.name], reference, spec.quality_gate) for v in variants} if reference else {}
        tenants[tenant_id] = {
            "scorer": tenant.scorer, "device": results["device"], "eval_rows": rows[0]["total"] if rows else 0,
            "reference": reference_name(spec, rows), "rows": rows, "missing": results["missing"],
            "verdicts": {name: verdict.to_dict() for name, verdict in verdicts.items()},
            "defaults": default_variants(variants, by_name, verdicts) if reference else {},
            "merge_bases": max(Counter(v.scheme for v in variants).values(), default=0),  # of one scheme, at most
            "results": {"key": key, "manifest_sha256": manifest_digest(store.read_manifest(key))},
        }
    return {"job": spec.name, "quality_gate": spec.quality_gate.model_dump(mode="json"),
            "batch_size": spec.eval.batch_size, "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "tenants": tenants}


def publish_report(store: Store, spec: JobSpec, report: dict) -> None:
    """Replace the job's report with this one (a report describes the store as it is now)."""
    key = eval_report_key(spec.name)
    with scratch_dir("report") as tmp:
        write_report(report, tmp)
        store.replace(key, tmp, kind="eval-report", inputs={
            "tenants": {t: r["results"] for t, r in report["tenants"].items()}, "quality_gate": report["quality_gate"]})
