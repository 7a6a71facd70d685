"""One tenant's evaluation against the store: every configuration scored on its held-out rows.

Runs inside a Ray task (launch.py) but needs no Ray itself. The result is an artifact,
runs/<job>/eval/tenants/<tenant>/results.json, whose manifest names every input by its manifest's
digest: a rerun skips a tenant whose inputs did not change, and evaluates it again when one did.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Callable

from qlora_ray.errors import StoreError
from qlora_ray.fuse.quant import FourBit, trained_format
from qlora_ray.local_disk import scratch_dir
from qlora_ray.manifest import manifest_digest
from qlora_ray.quality.configs import GPTQ_MARLIN_PRECISION, EvalConfig, configurations, load_config, resident_bytes
from qlora_ray.quality.scoring import score
from qlora_ray.spec import TenantSpec
from qlora_ray.staged_data import EVAL_FILE, fetch_rows
from qlora_ray.store import Store, adapter_key, base_key, data_key, eval_key, fused_key, ptq_key
from qlora_ray.work_orders import EvalOrder

RESULTS_FILE = "results.json"


def config_sources(order: EvalOrder, config: EvalConfig) -> dict[str, str]:
    """The store keys a configuration loads: {"base", "adapter", "model"} as it needs them."""
    sources = {}
    if config.kind in ("base", "unmerged", "unmerged-4bit"):
        sources["base"] = base_key(order.base)
    if config.has_adapter:
        sources["adapter"] = adapter_key(order.job, order.tenant.id)
    if config.kind == "fused":
        sources["model"] = fused_key(order.job, order.tenant.id, config.variant.name)
    if config.kind == "ptq":
        sources["model"] = ptq_key(order.job, "gptq-int4")
    return sources


def adapter_trained_format(order: EvalOrder, store: Store) -> FourBit | None:
    """The 4-bit format the tenant's adapter was trained against, as its manifest records it (the job
    file's settings while there is no adapter yet: its configurations are missing then anyway)."""
    tenant = order.tenant
    key = adapter_key(order.job, tenant.id)
    manifest = store.read_manifest(key) if store.is_complete(key) else {}
    try:
        return trained_format(manifest, tenant.training.quantization, tenant.training.double_quant)
    except ValueError as exc:
        raise StoreError(f"{store.url(key)}: {exc}") from None


def eval_inputs(order: EvalOrder, store: Store, trained: FourBit | None) -> tuple[dict, list[str], dict[str, int]]:
    """(the evaluation's inputs: each source's manifest digest and the eval rows' checksum; the
    configurations left out because an artifact is missing, each with why; each source's bytes on
    disk, from the same manifest reads)."""
    digests, missing, sizes = {}, [], {}
    for config in configurations(order.fused_variants, order.naive_ptq, trained):
        sources = config_sources(order, config)
        absent = [key for key in sources.values() if not store.is_complete(key)]
        if absent:
            missing.append(f"{config.name}: no complete artifact at {store.url(absent[0])}")
            continue
        for key in sources.values():
            if key not in digests:
                manifest = store.read_manifest(key)
                digests[key] = manifest_digest(manifest)
                sizes[key] = sum(f["size"] for f in manifest["files"].values())
    tenant = order.tenant
    data = store.read_manifest(data_key(order.job, tenant.id))
    inputs = {"tenant": tenant.id, "scorer": tenant.scorer, "eval_sha256": data["inputs"]["eval_sha256"],
              "batch_size": order.batch_size, "artifacts": dict(sorted(digests.items()))}
    return inputs, missing, sizes


