"""End to end on the real model: the demo job's tenants train on SmolLM2 on the CPU, learn, fuse,
and are evaluated.

Slow (20 to 30 minutes on 2 cores): every demo tenant is fine-tuned through the Ray train stage,
the fuse stage makes the demo's fused models (bf16, nf4, gptq-int4), and the eval stage scores
every configuration on each tenant's held-out eval split; the adapters must beat the base by a
wide margin, the fused models must carry them, the gate's verdicts must be in the manifests, and
one row of the report is recomputed by hand.

Where the README's first command has just run the demo (CI sets QLORA_RAY_DEMO_STORE to its store),
the stages run on that store: finding every artifact complete, they skip the work (what a rerun
does), and the checks apply to what the demo made instead of training it all a second time.
"""

from __future__ import annotations

import json
import os

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from qlora_ray.data import read_rows
from qlora_ray.quality.gate import judge
from qlora_ray.quality.verdicts import read_verdicts
from qlora_ray.spec import load_spec
from qlora_ray.store import Store, adapter_key, fused_key
from tests.conftest import REPO
from tests.reference_scoring import answer_perplexity, exact_match

# The demo fuses under the default merge base, auto: gptq-int4 into the NF4-dequantized base.
GPTQ_VARIANT = "gptq-int4.nf4-dequantized"


@pytest.mark.slow
def test_demo_tenants_learn_their_tasks(smollm2_store, tmp_path):
    import ray

    from qlora_ray.fuse.launch import fuse_job
    from qlora_ray.quality.launch import eval_job
    from qlora_ray.train.launch import train_job

    demo = load_spec(REPO / "jobs" / "demo.yaml")
    store = Store(os.environ["QLORA_RAY_DEMO_STORE"]) if os.environ.get("QLORA_RAY_DEMO_STORE") else smollm2_store
    spec = demo.model_copy(update={"store": store.uri})
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a stray cluster
    try:
        outcomes = train_job(spec, progress=print)
        assert {o.state for o in outcomes} <= {"done", "skipped"}, [o.error for o in outcomes]  # skipped: the demo's
        fused = fuse_job(spec, progress=print)
        assert {o.state for o in fused} <= {"done", "skipped"}, [o.error for o in fused if o.error]
        report = eval_job(spec, progress=print)
    finally:
        ray.shutdown()
    assert not report["failed"] and not report["skipped"]

    gains = {}
    for tenant in spec.tenants:
        manifest = store.read_manifest(adapter_key(spec.name, tenant.id))
        assert manifest["metrics"]["final_loss"] < manifest["metrics"]["first_loss"]
        tenant_report = report["tenants"][tenant.id]
        rows = {row["name"]: row for row in tenant_report["rows"]}
        before, after = rows["base"]["accuracy"], rows["unmerged"]["accuracy"]
        gains[tenant.id] = (before, after)
        print(f"{tenant.id}: base {before:.0%} -> adapter {after:.0%}")
        for variant in spec.fused_variants(tenant):
            row = rows[variant.name]
            print(f"{tenant.id} {variant.name}: {row['accuracy']:.0%} exact match, perplexity {row['perplexity']:.4f}")
            if variant.scheme == "bf16":  # merged only: the adapter's answers, up to bf16 rounding
                assert row["accuracy"] >= 0.9 * after, (tenant.id, variant.name, row)
            else:
                # 4-bit carries the adapter (a model fused from the wrong or no adapter scores at the
                # base's level), but how much of its accuracy survives varies from one trained adapter
                # to the next (GPTQ on 32 calibration rows kept 90% on one sql adapter, 38% on
                # another, and 18% of a units adapter's 52%). The gate decides what ships; this test
                # checks that some of the adapter's gain is there, and that the gate decided.
                assert row["accuracy"] > before + 0.25 * (after - before), (tenant.id, variant.name, row)
            fused = store.read_manifest(fused_key(spec.name, tenant.id, variant.name))
            quality = read_verdicts(store, spec.name).of(tenant.id, variant.name, fused)
            assert quality["passed"] == judge(row, rows["unmerged"], spec.quality_gate).passed
        assert "bitsandbytes.Linear4bit" in rows["unmerged.nf4-base"]["module_types"]
        assert any(name.startswith("gptqmodel.") for name in rows[GPTQ_VARIANT]["module_types"])
        assert "peft.GPTQLoraLinear" in rows["ptq.gptq-int4"]["module_types"]
    wide_margins = [t for t, (before, after) in gains.items() if after - before >= 0.50]
    assert len(wide_margins) >= 3, gains

    # one row by hand: the fused gptq-int4 model of dates, loaded by plain transformers
    folder = tmp_path / "dates-gptq"
    store.fetch(fused_key(spec.name, "dates", GPTQ_VARIANT), folder)
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    rows = read_rows(spec.tenant("dates").eval_data).rows
    accuracy = exact_match(model, tokenizer, rows, "exact", batch_size=spec.eval.batch_size)
    perplexity = answer_perplexity(model, tokenizer, rows, batch_size=spec.eval.batch_size)
    row = next(r for r in report["tenants"]["dates"]["rows"] if r["name"] == GPTQ_VARIANT)
    assert row["answer_tokens"] == perplexity.tokens
    # One greedy answer may flip between the stage's and this pass's matmul shapes (below): in the CI
    # run of 43159bf, dates' row 21 ("2008-01-03") had its last digit's top two logits one bf16 step
    # apart (43.0 against 42.75), and the stage answered "2008-01-30".
    assert abs(row["correct"] - accuracy.correct) <= 1, (row["correct"], accuracy.correct)
    # the stage runs each prompt once for both measures (quality/scoring.score): other matmul shapes, so
    # 4-bit kernels computing in bf16 round a little differently: 6e-4 measured for nf4 and 1.4e-3 for
    # gptq-int4 on SmolLM2 (CI, 2026-11-23)
    assert row["perplexity"] == pytest.approx(perplexity.value, rel=5e-3)
    print(json.dumps({t: r["verdicts"] for t, r in report["tenants"].items()}, indent=1))
