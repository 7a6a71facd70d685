"""Where batch-1 decode of the int4 8B can still gain, on a GPU: Marlin's reduction setting per
projection, the LM head's format, and the decode attention's form, each measured in one process.

1. Kernels: the 8B's four projections at one row on Marlin (32 distinct weights per shape, one CUDA
   graph, so no L2 reuse), with Marlin's fp32 and bf16 cross-block reduction; error against the
   dequantized weights in fp32.
2. The LM head at one row: cuBLAS bf16 against Marlin 8-bit (per-channel) and 4-bit (group 128)
   weights, with the logits' error and top-1 agreement over 64 random hidden states.
3. The whole engine (serve_speed.py's setting: prompt 128, 128 new tokens, greedy, cache 1,024),
   batch 1, each variant compiled and captured afresh: Marlin everywhere (as committed before
   session 9); tinygemm for the q/k/v and o projections at one row (what weights.py now does);
   decode attention as fp32 products and sums; the LM head in 8 bits on Marlin (lossy: not used).

Usage (on the GPU machine): python benchmarks/decode_variants.py --out OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.serve_speed import gptq_state, random_model, rtn_gptq, time_engine  # noqa: E402
from qlora_ray.serve import decoder as decoder_module  # noqa: E402
from qlora_ray import marlin  # noqa: E402
from qlora_ray.serve.engine import StaticEngine  # noqa: E402
from qlora_ray.serve.sampling import SamplingParams  # noqa: E402
from qlora_ray.serve.scheduler import generate  # noqa: E402
from qlora_ray.serve.weights import build_decoder, gptq_dequantize, gptq_to_tinygemm  # noqa: E402

SHAPES = [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096)]
UINT8B128 = marlin.scalar_type_id(exponent=0, mantissa=8, signed=False, bias=128, finite_values_only=False, nan_repr=1)


def graph_us(call, replays: int = 25) -> float:
    """Median time of one replay of `call` captured as a CUDA graph, in µs."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference.double()).norm() / reference.double().norm())


def marlin_gemm(x, packed, scales, weight_type, size_n, fp32_reduce=True):
    return marlin.ops().gptq_marlin_gemm_bf16(
        x, None, packed, None, scales, None, None, None, None, marlin._workspace(x.device.index or 0), weight_type,
        x.shape[0], size_n, x.shape[1], is_k_full=True, use_atomic_add=False, use_fp32_reduce=fp32_reduce,
        is_zp_float=False)


def int4_marlin(weight: torch.Tensor):
    """(packed, scales, dequantized fp32 weight) of a bf16 weight [out, in] by RTN, group 128."""
    gptq = rtn_gptq(weight, 128)
    packed, scales, _, _ = marlin.repack(gptq["qweight"], gptq["scales"], gptq["g_idx"], 128)
    # Marlin holds the scales in bf16: the reference uses the same rounded scales.
    reference = gptq_dequantize(gptq["qweight"], gptq["qzeros"], gptq["scales"].to(torch.bfloat16), gptq["g_idx"])
    return packed, scales, reference


def int8_marlin(weight: torch.Tensor):
    """(packed, scales, dequantized fp32 weight) of a bf16 weight [out, in], symmetric 8-bit per output
    channel (w = (q - 128) * scale), in GPTQ's 8-bit layout (four values per int32 along `in`)."""
    out_features, in_features = weight.shape
    scale = (weight.float().abs().amax(1) / 127).clamp(min=1e-8)  # [out]
    q = (weight.float() / scale[:, None]).round().add(128).clamp(0, 255).to(torch.int32)  # [out, in]
    columns = q.t().contiguous().view(in_features // 4, 4, out_features)
    qweight = columns[:, 0] | columns[:, 1] << 8 | columns[:, 2] << 16 | columns[:, 3] << 24
    empty = torch.empty(0, dtype=torch.int, device=weight.device)
    packed = marlin.ops().gptq_marlin_repack(qweight.contiguous(), empty, in_features, out_features, 8)
    order = torch.tensor(marlin._scale_permutation(in_features, in_features), device=weight.device)
    scales = scale.to(torch.bfloat16).reshape(-1, len(order)).index_select(1, order).reshape(1, out_features)
    reference = (q.float() - 128) * scale.to(torch.bfloat16).float()[:, None]
    return packed, scales.contiguous(), reference


def projections(results: dict) -> None:
    rows = []
    for name, in_features, out_features in SHAPES:
        torch.manual_seed(1)
        weights = [int4_marlin(torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16) * 0.02)
                   for _ in range(32)]
        x = torch.randn(1, in_features, device="cuda", dtype=torch.bfloat16)
        reference = x.float() @ weights[0][2].t()
        moved = out_features * in_features / 2 + out_features * in_features / 128 * 2
        row = {"shape": name, "in": in_features, "out": out_features}
        for fp32_reduce in (True, False):
            label = "fp32_reduce" if fp32_reduce else "bf16_reduce"
            us = graph_us(lambda: [marlin_gemm(x, p, s, marlin.UINT4B8, out_features, fp32_reduce) for p, s, _ in weights])
            row[f"{label}_us_per_call"] = round(us / 32, 2)
            row[f"{label}_TBps"] = round(moved / (us / 32 * 1e-6) / 1e12, 3)
            row[f"{label}_error"] = relative_error(
                marlin_gemm(x, weights[0][0], weights[0][1], marlin.UINT4B8, out_features, fp32_reduce), reference)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del weights
        torch.cuda.empty_cache()
    results["projections"] = rows