def evaluate_tenant(order: EvalOrder, *, device: str, progress: Callable[[str], None] = print,
                    node_id: str | None = None) -> dict:
    """Score every configuration of one tenant whose artifacts are complete, and publish the
    results. Returns the results artifact's manifest (skips the work when it is already there for
    the same inputs). node_id, the Ray node it runs on, goes into the manifest's metrics."""
    tenant, tenant_id = order.tenant, order.tenant.id
    store = order.store.open()
    key = eval_key(order.job, tenant_id)
    trained = adapter_trained_format(order, store)
    inputs, missing, sizes = eval_inputs(order, store, trained)
    if store.is_complete(key):
        manifest = store.read_manifest(key)
        if manifest["inputs"] == inputs:
            return manifest
        store.delete(key)  # an artifact it measured changed (fused again, retrained)
    # the configurations whose every artifact is complete (eval_inputs lists the others as missing)
    configs = [config for config in configurations(order.fused_variants, order.naive_ptq, trained)
               if all(source in inputs["artifacts"] for source in config_sources(order, config).values())]
    if device == "cuda" and any(config.loads_gptq for config in configs):
        from qlora_ray import marlin

        # GPTQModel would compile its own Marlin extension inside the first GPTQ row (minutes, once per
        # machine); the cluster's shared build registers the same ops, which GPTQModel then uses.
        marlin.prepare(store, share=order.share_compiled_kernels, precision=GPTQ_MARLIN_PRECISION)
    with scratch_dir("eval") as work:
        rows = fetch_rows(store, order.job, tenant_id, EVAL_FILE, work / "data")
        measured = []
        for config in configs:
            sources = config_sources(order, config)
            with contextlib.ExitStack() as copies:
                paths = {role: copies.enter_context(store.local_copy(source)) for role, source in sources.items()}
                measured.append(measure(config, tenant, rows, paths, device=device, batch_size=order.batch_size,
                                        sizes={role: sizes[k] for role, k in sources.items()},
                                        sources={role: {"key": k, "manifest_sha256": inputs["artifacts"][k]}
                                                 for role, k in sources.items()}))
            row = measured[-1]
            if config.kind == "fused" and config.variant.scheme == "gptq-int4":
                row["description"] += gptq_method(store.read_manifest(sources["model"])["inputs"].get("gptq") or {})
            progress(f"eval {tenant_id}: {config.name}: accuracy {row['accuracy']:.1%}, perplexity "
                     f"{row['perplexity']:.4f}, {row['tokens_per_second']:.1f} tok/s ({row['seconds']:.0f} s)")
        results = {"tenant": tenant_id, "device": device, "rows": measured, "missing": missing}
        out = work / "out"
        out.mkdir()
        (out / RESULTS_FILE).write_text(json.dumps(results, indent=2))
        metrics = {"configurations": len(measured), "missing": len(missing), "eval_rows": len(rows), "node_id": node_id}
        return store.publish(key, out, kind="eval", inputs=inputs, metrics=metrics, keep_existing=True)


def gptq_method(settings: dict) -> str:
    """How a gptq-int4 artifact was quantized, by its manifest's settings, for its row's description."""
    if settings.get("mode") == "bulk":
        if settings.get("hessian") == "per-tenant":
            return "; bulk GPTQ, each layer against its Hessian from its own calibration rows through its merged model"
        return "; bulk GPTQ against the merge base's Hessians from every tenant's rows pooled"
    return "; GPTQModel on the merged model, per tenant"


def measure(config: EvalConfig, tenant: TenantSpec, rows: list[dict], paths: dict[str, Path], *, device: str,
            batch_size: int, sizes: dict[str, int], sources: dict[str, dict]) -> dict:
    """One configuration's row: accuracy, perplexity, generation speed, memory, size on disk, and
    what was loaded (the sources' digests and the linear module types)."""
    started = time.perf_counter()
    loaded = load_config(config, paths, device)
    load_seconds = time.perf_counter() - started
    accuracy, perplexity = score(loaded.model, loaded.tokenizer, rows, tenant.scorer, batch_size=batch_size)
    row = {
        "name": config.name, "kind": config.kind, "description": config.description,
        "accuracy": accuracy.value, "correct": accuracy.correct, "total": accuracy.total,
        "perplexity": perplexity.value, "answer_tokens": perplexity.tokens, "nll_sum": perplexity.nll_sum,
        "generated_tokens": accuracy.generated_tokens, "generate_seconds": round(accuracy.seconds, 3),
        "tokens_per_second": round(accuracy.tokens_per_second, 2),
        "load_seconds": round(load_seconds, 2), "seconds": round(time.perf_counter() - started, 2),
        "resident_bytes": resident_bytes(loaded.model),
        # what a deployment of it stores: the base a 4-bit-at-load config quantizes counts in full
        "size_bytes": sum(sizes.values()),
        "module_types": loaded.module_types, "sources": sources, "answers": accuracy.answers,
    }
    return row
