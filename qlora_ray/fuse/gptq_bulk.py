"""Bulk GPTQ's arithmetic: many tenants' merged weights quantized against one stored Hessian, and
written as GPTQ checkpoint tensors. Local functions only (no Ray, no store, no files).

The solver is GPTQModel's own (`gptqmodel.quantization.gptq.GPTQ`), configured as its GPTQ processor
configures it. GPTQ spreads a column's rounding error only along its own row, so tenants that share
a Hessian are stacked row-wise and solved in one call: each gets the codes, scales and zeros its own
call would (tests/unit/test_gptq_bulk.py checks it).

The packing is ours: GPTQModel packs one nn.Linear at a time, on the CPU, through numpy loops; this
packs a stacked weight at once, on the worker's device. It writes GPTQ's v1 checkpoint format
(checkpoint_format "gptq", what GPTQModel saves and transformers and vLLM load), and is tested to
equal GPTQModel's packer, tensor for tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qlora_ray.spec import GptqSpec

PACK_BITS = 32  # GPTQ packs codes into int32 words


@dataclass(frozen=True)
class GptqCodes:
    """One weight's GPTQ result as quantize() returns it: the dequantized weight (out, in), the
    scales and zero points (out, groups), and each input column's group (in,)."""

    dequantized: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor


def quantize_config(spec: GptqSpec):
    """GPTQModel's QuantizeConfig for the job's settings, as the per-tenant path builds it."""
    from gptqmodel import QuantizeConfig

    # offload_to_disk: GPTQModel's own layer offloading, which this path does not use (it would make a temp folder).
    return QuantizeConfig(bits=spec.bits, group_size=spec.group_size, desc_act=spec.desc_act,
                          static_groups=spec.static_groups, sym=True,
                          offload_to_disk=False)


def solve_stacked(weights: list[torch.Tensor], hessian: torch.Tensor, tokens: int, config) -> list[GptqCodes]:
    """GPTQ-quantize every weight (each (out, in), on one device) against one Hessian (in, in) of
    `tokens` calibration tokens, in one call of GPTQModel's solver on the weights stacked row-wise."""
    from gptqmodel.quantization.gptq import GPTQ

    stacked = torch.cat(weights) if len(weights) > 1 else weights[0]
    with torch.device("meta"):
        linear = torch.nn.Linear(stacked.shape[1], stacked.shape[0], bias=False)
    linear.weight = torch.nn.Parameter(stacked, requires_grad=False)
    task = GPTQ(linear, config)
    task.quantizer.configure(perchannel=True)
    task.fallback, task.expected_nsamples = config.fallback, tokens
    # quantize() works on H in place: each call gets its own copy.
    task.H, task.nsamples = hessian.to(device=stacked.device, dtype=torch.float32, copy=True), tokens
    dequantized, scales, zeros, g_idx = task.quantize()[:4]
    task.free()
    rows = [w.shape[0] for w in weights]
    return [GptqCodes(d, s, z, g_idx) for d, s, z in zip(dequantized.split(rows), scales.split(rows), zeros.split(rows))]


def quantize_layer_in_place(layer: torch.nn.Module, prefix: str, hessians: dict, config) -> None:
    """Replace each weight `prefix + name` of the layer named in hessians (weight name -> SiteHessian)
    by its GPTQ-quantized value: what the next layer's Hessians are then taken through."""
    for weight, hessian in hessians.items():
        parameter = layer.get_parameter(weight.removeprefix(prefix))
        (codes,) = solve_stacked([parameter.data], hessian.matrix, hessian.tokens, config)
        parameter.data = codes.dequantized.to(parameter.dtype)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words -> int32 holding their low 32 bits (GPTQ's words are unsigned bit patterns)."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def integer_codes(codes: GptqCodes, bits: int) -> torch.Tensor:
    """Each weight's integer code (out, in), int64: what a GPTQ checkpoint packs."""
    scales, zeros = codes.scales.float(), codes.zeros.float()
    group = codes.g_idx.long()
    shifted = codes.dequantized.float() + (zeros * scales)[:, group]
    return torch.round(shifted / scales[:, group]).clamp_(0, 2 ** bits - 1).to(torch.int64)


def pack_gptq(name: str, codes: GptqCodes, bits: int) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of a GPTQ linear holding `codes`, keyed from the weight's name
    ('...q_proj.weight' -> '...q_proj.qweight', '.qzeros', '.scales', '.g_idx'), in v1 format."""
    prefix = name.removesuffix(".weight")
    per_word = PACK_BITS // bits
    scales = codes.scales.T.float().contiguous()  # (groups, out)
    zeros = codes.zeros.T.float().contiguous()
    ints = integer_codes(codes, bits).T.contiguous()  # (in, out)
    columns, rows = ints.shape
    if columns % per_word or rows % per_word:
        raise ValueError(f"{name}: GPTQ packs {per_word} codes a word; its shape {tuple(codes.dequantized.shape)} "
                         "does not divide")
    shifts = torch.arange(per_word, device=ints.device, dtype=torch.int64) * bits
    qweight = (ints.view(columns // per_word, per_word, rows) << shifts.view(1, per_word, 1)).sum(1)
    zero_ints = zeros.to(torch.int64)
    qzeros = (zero_ints.view(zeros.shape[0], rows // per_word, per_word) << shifts).sum(2)
    # v1 stores each zero point minus one (GPTQModel's convert_gptq_v2_to_v1_format_module).
    qzeros = qzeros - sum(1 << shift for shift in shifts.tolist())
    return {f"{prefix}.qweight": _to_int32(qweight).cpu(), f"{prefix}.qzeros": _to_int32(qzeros).cpu(),
            f"{prefix}.scales": scales.to(torch.float16).cpu(),
            # a copy: the weights of one stacked solve share one g_idx, and a checkpoint file may hold several
            f"{prefix}.g_idx": codes.g_idx.to(device="cpu", dtype=torch.int32, copy=True)}
