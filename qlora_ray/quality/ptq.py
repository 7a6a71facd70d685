"""The naive-PTQ base: the job's base quantized with GPTQ on its own, no adapter merged.

Naive post-training quantization serves a quantized base with each tenant's 16-bit adapter on
top; the eval stage shows it beside merge-then-quantize. One GPTQ base serves every tenant of the
job, so it is calibrated on rows drawn in turn from every tenant's training data (as many rows in
all as a fused GPTQ model is calibrated on).
"""

from __future__ import annotations

import shutil

from qlora_ray.fuse.gptq import calibration_texts, gptq_quantize
from qlora_ray.local_disk import scratch_dir
from qlora_ray.manifest import manifest_digest
from qlora_ray.staged_data import TRAIN_FILE, fetch_rows
from qlora_ray.store import Store, base_key, data_key, ptq_key
from qlora_ray.work_orders import GptqOrder


def ptq_inputs(order: GptqOrder, store: Store, tenant_ids: list[str]) -> dict:
    """What the GPTQ base depends on: the base, the GPTQ settings and the calibration data."""
    return {
        "base": {"key": base_key(order.base), "manifest_sha256": manifest_digest(store.read_manifest(base_key(order.base)))},
        "gptq": order.gptq.model_dump(mode="json"),
        "calibration": {tenant: store.read_manifest(data_key(order.job, tenant))["inputs"]["train_sha256"]
                        for tenant in sorted(tenant_ids)},
    }


def interleaved(per_tenant: list[list[str]], count: int) -> list[str]:
    """Up to `count` texts taken in turn from each tenant's list (each already in a seeded order)."""
    chosen = []
    for depth in range(max((len(texts) for texts in per_tenant), default=0)):
        for texts in per_tenant:
            if depth < len(texts) and len(chosen) < count:
                chosen.append(texts[depth])
    return chosen


def build_gptq_base(order: GptqOrder, tenant_ids: list[str], *, device: str) -> dict:
    """Quantize the base with GPTQ, calibrated on the tenants' training rows, and publish it at
    runs/<job>/ptq/gptq-int4 (skipped when it is there for the same inputs). Returns its manifest."""
    from transformers import AutoTokenizer

    store = order.store.open()
    key = ptq_key(order.job, "gptq-int4")
    inputs = ptq_inputs(order, store, tenant_ids)
    if store.is_complete(key):
        manifest = store.read_manifest(key)
        if manifest["inputs"] == inputs:
            return manifest
        store.delete(key)
    with scratch_dir("ptq") as work, store.local_copy(base_key(order.base)) as base_dir:
        tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
        per_tenant = []
        for tenant in sorted(tenant_ids):
            rows = fetch_rows(store, order.job, tenant, TRAIN_FILE, work / "data" / tenant)
            per_tenant.append(calibration_texts(rows, tokenizer, order.gptq.calibration_samples))
        texts = interleaved(per_tenant, order.gptq.calibration_samples)
        # GPTQModel writes its logs beside the folder it quantizes: a scratch copy keeps them out of a
        # folder store's base.
        source = work / "source"
        shutil.copytree(base_dir, source, ignore=shutil.ignore_patterns("manifest.json", "_SUCCESS"))
        metrics = gptq_quantize(source, work / "out", texts, order.gptq, device=device)
        metrics["size_bytes"] = sum(p.stat().st_size for p in (work / "out").rglob("*") if p.is_file())
        return store.publish(key, work / "out", kind="ptq", inputs=inputs, metrics=metrics, keep_existing=True)
