"""End to end on the real model: the demo job's tenants train on SmolLM2 on the CPU and learn.

Slow (about 7 minutes on 2 cores): every demo tenant is fine-tuned through the Ray train stage,
then each adapter's exact-match accuracy on its held-out eval split is compared with the base's.
"""

from __future__ import annotations

import pytest

from qlora_ray.data import read_rows
from qlora_ray.evaluation import exact_match, load_model
from qlora_ray.spec import load_spec
from qlora_ray.store import adapter_key
from tests.conftest import REPO


@pytest.mark.slow
def test_demo_tenants_learn_their_tasks(smollm2_store, tmp_path):
    import ray

    from qlora_ray.train.launch import train_job

    demo = load_spec(REPO / "jobs" / "demo.yaml")
    spec = demo.model_copy(update={"store": smollm2_store.uri})
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a stray cluster
    try:
        outcomes = train_job(spec, progress=print)
    finally:
        ray.shutdown()
    assert [o.state for o in outcomes] == ["done"] * len(spec.tenants), [o.error for o in outcomes]

    base_dir = tmp_path / "base"
    smollm2_store.fetch("bases/smollm2-135m", base_dir)
    base_model, tokenizer = load_model(base_dir)
    gains = {}
    for tenant in spec.tenants:
        rows = read_rows(tenant.eval_data).rows
        adapter_dir = tmp_path / tenant.id
        manifest = smollm2_store.fetch(adapter_key(spec.name, tenant.id), adapter_dir)
        assert manifest["metrics"]["final_loss"] < manifest["metrics"]["first_loss"]
        tuned, _ = load_model(base_dir, adapter_dir)
        before = exact_match(base_model, tokenizer, rows, tenant.scorer).value
        after = exact_match(tuned, tokenizer, rows, tenant.scorer).value
        gains[tenant.id] = (before, after)
        print(f"{tenant.id}: base {before:.0%} -> adapter {after:.0%}")
    wide_margins = [t for t, (before, after) in gains.items() if after - before >= 0.50]
    assert len(wide_margins) >= 3, gains
