"""Bulk GPTQ's pieces against GPTQModel's: the stacked solve, the packer, and the Hessian capture."""

from __future__ import annotations

import pytest
import torch

from qlora_ray.fuse.gptq_bulk import GptqCodes, pack_gptq, quantize_config, solve_stacked
from qlora_ray.fuse.hessians import (capture_hessians, padded_batches, read_hessians, symmetric_from_upper,
                                     upper_triangle, write_hessians)
from qlora_ray.spec import GptqSpec

pytest.importorskip("gptqmodel")


def _hessian(columns: int, tokens: int, seed: int) -> torch.Tensor:
    inputs = torch.randn(tokens, columns, generator=torch.Generator().manual_seed(seed))
    return 2.0 / tokens * inputs.T @ inputs


def _weights(count: int, rows: int, columns: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randn(rows, columns, generator=generator) * 0.02 for _ in range(count)]


@pytest.mark.parametrize("desc_act,static_groups", [(False, False), (True, False), (True, True)])
def test_stacked_tenants_get_the_codes_of_their_own_solve(desc_act, static_groups):
    config = quantize_config(GptqSpec(group_size=32, desc_act=desc_act, static_groups=static_groups))
    hessian = _hessian(96, 400, seed=1)
    weights = _weights(3, 48, 96)
    stacked = solve_stacked(weights, hessian, 400, config)
    for weight, together in zip(weights, stacked):
        (alone,) = solve_stacked([weight], hessian, 400, config)
        for field in ("dequantized", "scales", "zeros", "g_idx"):
            assert torch.equal(getattr(together, field), getattr(alone, field)), field
    # GPTQ moved the weights (the Hessian is not diagonal), so this is not plain rounding
    assert not torch.equal(stacked[0].dequantized, weights[0])


@pytest.mark.parametrize("bits,desc_act", [(4, False), (4, True), (8, False)])
def test_packing_equals_gptqmodels_packer(bits, desc_act):
    """Same codes packed by us and by GPTQModel's TorchLinear (pack_original, then v2 -> v1 as its save does)."""
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.utils.model import convert_gptq_v2_to_v1_format_module

    spec = GptqSpec(bits=bits, group_size=32, desc_act=desc_act)
    config = quantize_config(spec)
    (codes,) = solve_stacked(_weights(1, 64, 128), _hessian(128, 300, seed=2), 300, config)
    ours = pack_gptq("model.layers.0.mlp.up_proj.weight", codes, bits)

    reference = TorchLinear(bits=bits, group_size=32, sym=True, desc_act=desc_act, in_features=128,
                            out_features=64, bias=False)
    with torch.device("meta"):
        linear = torch.nn.Linear(128, 64, bias=False)
    linear.weight = torch.nn.Parameter(codes.dequantized, requires_grad=False)
    reference.pack_original(linear, codes.scales, codes.zeros, codes.g_idx)
    convert_gptq_v2_to_v1_format_module(reference, config)
    for part in ("qweight", "qzeros", "scales", "g_idx"):
        theirs = getattr(reference, part)
        mine = ours[f"model.layers.0.mlp.up_proj.{part}"]
        assert mine.dtype == theirs.dtype and torch.equal(mine, theirs), part


def test_packing_refuses_shapes_that_do_not_fill_words():
    codes = GptqCodes(torch.zeros(6, 32), torch.ones(6, 1), torch.full((6, 1), 8.0), torch.zeros(32, dtype=torch.int32))
    with pytest.raises(ValueError, match="does not divide"):
        pack_gptq("x.weight", codes, 4)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def test_capture_equals_gptqmodels_add_batch_and_finds_shared_inputs():
    """Our sums of XᵀX over unpadded tokens equal GPTQModel's GPTQ.add_batch fed the same inputs one row at a time."""
    from gptqmodel.quantization.gptq import GPTQ

    model = _tiny_llama()
    names = frozenset(f"model.layers.{i}.{linear}.weight" for i in range(2) for linear in LINEARS)
    rows = [[1, 5, 9, 3, 4], [7, 8], [2, 3, 4, 5, 6, 7, 8, 9, 10], [11]]
    hessians = capture_hessians(model, padded_batches(rows, 3, pad_id=0, device="cpu"), names)

    assert hessians.weight_sites["model.layers.1.self_attn.k_proj.weight"] == "model.layers.1.self_attn.q_proj.weight"
    assert hessians.weight_sites["model.layers.0.mlp.up_proj.weight"] == "model.layers.0.mlp.gate_proj.weight"
    assert len(hessians.sums) == 2 * 4  # attention in, o_proj in, MLP in, down_proj in
    config = quantize_config(GptqSpec(group_size=16))
    modules = dict(model.named_modules())
    for site in hessians.sums:
        module = modules[site.removesuffix(".weight")]
        task = GPTQ(module, config)
        inputs = []
        handle = module.register_forward_pre_hook(lambda _, args: inputs.append(args[0]))
        with torch.no_grad():
            for row in rows:  # one row at a time: no padding at all
                model(input_ids=torch.tensor([row]))
        handle.remove()
        for x in inputs:
            task.add_batch(x, None)
        assert hessians.tokens[site] == task.nsamples == sum(map(len, rows))
        torch.testing.assert_close(hessians.normalized(site), task.finalize_hessian(), rtol=1e-5, atol=1e-6)


