"""The fuse stage's plan (fuse/plan.py), without Ray or a store: what each tenant gets built, the
inputs its manifests record, what is refused and why, and the units the actor pool runs."""

from __future__ import annotations

from qlora_ray.fuse.layout import BaseLayout
from qlora_ray.fuse.plan import (AdapterFacts, GptqUnit, ShardUnit, fuse_units, gptq_problems, plan_tenant,
                                  stream_units)
from qlora_ray.fuse.quant import FourBit
from qlora_ray.store import Draft, Store
from tests.helpers import fuse_spec

NF4 = FourBit("nf4", True)


def facts(trained: FourBit | None = NF4, *, problems=(), data: bool = True) -> AdapterFacts:
    manifest = {"inputs": {"training_fingerprint": "fp"}, "metrics": {}}
    return AdapterFacts(manifest, "adapter-digest", trained, list(problems),
                        {"inputs": {"train_sha256": "rows"}} if data else None)


def spec_of(tmp_path, **fuse):
    return fuse_spec(tmp_path, Store(str(tmp_path / "store")), ["acme"], **fuse)


def test_each_variant_records_what_it_was_built_from(tmp_path):
    spec = spec_of(tmp_path, schemes=["bf16", "nf4", "gptq-int4"], merge_base="both")
    tenant = spec.tenant("acme")
    plan = plan_tenant(spec, tenant, spec.fused_variants(tenant), facts(), "base-digest", [])
    assert plan.failed == []
    by_name = {build.variant.name: build for build in plan.builds}
    assert set(by_name) == {v.name for v in spec.fused_variants(tenant)}
    original, dequantized = by_name["nf4.original"], by_name["gptq-int4.nf4-dequantized"]
    assert original.inputs["base"] == {"key": "bases/tiny", "manifest_sha256": "base-digest"}
    assert original.inputs["adapter"] == {"key": "runs/t/adapters/acme", "manifest_sha256": "adapter-digest",
                                          "training_fingerprint": "fp"}
    assert original.inputs["output_format"] == vars(FourBit("nf4", tenant.training.double_quant))
    assert "trained_format" not in original.inputs and dequantized.inputs["trained_format"] == vars(NF4)
    assert dequantized.inputs["calibration"] == {"key": "runs/t/data/acme", "train_sha256": "rows"}
    assert dequantized.inputs["gptq"] == spec.fuse.gptq.model_dump(mode="json")
    assert [b.shard_wise for b in plan.builds].count(False) == 2  # the two GPTQ builds


def test_refusals_name_the_variants_they_cost_and_why(tmp_path):
    spec = spec_of(tmp_path, schemes=["bf16", "gptq-int4"], merge_base="both")
    tenant = spec.tenant("acme")
    todo = spec.fused_variants(tenant)

    sixteen_bit = plan_tenant(spec, tenant, todo, facts(trained=None), "d", [])
    assert {o.variant for o in sixteen_bit.failed} == {"bf16.nf4-dequantized", "gptq-int4.nf4-dequantized"}
    assert all("no 4-bit base to merge into" in o.error for o in sixteen_bit.failed)
    assert {b.variant.name for b in sixteen_bit.builds} == {"bf16.original", "gptq-int4.original"}

    no_rows = plan_tenant(spec, tenant, todo, facts(data=False), "d", [])
    assert {o.variant for o in no_rows.failed} == {"gptq-int4.original", "gptq-int4.nf4-dequantized"}
    assert all("calibrate GPTQ" in o.error for o in no_rows.failed)

    bad_group = plan_tenant(spec, tenant, todo, facts(), "d", ["fuse.gptq.group_size: 128 does not divide 192"])
    assert {o.variant for o in bad_group.failed} == {"gptq-int4.original", "gptq-int4.nf4-dequantized"}
    assert {b.variant.name for b in bad_group.builds} == {"bf16.original", "bf16.nf4-dequantized"}

    misfit = plan_tenant(spec, tenant, todo, facts(problems=["q_proj: 64x8 does not fit 32x32", "k_proj: too"]), "d", [])
    assert misfit.builds == [] and len(misfit.failed) == len(todo)
    assert misfit.failed[0].error == "the adapter does not fit base tiny: q_proj: 64x8 does not fit 32x32 (and 1 more)"


def test_the_group_size_must_divide_every_quantized_width(tmp_path):
    layout = BaseLayout(shards={"model-1.safetensors": ("a.weight", "b.weight")},
                        shapes={"a.weight": (192, 576), "b.weight": (576, 192)},
                        quantized=frozenset({"a.weight", "b.weight"}), tied_output=None)
    fits = spec_of(tmp_path, schemes=["gptq-int4"], gptq={"group_size": 64})
    assert gptq_problems(fits, layout) == []
    too_wide = spec_of(tmp_path, schemes=["gptq-int4"], gptq={"group_size": 128})
    (problem,) = gptq_problems(too_wide, layout)
    assert "128" in problem and "192" in problem
    assert gptq_problems(spec_of(tmp_path, schemes=["bf16"], gptq={"group_size": 128}), layout) == []


