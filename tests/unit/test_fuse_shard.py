"""One base shard fused for several tenants (fuse/shards.py), on synthetic tensors: no Ray, no store,
no model. What each output file holds, that the nf4-dequantized base is computed once per shard and
format, and the refusals."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from qlora_ray.fuse import shards
from qlora_ray.fuse.math import LoraDelta, fuse_weight
from qlora_ray.fuse.quant import FourBit, roundtrip_4bit
from qlora_ray.fuse.shards import ShardTarget, fuse_shard

Q, NORM = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.input_layernorm.weight"
NF4 = FourBit("nf4", True)


def base_shard() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {Q: (torch.randn(128, 64) * 0.05).to(torch.bfloat16), NORM: torch.ones(64, dtype=torch.bfloat16)}


def delta(seed: int) -> dict[str, LoraDelta]:
    torch.manual_seed(seed)
    return {Q: LoraDelta(Q, torch.randn(4, 64) * 0.1, torch.randn(128, 4) * 0.1, scaling=2.0)}


def target(tenant: str, merge_base: str = "original", schemes=("bf16",), trained=NF4) -> ShardTarget:
    return ShardTarget(tenant, merge_base, tuple(schemes), trained, NF4)


def test_each_tenant_gets_its_own_merge_and_untargeted_weights_pass_through(tmp_path):
    base, written = base_shard(), []
    outputs = fuse_shard(base, [target("a"), target("b")], {"a": delta(1), "b": delta(2)}, frozenset({Q}), tmp_path,
                         "model-1.safetensors", on_output=lambda tenant, variant, out: written.append((tenant, variant)))
    assert written == [("a", "bf16.original"), ("b", "bf16.original")]
    for tenant, seed in (("a", 1), ("b", 2)):
        output = outputs[(tenant, "bf16.original")]
        tensors = load_file(str(output.path))
        assert output.path == tmp_path / tenant / "bf16.original" / "model-1.safetensors"
        assert output.tensors == (NORM, Q) and output.tensor_bytes == sum(t.nbytes for t in tensors.values())
        assert torch.equal(tensors[Q], fuse_weight(base[Q], delta(seed)[Q]))
        assert torch.equal(tensors[NORM], base[NORM])
    assert not torch.equal(load_file(str(outputs[("a", "bf16.original")].path))[Q],
                           load_file(str(outputs[("b", "bf16.original")].path))[Q])


def test_the_nf4_dequantized_base_is_made_once_per_format_and_merged_into(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(shards, "roundtrip_4bit", lambda t, fmt: (calls.append(fmt), roundtrip_4bit(t, fmt))[1])
    base = base_shard()
    targets = [target("a", "nf4-dequantized"), target("b", "nf4-dequantized")]
    outputs = fuse_shard(base, targets, {"a": delta(1), "b": delta(2)}, frozenset({Q}), tmp_path, "s.safetensors")
    assert calls == [NF4]  # one quantized weight, one format: once for both tenants
    merged = load_file(str(outputs[("a", "bf16.nf4-dequantized")].path))
    assert torch.equal(merged[Q], fuse_weight(roundtrip_4bit(base[Q], NF4), delta(1)[Q]))
    assert torch.equal(merged[NORM], base[NORM])  # not quantized by the loader, so not round-tripped


def test_the_nf4_scheme_packs_quantized_weights_only(tmp_path):
    outputs = fuse_shard(base_shard(), [target("a", schemes=("bf16", "nf4"))], {"a": delta(1)}, frozenset({Q}),
                         tmp_path, "s.safetensors")
    packed = load_file(str(outputs[("a", "nf4.original")].path))
    assert packed[Q].dtype == torch.uint8 and packed[Q].numel() == 128 * 64 // 2
    assert {f"{Q}.absmax", f"{Q}.quant_map", f"{Q}.quant_state.bitsandbytes__nf4"} <= set(packed)
    assert packed[NORM].dtype == torch.bfloat16


def test_merging_into_a_4bit_base_the_tenant_never_had_is_refused(tmp_path):
    with pytest.raises(ValueError, match="a: trained on the 16-bit base"):
        fuse_shard(base_shard(), [target("a", "nf4-dequantized", trained=None)], {"a": delta(1)}, frozenset({Q}),
                   tmp_path, "s.safetensors")


def test_a_scheme_that_is_not_shard_wise_is_refused(tmp_path):
    with pytest.raises(ValueError, match="'gguf' is not written shard by shard"):
        fuse_shard(base_shard(), [target("a", schemes=("gguf",))], {"a": delta(1)}, frozenset({Q}),
                   tmp_path, "s.safetensors")


def test_gptq_is_shard_wise_only_against_stored_hessians(tmp_path):
    from qlora_ray.spec import GptqSpec

    gptq = target("a", schemes=("gptq-int4",))
    with pytest.raises(ValueError, match="need the GPTQ settings and the Hessians"):
        fuse_shard(base_shard(), [gptq], {"a": delta(1)}, frozenset({Q}), tmp_path, "s.safetensors")
    with pytest.raises(ValueError, match=f"{Q}: the Hessian set 'original' has no Hessian"):
        fuse_shard(base_shard(), [replace(gptq, hessian_pool="original")], {"a": delta(1)}, frozenset({Q}), tmp_path,
                   "s.safetensors", hessians={"original": {}}, gptq=GptqSpec(group_size=32))


def test_a_gptq_group_size_must_divide_every_input_size():
    from qlora_ray.fuse.gptq import group_size_problems
    from qlora_ray.spec import GptqSpec

    sizes = {"q_proj": 576, "down_proj": 1536, "odd": 200}
    assert group_size_problems(GptqSpec(group_size=64), {"q_proj": 576, "down_proj": 1536}) == []
    assert group_size_problems(GptqSpec(group_size=-1), sizes) == []
    (problem,) = group_size_problems(GptqSpec(group_size=128), sizes)
    assert problem.startswith("fuse.gptq.group_size: 128 does not divide the input size 200 of odd (and 1 other")
    assert "200, 576" in problem


def test_a_gptq_checkpoint_keeps_dense_tensors_in_bf16_whatever_it_computed_in(tmp_path):
    import json

    from safetensors.torch import save_file

    from qlora_ray.fuse.gptq import dense_in_bf16

    qweight = torch.randint(-2**31, 2**31 - 1, (8, 64), dtype=torch.int32)
    save_file({"lm_head.weight": torch.randn(32, 64), "q.qweight": qweight, "q.scales": torch.randn(1, 64).half()},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "float32", "quantization_config": {"bits": 4}}))
    dense_in_bf16(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert tensors["lm_head.weight"].dtype == torch.bfloat16
    assert torch.equal(tensors["q.qweight"], qweight) and tensors["q.scales"].dtype == torch.float16
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["quantization_config"] == {"bits": 4}


def test_tenants_are_stacked_in_near_equal_stacks_under_the_element_bound():
    down_proj = 4096 * 14336  # an 8B's: 9 fit under the bound
    assert [len(s) for s in shards.stacks(list(range(24)), down_proj)] == [8, 8, 8]
    assert [len(s) for s in shards.stacks(list(range(24)), 4096 * 1024)] == [24]
    assert [len(s) for s in shards.stacks(list(range(3)), shards.MAX_STACK_ELEMENTS * 2)] == [1, 1, 1]