def test_capture_names_weights_the_model_lacks():
    with pytest.raises(ValueError, match="no linear layers"):
        capture_hessians(_tiny_llama(), [], frozenset({"model.layers.9.mlp.up_proj.weight"}))


def test_hessian_files_round_trip_by_shard(tmp_path):
    model = _tiny_llama()
    names = frozenset(f"model.layers.{i}.{linear}.weight" for i in range(2) for linear in LINEARS)
    hessians = capture_hessians(model, padded_batches([[1, 2, 3], [4, 5]], 2, 0, "cpu"), names)
    weight_map = {name: "a.safetensors" if ".0." in name else "b.safetensors" for name in names}
    weight_map.update({"model.embed_tokens.weight": "a.safetensors", "lm_head.weight": "c.safetensors"})
    written = write_hessians(hessians, weight_map, tmp_path)
    assert sorted(written) == ["a.safetensors", "b.safetensors"]  # no quantized weight in c
    read = read_hessians(tmp_path / "a.safetensors", "cpu")
    assert sorted(read) == sorted(n for n in names if ".0." in n)
    q, k = read["model.layers.0.self_attn.q_proj.weight"], read["model.layers.0.self_attn.k_proj.weight"]
    assert q is k  # one tensor per site
    torch.testing.assert_close(q.matrix, hessians.normalized("model.layers.0.self_attn.q_proj.weight"))
    assert q.tokens == 5


def test_upper_triangle_round_trip():
    matrix = _hessian(17, 40, seed=3)
    packed = upper_triangle(matrix)
    assert packed.numel() == 17 * 18 // 2
    assert torch.equal(symmetric_from_upper(packed, 17), matrix.triu() + matrix.triu(1).T)


def test_sequential_capture_takes_each_layer_from_the_quantized_layers_before_it():
    """Layer 0 reads the embeddings either way; layer 1 reads layer 0's output, which the sequential
    capture quantized first (through quantize_layer, once per layer, with that layer's weights only)."""
    from qlora_ray.fuse.gptq_bulk import quantize_layer_in_place

    names = frozenset(f"model.layers.{i}.{linear}.weight" for i in range(2) for linear in LINEARS)
    rows = [[1, 5, 9, 3, 4], [7, 8], [2, 3, 4, 5, 6, 7, 8, 9, 10]]
    model = _tiny_llama()
    plain = capture_hessians(model, padded_batches(rows, 2, 0, "cpu"), names)
    config = quantize_config(GptqSpec(group_size=16))
    calls = []

    def quantize(layer, prefix, hessians):
        calls.append((prefix, sorted(hessians)))
        quantize_layer_in_place(layer, prefix, hessians, config)

    before = model.model.layers[0].mlp.down_proj.weight.clone()
    sequential = capture_hessians(model, padded_batches(rows, 2, 0, "cpu"), names, quantize)
    assert [prefix for prefix, _ in calls] == ["model.layers.0.", "model.layers.1."]
    assert calls[0][1] == sorted(n for n in names if ".0." in n)
    assert sequential.weight_sites == plain.weight_sites and sequential.tokens == plain.tokens
    for site in plain.sums:
        if ".layers.0.self_attn.q_proj" in site:
            torch.testing.assert_close(sequential.sums[site], plain.sums[site])
        elif ".layers.1." in site:
            assert not torch.allclose(sequential.sums[site], plain.sums[site])
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, before)  # quantized in place