def test_one_shard_unit_per_base_shard_merges_each_tenant_and_merge_base_once(tmp_path):
    spec = spec_of(tmp_path, schemes=["bf16", "nf4", "gptq-int4"], merge_base="both")
    tenant = spec.tenant("acme")
    plan = plan_tenant(spec, tenant, spec.fused_variants(tenant), facts(), "d", [])
    shard_builds = {f"acme/{b.variant.name}": (b, Draft(f"runs/t/fused/acme/{b.variant.name}", "v1"))
                    for b in plan.builds if b.shard_wise}
    gptq = [b for b in plan.builds if not b.shard_wise]
    units = fuse_units(["model-2.safetensors", "model-1.safetensors"], shard_builds, gptq)
    shards, gptq_units = units[:2], units[2:]
    assert all(isinstance(u, ShardUnit) for u in shards) and all(isinstance(u, GptqUnit) for u in gptq_units)
    assert [u.name for u in shards] == ["shard model-2.safetensors", "shard model-1.safetensors"]
    assert [u.name for u in gptq_units] == ["acme gptq-int4.original", "acme gptq-int4.nf4-dequantized"]
    targets = shards[0].targets
    assert sorted((t.merge_base, t.schemes) for t in targets) == [("nf4-dequantized", ("bf16", "nf4")),
                                                                  ("original", ("bf16", "nf4"))]
    assert set(shards[0].drafts) == set(shard_builds)
    assert fuse_units(["model-1.safetensors"], {}, gptq) == [GptqUnit(b) for b in gptq]  # nothing shard-wise to do


def test_bulk_gptq_with_per_tenant_hessians_is_walked_in_groups_per_merge_base(tmp_path):
    """No Hessian set to read: the builds are drafted (their worker uploads parts), in at most one
    walk per worker and merge base, each tenant once."""
    spec = fuse_spec(tmp_path, Store(str(tmp_path / "store")), [f"t{i}" for i in range(5)], schemes=["bf16", "gptq-int4"],
                     merge_base="both", gptq={"mode": "bulk", "hessian": "per-tenant"})
    streamed = {}
    for tenant in spec.tenants:
        plan = plan_tenant(spec, tenant, spec.fused_variants(tenant), facts(), "d", [])
        for build in plan.builds:
            assert build.drafted and build.streamed == (build.variant.scheme == "gptq-int4")
            assert build.shard_wise != build.streamed and "hessians" not in build.inputs
            if build.streamed:
                streamed[f"{tenant.id}/{build.variant.name}"] = (build, Draft(f"runs/t/fused/{tenant.id}", "v1"))
    units = stream_units(streamed, workers=2)
    assert [u.name for u in units] == ["gptq original for t0, t1, t2", "gptq original for t3, t4",
                                       "gptq nf4-dequantized for t0, t1, t2", "gptq nf4-dequantized for t3, t4"]
    assert sorted(name for u in units for name in u.drafts) == sorted(streamed)
    assert all(len({t.merge_base for t in u.targets}) == 1 for u in units)
    assert len(stream_units(streamed, workers=16)) == 10  # one tenant a walk, never an empty one
    # A LoRA trained on the 16-bit base shares the original's walk with the QLoRA adapters.
    (sixteen_bit,) = plan_tenant(spec, spec.tenant("t4"), [v for v in spec.fused_variants(spec.tenant("t4"))
                                                           if v.name == "gptq-int4.original"], facts(trained=None), "d", []).builds
    streamed["t4/gptq-int4.original"] = (sixteen_bit, streamed["t4/gptq-int4.original"][1])
    assert [u.name for u in stream_units(streamed, workers=2)][:2] == ["gptq original for t0, t1, t2", "gptq original for t3, t4"]


def test_pooled_bulk_gptq_reads_one_hessian_set_per_merge_base(tmp_path):
    spec = spec_of(tmp_path, schemes=["gptq-int4"], merge_base="both", gptq={"mode": "bulk", "hessian": "pooled"})
    tenant = spec.tenant("acme")
    builds = plan_tenant(spec, tenant, spec.fused_variants(tenant), facts(), "d", []).builds
    assert sorted(b.inputs["hessians"]["key"] for b in builds) == ["runs/t/hessians/nf4-dequantized.nf4-dq",
                                                                   "runs/t/hessians/original"]
    assert all(b.shard_wise and not b.streamed for b in builds)