def lm_heads(results: dict, vocab: int, hidden: int) -> None:
    torch.manual_seed(2)
    weight = torch.randn(vocab, hidden, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(1, hidden, device="cuda", dtype=torch.bfloat16)
    states = torch.randn(64, hidden, device="cuda", dtype=torch.bfloat16)
    exact = states.float() @ weight.float().t()
    rows = [{"head": "bf16 (cuBLAS)", "us": round(graph_us(lambda: F.linear(x, weight)), 1),
             "error": relative_error(F.linear(states, weight), exact), "top1_agree": 1.0,
             "bytes": weight.nbytes}]
    for label, make, weight_type in (("int8 per channel (Marlin)", int8_marlin, UINT8B128),
                                     ("int4 group 128 (Marlin)", int4_marlin, marlin.UINT4B8)):
        packed, scales, _ = make(weight)
        logits = torch.cat([marlin_gemm(states[i:i + 1], packed, scales, weight_type, vocab) for i in range(64)])
        rows.append({"head": label, "us": round(graph_us(lambda: marlin_gemm(x, packed, scales, weight_type, vocab)), 1),
                     "error": relative_error(logits, exact),
                     "top1_agree": float((logits.float().argmax(-1) == exact.argmax(-1)).float().mean()),
                     "bytes": packed.nbytes + scales.nbytes})
        del packed, scales
    for row in rows:
        print(json.dumps(row), flush=True)
    results["lm_head"] = rows


class Int8Head(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.packed, self.scales, _ = int8_marlin(weight)
        self.out_features = weight.shape[0]

    def forward(self, x):
        return marlin_gemm(x.reshape(-1, x.shape[-1]).contiguous(), self.packed, self.scales, UINT8B128,
                           self.out_features)


def reduced_decode_attention(q, keys, values, mask):
    """Decode attention as elementwise products and sums in fp32, which Inductor fuses into reductions
    (the committed version runs two batched matmuls around the softmax)."""
    batch, heads, _, head_dim = q.shape
    kv_heads = keys.shape[1]
    rows = q.reshape(batch, kv_heads, heads // kv_heads, 1, head_dim).float()
    scores = (rows * keys.unsqueeze(2).float()).sum(-1) * head_dim ** -0.5  # [B, kv_heads, group, S]
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    attended = (weights.unsqueeze(-1) * values.unsqueeze(2).float()).sum(-2)  # [B, kv_heads, group, d]
    return attended.to(values.dtype).reshape(batch, heads, 1, head_dim)


def engine_variants(results: dict, args) -> None:
    from qlora_ray.shapes import shape_config

    config = shape_config("llama3-8b")
    model = random_model(config)
    tensors = gptq_state(dict(model.state_dict()))
    del model
    quant = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    attention_gptq = {name: value.clone() for name, value in tensors.items() if ".self_attn." in name}
    decoder = build_decoder(config, tensors, quant, device=torch.device("cuda"), dtype=torch.bfloat16,
                            int4_kernel="marlin")
    del tensors
    bf16_head = decoder.lm_head
    int8_head = Int8Head(bf16_head.weight)
    companions = []  # per layer, tinygemm copies of q/k/v and o for one-row calls (weights.py's "auto")
    for index in range(len(decoder.layers)):
        def gptq(projection):
            prefix = f"model.layers.{index}.self_attn.{projection}."
            return tuple(attention_gptq[prefix + key] for key in ("qweight", "qzeros", "scales", "g_idx"))
        companions.append((gptq_to_tinygemm([gptq("q_proj"), gptq("k_proj"), gptq("v_proj")], 128, "cuda",
                                            prompt_copy=False),
                           gptq_to_tinygemm([gptq("o_proj")], 128, "cuda", prompt_copy=False)))
    del attention_gptq
    real_attention = decoder_module.grouped_decode_attention

    def apply(variant):
        decoder_module.grouped_decode_attention = (
            reduced_decode_attention if "reduced-attention" in variant else real_attention)
        decoder.lm_head = int8_head if "int8-head" in variant else bf16_head
        for block, (qkv, o) in zip(decoder.layers, companions):
            one_row = "tinygemm-qkv-o" in variant
            block.qkv_proj.one_row, block.o_proj.one_row = (qkv, o) if one_row else (None, None)

    variants = ["committed", "tinygemm-qkv-o", "reduced-attention", "tinygemm-qkv-o+reduced-attention",
                "int8-head", "tinygemm-qkv-o+int8-head", "committed"]
    rows = []
    for variant in variants:
        apply(variant)
        torch._dynamo.reset()
        engine = StaticEngine(decoder, set(), context=args.context, max_batch=1)
        warm = time.perf_counter()
        engine.warm_up()
        warm = time.perf_counter() - warm
        figures = time_engine(engine, 1, 128, 128, args.repeats)
        tokens = [step[0] for step in generate(engine, [[5, 6, 7]], [SamplingParams(max_new_tokens=16, temperature=0)])]
        row = {"variant": variant, "bs1_tok_s": round(figures["tok_s"], 1), "warmup_s": round(warm, 1),
               "greedy_tokens": tokens}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del engine
    apply("committed")
    results["engine"] = rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--parts", default="kernels,head,engine")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"command": " ".join(sys.argv), "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    started = time.perf_counter()
    marlin.ops()
    results["marlin_ready_s"] = round(time.perf_counter() - started, 1)
    parts = {"kernels": projections, "head": lambda r: lm_heads(r, 128256, 4096),
             "engine": lambda r: engine_variants(r, args)}
    for part in args.parts.split(","):
        try:
            parts[part](results)
        except Exception as error:  # a failed part still leaves the others' figures
            traceback.print_exc()
            results[f"{part}_error"] = repr(error)
        torch.cuda.empty_cache()
        (args.out / "decode-variants.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
