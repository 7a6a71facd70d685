"""The serving engine's CUDA paths: GPTQ weights repacked for torch's int4 kernel (decode) and
dequantized by the compiled kernel (prompts), and decode steps replayed from CUDA graphs.

Skipped without a CUDA GPU (CI has none); run on the lent H100 with `python -m pytest tests/gpu`.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from qlora_ray.serve.decoder import DEQUANTIZE_ABOVE_ROWS
from qlora_ray.serve.engine import FIRST_SPAN, SamplingParams, StaticEngine
from qlora_ray.serve.weights import build_decoder, gptq_dequantize, gptq_to_tinygemm, pack_int32
from qlora_ray.shapes import shape_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_gptq(out_features: int, in_features: int, group_size: int, act_order: bool, seed: int):
    """A GPTQ v1 linear with random 4-bit values, zero points and scales (qweight, qzeros, scales, g_idx)."""
    generator = torch.Generator().manual_seed(seed)
    groups = in_features // group_size
    q = torch.randint(0, 16, (in_features, out_features), generator=generator)
    zero_points = torch.randint(1, 16, (groups, out_features), generator=generator)
    scales = (torch.rand(groups, out_features, generator=generator) * 0.02 + 0.001).half()
    g_idx = torch.arange(in_features) // group_size
    if act_order:
        g_idx = g_idx[torch.randperm(in_features, generator=generator)]
    return pack_int32(q, 0), pack_int32(zero_points - 1, 1), scales, g_idx.int()


@pytest.mark.parametrize("act_order", [False, True])
def test_int4_linear_matches_the_dequantized_weight_for_prompts_and_decode_steps(act_order):
    parts = [random_gptq(256, 512, 128, act_order, seed) for seed in range(1 if act_order else 2)]
    linear = gptq_to_tinygemm(parts, 128, torch.device("cuda"))
    assert linear is not None
    weight = torch.cat([gptq_dequantize(*part) for part in parts]).cuda()
    for rows in (1, DEQUANTIZE_ABOVE_ROWS + 31):
        x = torch.randn(rows, 512, device="cuda", dtype=torch.bfloat16)
        expected = x.float() @ weight.t()
        got = linear(x).float()
        error = (got - expected).norm() / expected.norm()
        assert error < 1e-2, (rows, error.item())


def test_cuda_graph_decode_generates_what_transformers_generates():
    """Warmed-up CUDA graphs, one per attention span, replayed as answers cross the spans' bounds."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(shape_config("tiny")).cuda().eval()
    model.generation_config.eos_token_id = None  # the engine is given no stop token either
    decoder = build_decoder(model.config, dict(model.state_dict()), None, device=torch.device("cuda"), dtype=torch.float32)
    engine = StaticEngine(decoder, set(), context=2 * FIRST_SPAN + 40)
    assert engine.cuda_graphs
    engine.warm_up([2])
    assert sorted(engine._graphs) == [(2, span) for span in engine.spans]
    prompts = [[5, 17, 99, 3, 42], [(7 * i) % 200 + 3 for i in range(FIRST_SPAN - 8)]]
    new_tokens = FIRST_SPAN + 20
    steps = list(engine.generate(prompts, [SamplingParams(max_new_tokens=new_tokens, temperature=0)] * 2))
    assert len(engine._graphs) == len(engine.spans)  # no capture after the warm-up
    for row, prompt in enumerate(prompts):
        ids = torch.tensor([prompt], device="cuda")
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        assert [step[row] for step in steps] == out[0, len(prompt):].tolist()
