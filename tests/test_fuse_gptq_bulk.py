"""Bulk gptq-int4 end to end on the tiny base: with per-tenant Hessians, every tenant's GPTQ model
made in walks of the base, loaded by plain transformers, and equal to GPTQModel's per-tenant run
where both see the same inputs; with pooled Hessians, sets in the store read by the shard-wise pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from qlora_ray.fuse.launch import fuse_job
from qlora_ray.hardware import compute_dtype
from qlora_ray.store import Store, fused_key, hessian_key
from tests.conftest import copy_base
from tests.helpers import base_dir_of, fuse_spec, publish_adapter

GPTQ = {"group_size": 32, "calibration_samples": 16}
IDS = torch.tensor([[5, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 33, 10]])
Q_PROJ = "model.layers.0.self_attn.q_proj"


@pytest.fixture
def two_tenants(tiny_store, tmp_path):
    store = Store(str(tmp_path / "store"))
    copy_base(tiny_store, store, tmp_path)
    base_dir = base_dir_of(store, tmp_path)
    for seed, tenant in enumerate(("acme", "globex")):
        publish_adapter(store, tenant, base_dir, tmp_path, seed=seed, r=4, lora_alpha=8)
    return store, base_dir


def fetched(store: Store, tenant: str, variant: str, folder: Path) -> Path:
    store.fetch(fused_key("t", tenant, variant), folder / tenant / variant)
    return folder / tenant / variant


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    return {name: t for path in folder.glob("*.safetensors") for name, t in load_file(str(path)).items()}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def test_bulk_gptq_loads_in_transformers_and_matches_gptqmodel_where_inputs_agree(two_tenants, tmp_path, local_ray):
    store, base_dir = two_tenants
    # GPTQModel's whole-model run for acme, kept aside, then removed so that bulk mode makes it again.
    per_tenant = fuse_spec(tmp_path, store, ["acme"], schemes=["gptq-int4"], gptq={**GPTQ, "mode": "per-tenant"})
    (outcome,) = fuse_job(per_tenant, progress=lambda _: None)
    assert outcome.state == "done", outcome.error
    reference_dir = fetched(store, "acme", "gptq-int4.original", tmp_path / "per-tenant")
    reference = tensors_of(reference_dir)
    store.delete(fused_key("t", "acme", "gptq-int4.original"))

    lines = []
    bulk = fuse_spec(tmp_path, store, ["acme", "globex"], schemes=["bf16", "gptq-int4"],
                     gptq={**GPTQ, "mode": "bulk", "hessian": "per-tenant"})
    outcomes = fuse_job(bulk, progress=lines.append)
    assert [(o.tenant, o.variant, o.state) for o in outcomes] == [
        ("acme", "bf16.original", "done"), ("acme", "gptq-int4.original", "done"),
        ("globex", "bf16.original", "done"), ("globex", "gptq-int4.original", "done")], [o.error for o in outcomes]
    # Each tenant's own Hessians, in a walk of the base on each of the 2 workers: none is stored.
    assert any("2 gptq-int4 model(s) with their own Hessians in 2 walk(s)" in line for line in lines), lines
    assert not any("Hessian set" in line for line in lines)
    assert not store.is_complete(hessian_key("t", "original.acme")) and not store.is_complete(hessian_key("t", "original"))
    manifest = store.read_manifest(fused_key("t", "acme", "gptq-int4.original"))
    assert (manifest["inputs"]["gptq"]["mode"], manifest["inputs"]["gptq"]["hessian"]) == ("bulk", "per-tenant")
    assert "hessians" not in manifest["inputs"]
    assert manifest["metrics"]["shards"] == len(list(base_dir.glob("*.safetensors")))

    folder = fetched(store, "acme", "gptq-int4.original", tmp_path / "bulk")
    ours = tensors_of(folder)
    assert sorted(ours) == sorted(reference)  # the same checkpoint layout as GPTQModel's save
    assert all(ours[name].dtype == reference[name].dtype for name in ours)
    # Layer 0's q/k/v read the embeddings, which the adapter does not change: the walk's Hessian is
    # GPTQModel's own (up to summation order), so are the codes. Like GPTQModel, the walk takes each
    # site's Hessian once the sites before it are quantized, so o_proj reads attention over the same
    # quantized q/k/v (it shared 45 % of its words with GPTQModel's when the walk took a layer's
    # Hessians in one pass). Past it, float rounding that differs (summation order, the forward's
    # kernels) flips a few codes, GPTQ spreads each flip over the later columns, and the differences
    # compound layer by layer: the logits below are the comparison there. The walk computes in
    # float32; where GPTQModel computes in bf16 (a CPU with AVX512-BF16), layer 0's inputs already
    # differ by bf16's rounding of the norm: q_proj shares 92 % of its words, and o_proj, reading
    # attention over q/k/v quantized apart, 60 %: only the logits compare there.
    agree = {torch.float32: {Q_PROJ: 0.95, "model.layers.0.self_attn.o_proj": 0.9},
             torch.bfloat16: {Q_PROJ: 0.85}}[compute_dtype("cpu")]
    for weight, least in agree.items():
        same_words = (ours[f"{weight}.qweight"] == reference[f"{weight}.qweight"]).float().mean().item()
        assert same_words > least, (weight, same_words)
    scales_ratio = ours[f"{Q_PROJ}.scales"].float() / reference[f"{Q_PROJ}.scales"].float()
    torch.testing.assert_close(scales_ratio, torch.ones_like(scales_ratio), rtol=1e-3, atol=1e-3)
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["bits"], config["group_size"], config["checkpoint_format"]) == (
        "gptq", 4, 32, "gptq")

    quantized = AutoModelForCausalLM.from_pretrained(str(folder))
    assert type(quantized.model.layers[0].self_attn.q_proj).__module__.startswith("gptqmodel.")
    merged = logits(AutoModelForCausalLM.from_pretrained(str(fetched(store, "acme", "bf16.original", tmp_path / "bulk")),
                                                         dtype=torch.float32))
    base = logits(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32))
    got = logits(quantized)
    gptqmodels = logits(AutoModelForCausalLM.from_pretrained(str(reference_dir)))
    assert (got - merged).norm() < (got - base).norm()
    assert (got - merged).norm() < 1.5 * (gptqmodels - merged).norm()  # as close to the merged model as GPTQModel's

    assert {o.state for o in fuse_job(bulk, progress=lambda _: None)} == {"skipped"}  # a rerun skips what is complete


def test_pooled_hessians_per_merge_base_and_a_changed_pool_is_captured_again(two_tenants, tmp_path, local_ray):
    store, _ = two_tenants
    spec = fuse_spec(tmp_path, store, ["acme", "globex"], schemes=["gptq-int4"], merge_base="both",
                     gptq={**GPTQ, "mode": "bulk", "hessian": "pooled"})
    outcomes = fuse_job(spec, progress=lambda _: None)
    assert [o.state for o in outcomes] == ["done"] * 4, [o.error for o in outcomes]
    original = store.read_manifest(hessian_key("t", "original"))
    dequantized = store.read_manifest(hessian_key("t", "nf4-dequantized.nf4-dq"))
    assert list(original["inputs"]["calibration"]) == ["acme", "globex"]
    assert original["metrics"]["calibration_rows"] == 32  # both tenants' 16 rows
    assert dequantized["inputs"]["trained_format"] == {"quant_type": "nf4", "double_quant": True}
    # The two merge bases' Hessians differ (the NF4 round trip changes every layer's inputs past the first).
    with store.local_copy(hessian_key("t", "original")) as one, \
            store.local_copy(hessian_key("t", "nf4-dequantized.nf4-dq")) as other:
        first, second = sorted(one.glob("*.safetensors")), sorted(other.glob("*.safetensors"))
        assert [p.name for p in first] == [p.name for p in second]
        assert any(not torch.equal(load_file(str(x))[k], load_file(str(y))[k])
                   for x, y in zip(first, second) for k in load_file(str(x)))
    for tenant in ("acme", "globex"):
        codes = [tensors_of(fetched(store, tenant, f"gptq-int4.{base}", tmp_path / base))[f"{Q_PROJ}.qweight"]
                 for base in ("original", "nf4-dequantized")]
        assert not torch.equal(*codes)

    # One tenant fused again alone: its pool is now only its rows, so the set is captured anew.
    store.delete(fused_key("t", "globex", "gptq-int4.original"))
    (again,) = [o for o in fuse_job(spec, progress=lambda _: None) if o.state != "skipped"]
    assert (again.tenant, again.variant, again.state) == ("globex", "gptq-int4.original", "done")
    assert list(store.read_manifest(hessian_key("t", "original"))["inputs"]["calibration"]) == ["globex"]


def test_calibration_rows_that_cannot_be_read_fail_only_the_builds_that_read_them(two_tenants, tmp_path, local_ray):
    """Pooled, globex's tampered rows fail the set, so both tenants' gptq-int4; per tenant, in one walk
    for both (one worker), globex's alone."""
    from qlora_ray.store import data_key
    from tests.helpers import stored_file

    store, _ = two_tenants
    Path(stored_file(store, data_key("t", "globex"), "train.jsonl")).write_text('{"prompt": "tampered"}\n')
    pooled = fuse_spec(tmp_path, store, ["acme", "globex"], schemes=["bf16", "gptq-int4"], gptq={**GPTQ, "mode": "bulk", "hessian": "pooled"})
    lines = []
    outcomes = {(o.tenant, o.variant): o for o in fuse_job(pooled, progress=lines.append)}
    assert [k for k, o in outcomes.items() if o.state == "done"] == [("acme", "bf16.original"), ("globex", "bf16.original")]
    failed = outcomes[("acme", "gptq-int4.original")]
    assert failed.error.startswith("hessians original: ") and ("damaged" in failed.error or "sha256" in failed.error)
    assert any("hessians original FAILED" in line for line in lines)
    assert not store.is_complete(hessian_key("t", "original"))

    own = fuse_spec(tmp_path, store, ["acme", "globex"], schemes=["bf16", "gptq-int4"], workers=1,
                    gptq={**GPTQ, "mode": "bulk", "hessian": "per-tenant"})
    lines = []
    outcomes = {(o.tenant, o.variant): o for o in fuse_job(own, progress=lines.append)}
    assert outcomes[("acme", "gptq-int4.original")].state == "done", outcomes[("acme", "gptq-int4.original")].error
    failed = outcomes[("globex", "gptq-int4.original")]
    assert failed.state == "failed" and failed.error.startswith("gptq original for acme, globex: "), failed.error
    assert "damaged" in failed.error or "sha256" in failed.error, failed.error
    assert any(line.startswith("fuse globex/gptq-int4.original: FAILED") for line in lines), lines
    assert not store.is_complete(fused_key("t", "globex", "gptq-int4.original"))
