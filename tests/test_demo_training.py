"""End to end on the real model: the demo job's tenants train on SmolLM2 on the CPU, learn, and fuse.

Slow (about 14 minutes on 2 cores): every demo tenant is fine-tuned through the Ray train stage,
then each adapter's exact-match accuracy on its held-out eval split is compared with the base's;
then the fuse stage makes the demo's fused models (bf16, nf4, gptq-int4), and each one, loaded by
plain transformers, answers the eval prompts like its adapter.
"""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

from qlora_ray.data import read_rows
from qlora_ray.evaluation import exact_match, load_model
from qlora_ray.spec import load_spec
from qlora_ray.store import adapter_key, fused_key
from tests.conftest import REPO


@pytest.mark.slow
def test_demo_tenants_learn_their_tasks(smollm2_store, tmp_path):
    import ray

    from qlora_ray.train.launch import train_job

    demo = load_spec(REPO / "jobs" / "demo.yaml")
    spec = demo.model_copy(update={"store": smollm2_store.uri})
    from qlora_ray.fuse.launch import fuse_job

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a stray cluster
    try:
        outcomes = train_job(spec, progress=print)
        assert [o.state for o in outcomes] == ["done"] * len(spec.tenants), [o.error for o in outcomes]
        fused = fuse_job(spec, progress=print)
    finally:
        ray.shutdown()
    assert {o.state for o in fused} == {"done"}, [o.error for o in fused if o.error]

    base_dir = tmp_path / "base"
    smollm2_store.fetch("bases/smollm2-135m", base_dir)
    base_model, tokenizer = load_model(base_dir)
    gains, fused_scores = {}, {}
    for tenant in spec.tenants:
        rows = read_rows(tenant.eval_data).rows
        adapter_dir = tmp_path / tenant.id
        manifest = smollm2_store.fetch(adapter_key(spec.name, tenant.id), adapter_dir)
        assert manifest["metrics"]["final_loss"] < manifest["metrics"]["first_loss"]
        tuned, _ = load_model(base_dir, adapter_dir)
        before = exact_match(base_model, tokenizer, rows, tenant.scorer).value
        reference = exact_match(tuned, tokenizer, rows, tenant.scorer)
        after = reference.value
        gains[tenant.id] = (before, after)
        print(f"{tenant.id}: base {before:.0%} -> adapter {after:.0%}")
        for variant in spec.fused_variants(tenant):
            folder = tmp_path / f"{tenant.id}-{variant.name}"
            smollm2_store.fetch(fused_key(spec.name, tenant.id, variant.name), folder)
            model = AutoModelForCausalLM.from_pretrained(str(folder))  # no peft, no qlora_ray: the folder alone
            model.eval()
            result = exact_match(model, tokenizer, rows, tenant.scorer)
            agree = sum(a == b for a, b in zip(result.answers, reference.answers)) / len(rows)
            fused_scores[(tenant.id, variant.name)] = (result.value, agree)
            print(f"{tenant.id} {variant.name}: {result.value:.0%} exact match, {agree:.0%} of answers as the adapter's")
    wide_margins = [t for t, (before, after) in gains.items() if after - before >= 0.50]
    assert len(wide_margins) >= 3, gains
    for (tenant_id, variant), (accuracy, agree) in fused_scores.items():
        adapter_accuracy = gains[tenant_id][1]
        if variant.startswith("bf16."):  # merged only: the adapter's answers, up to bf16 rounding
            assert agree >= 0.9 and accuracy >= 0.9 * adapter_accuracy, (tenant_id, variant, fused_scores)
        else:
            # 4-bit carries the adapter (a model fused from the wrong or no adapter scores at the base's
            # level), but how much of its accuracy survives varies from one trained adapter to the next:
            # GPTQ with 32 calibration rows scored 90% on one sql adapter whose bf16 merge scored 80%, and
            # 38% on another whose adapter scored 78% (both measured 2026-11-23). Measuring
            # and gating that loss is the eval stage's job (quality_gate), not this test's.
            assert accuracy > gains[tenant_id][0] + 0.2, (tenant_id, variant, fused_scores)
