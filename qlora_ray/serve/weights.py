"""Load a fused model folder (bf16, bitsandbytes 4-bit or GPTQ) into serve/decoder.py's Decoder.

The folders are the ones the fuse stage writes, which transformers loads too; reading them here
instead of through from_pretrained lets the GPTQ weights be repacked at load time for the fastest
int4 kernel the GPU has (GPTQModel's Marlin, marlin.py, or torch's tinygemm) and keeps NF4
weights in bitsandbytes' format without transformers' module replacement.

GPTQ layout (GPTQModel `checkpoint_format: gptq`, int32 packing, 4 bits):
  qweight [in/8, out]: input row 8i+j of column o is bits 4j..4j+3 of qweight[i, o]
  qzeros  [groups, out/8]: stored zero point minus one, packed the same way along the output
  scales  [groups, out]; g_idx [in]: each input column's group
  W[o, i] = (q[i, o] - zero[g_idx[i], o]) * scale[g_idx[i], o]
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from qlora_ray.errors import UserError
from qlora_ray import marlin
from qlora_ray.serve.decoder import (Block, Decoder, DenseLinear, Int4Linear, MarlinInt4Linear, NF4Linear, Parallel,
                                   RMSNorm, unsupported_reason)


# How GPTQ int4 weights run on a CUDA device: "auto" takes Marlin where it can (symmetric GPTQ, tile
# sizes it covers, and the kernel compiled), with a tinygemm copy of small weights for one-row calls
# (ONE_ROW_TINYGEMM_BELOW_BYTES), and tinygemm otherwise; the others force one kernel.
INT4_KERNELS = ("auto", "marlin", "tinygemm")

# Marlin linears whose packed weight is smaller than this also get a tinygemm copy for calls of one
# row (decode at batch 1): at one row Marlin is slowest on small matrices (an 8B's q/k/v and o) and
# tinygemm faster there, while on the large ones the two are even (benchmarks/decode_variants.py;
# figures in benchmarks/results/). The copy costs those weights' bytes once more.
ONE_ROW_TINYGEMM_BELOW_BYTES = 16 * 2**20

# tinygemm's supported quantization group sizes and inner K tiles (aten/src/ATen/native/cuda/int4mm.cu).
TINYGEMM_GROUP_SIZES = (32, 64, 128, 256)
TINYGEMM_INNER_K_TILES = (8, 4, 2)


class WeightFormatError(UserError):
    """A fused folder this loader cannot read (the message says which tensor or setting)."""


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files, on the CPU."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(str(folder / name)))
    return tensors


def pack_int32(values: torch.Tensor, dim: int) -> torch.Tensor:
    """The inverse of unpack_int32: 4-bit values (0..15) packed eight per int32 along `dim`."""
    values = values.to(torch.int32)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=values.device)
    if dim == 0:
        grouped = values.reshape(-1, 8, values.shape[1]) << shifts.view(1, 8, 1)
        return _or_reduce(grouped, 1)
    grouped = values.reshape(values.shape[0], -1, 8) << shifts.view(1, 1, 8)
    return _or_reduce(grouped, 2)


def _or_reduce(values: torch.Tensor, dim: int) -> torch.Tensor:
    result = values.select(dim, 0).clone()
    for index in range(1, values.shape[dim]):
        result |= values.select(dim, index)
    return result


def unpack_int32(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """Eight 4-bit values per int32, lowest bits first, spread along `dim` (0 or 1)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    if dim == 0:
        values = (packed.unsqueeze(1) >> shifts.view(1, 8, 1)) & 0xF  # [rows, 8, cols]
        return values.reshape(-1, packed.shape[1])
    values = (packed.unsqueeze(2) >> shifts.view(1, 1, 8)) & 0xF  # [rows, cols, 8]
    return values.reshape(packed.shape[0], -1)


def gptq_dequantize(qweight, qzeros, scales, g_idx) -> torch.Tensor:
    """The dense weight [out, in] (fp32) of one GPTQ v1 linear."""
    q = unpack_int32(qweight, 0).float()  # [in, out]
    zeros = unpack_int32(qzeros, 1).float() + 1  # v1 format stores zero - 1
    groups = g_idx.long()
    return ((q - zeros[groups]) * scales.float()[groups]).t().contiguous()


def _one_column_order(g_indices: list[torch.Tensor], group_size: int) -> bool:
    """Whether GPTQ linears sharing one input read it in one column order: consecutive groups, or
    one activation order for all (GPTQ's desc_act gives the linears of one input, which share a
    Hessian, one order)."""
    if not any(marlin.act_order(g, group_size) for g in g_indices):
        return True
    return all(torch.equal(g, g_indices[0]) for g in g_indices[1:])


def gptq_to_tinygemm(linears: list[tuple[torch.Tensor, ...]], group_size: int, device, *,
                     prompt_copy: bool = True) -> Int4Linear | None:
    """Repack GPTQ linears sharing one input (qweight, qzeros, scales, g_idx each) as one Int4Linear
    whose outputs are theirs concatenated, for aten._weight_int4pack_mm; None if tinygemm cannot
    hold them. `prompt_copy`: also keep the layout that prompts dequantize from (Int4Linear).
    The unpacking runs on `device`: seconds on a GPU for an 8B model, minutes on a few cores."""
    if not _one_column_order([part[3] for part in linears], group_size):
        return None  # act-order linears in different column orders cannot share one input
    values, scales, zeros, orders = [], [], [], []
    for qweight, qzeros, scale, g_idx in linears:
        qweight, qzeros, scale, g_idx = (t.to(device) for t in (qweight, qzeros, scale, g_idx))
        q = unpack_int32(qweight, 0).t()  # [out, in], values 0..15
        order = None
        if marlin.act_order(g_idx, group_size):
            # Act-order GPTQ: sort the input columns by group; the activations are permuted to match.
            order = torch.argsort(g_idx.long(), stable=True)
            if marlin.act_order(g_idx[order], group_size):
                return None  # groups of unequal size: not expressible as contiguous groups
            q = q[:, order]
        values.append(q)
        zero_points = unpack_int32(qzeros, 1).float() + 1  # [groups, out]; v1 stores zero - 1
        scales.append(scale.float())
        # tinygemm computes w = (q - 8) * scale + zero; GPTQ's (q - zp) * scale is that with zero = (8 - zp) * scale.
        zeros.append((8 - zero_points) * scale.float())
        orders.append(order)
    q = torch.cat(values).contiguous()
    out_features, in_features = q.shape
    inner_k_tiles = next((t for t in TINYGEMM_INNER_K_TILES if in_features % (t * 16) == 0), None)
    if group_size not in TINYGEMM_GROUP_SIZES or inner_k_tiles is None or out_features % 8:
        return None
    scales_and_zeros = torch.stack([torch.cat(scales, 1), torch.cat(zeros, 1)], dim=-1).to(torch.bfloat16).contiguous()
    pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack(pairs, inner_k_tiles)
    packed_columns = pack_int32(q.t().contiguous(), 0) if prompt_copy else None
    return Int4Linear(packed, packed_columns, scales_and_zeros, group_size, out_features, orders[0])


def gptq_to_marlin(linears: list[tuple[torch.Tensor, ...]], group_size: int, device) -> MarlinInt4Linear | None:
    """GPTQ linears sharing one input as one MarlinInt4Linear (outputs concatenated); None where
    Marlin cannot hold them: zero points other than 8 (asymmetric GPTQ), act-order linears in
    different column orders, or shapes off its tiles."""
    qweights, scales, orders = [], [], []
    for qweight, qzeros, scale, g_idx in linears:
        if not bool((unpack_int32(qzeros, 1) == 7).all()):  # v1 stores zero - 1: symmetric is 8
            return None
        qweights.append(qweight)
        scales.append(scale)
        orders.append(g_idx)
    in_features = qweights[0].shape[0] * 8
    if not _one_column_order(orders, group_size):
        return None
    qweight, scale = torch.cat(qweights, 1), torch.cat(scales, 1)
    if not marlin.fits(in_features, qweight.shape[1], group_size):
        return None
    packed, permuted_scales, g_idx, perm = marlin.repack(qweight.to(device), scale.to(device), orders[0].to(device),
                                                         group_size)
    return MarlinInt4Linear(packed, permuted_scales, g_idx, perm, qweight.shape[1])


def _gptq_on_cuda(parts: list[tuple[torch.Tensor, ...]], group_size: int, device, int4_kernel: str) -> nn.Module | None:
    """GPTQ linears sharing one input on the fastest int4 kernel that holds them (one fused module,
    or one per linear), or None if none does (they are then dequantized to 16 bits). Under "auto",
    a small fused Marlin linear runs its one-row calls on tinygemm (ONE_ROW_TINYGEMM_BELOW_BYTES)."""
    if int4_kernel == "marlin":
        marlin.ops()  # raises MarlinUnavailable, with the reason
        converters = (gptq_to_marlin,)
    elif int4_kernel == "auto" and marlin.unavailable_reason() is None:
        converters = (gptq_to_marlin, gptq_to_tinygemm)
    else:
        converters = (gptq_to_tinygemm,)
    for convert in converters:
        fused = convert(parts, group_size, device)
        if fused is None and len(parts) > 1:
            singles = [convert([part], group_size, device) for part in parts]
            fused = Parallel(singles) if all(singles) else None
        if fused is not None:
            if (int4_kernel == "auto" and isinstance(fused, MarlinInt4Linear)
                    and fused.packed.nbytes < ONE_ROW_TINYGEMM_BELOW_BYTES):
                fused.one_row = gptq_to_tinygemm(parts, group_size, device, prompt_copy=False)
            return fused
    return None


def _bnb_weight(tensors: dict, name: str, device):
    import bitsandbytes as bnb

    prefix = f"{name}.weight."
    stats = {key[len(prefix):]: tensors.pop(key) for key in [k for k in tensors if k.startswith(prefix)]}
    return bnb.nn.Params4bit.from_prequantized(data=tensors.pop(f"{name}.weight"), quantized_stats=stats,
                                               requires_grad=False, device=device)


def _projection(tensors: dict, names: list[str], quant: dict | None, dtype, device, int4_kernel: str) -> nn.Module:
    """The linears `names` (one input, outputs concatenated) as the fastest module this device has
    for their stored format; tensors are popped as they are used."""
    for name in names:
        if not any(f"{name}.{key}" in tensors for key in ("weight", "qweight")):
            raise WeightFormatError(f"tensor {name}.weight is missing")
    method = (quant or {}).get("quant_method")
    if method == "gptq" and f"{names[0]}.qweight" in tensors:
        parts = [tuple(tensors.pop(f"{name}.{key}") for key in ("qweight", "qzeros", "scales", "g_idx")) for name in names]
        if device.type == "cuda" and dtype == torch.bfloat16:
            fused = _gptq_on_cuda(parts, quant["group_size"], device, int4_kernel)
            if fused is not None:
                return fused
        return DenseLinear(torch.cat([gptq_dequantize(*part) for part in parts]).to(device=device, dtype=dtype))
    if method == "bitsandbytes" and f"{names[0]}.weight.quant_state.bitsandbytes__{quant_type(tensors, names[0])}" in tensors:
        import bitsandbytes as bnb

        weights = [_bnb_weight(tensors, name, device) for name in names]
        if device.type == "cuda":
            return NF4Linear(weights[0]) if len(weights) == 1 else Parallel([NF4Linear(w) for w in weights])
        dense = [bnb.functional.dequantize_4bit(w.data, w.quant_state) for w in weights]
        return DenseLinear(torch.cat(dense).to(dtype=dtype))
    return DenseLinear(torch.cat([tensors.pop(f"{name}.weight") for name in names]).to(device=device, dtype=dtype))


def quant_type(tensors: dict, name: str) -> str:
    """'nf4' or 'fp4': bitsandbytes records it in the name of a weight's quant-state tensor."""
    return "fp4" if f"{name}.weight.quant_state.bitsandbytes__fp4" in tensors else "nf4"


def check_gptq_settings(quant: dict) -> None:
    if quant.get("bits") != 4:
        raise WeightFormatError(f"GPTQ bits {quant.get('bits')}: the serving decoder reads 4-bit GPTQ only")
    if quant.get("checkpoint_format", quant.get("format", "gptq")) != "gptq" or quant.get("pack_dtype", "int32") != "int32":
        raise WeightFormatError(f"GPTQ checkpoint format {quant.get('checkpoint_format')!r} / pack dtype "
                                f"{quant.get('pack_dtype')!r}: expected 'gptq' / 'int32'")


def load_decoder(folder: Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                 int4_kernel: str = "auto") -> Decoder:
    """The Decoder for a fused folder, weights on `device`. Raises WeightFormatError if the
    folder's architecture or format is not one the decoder reproduces exactly. `int4_kernel`: one of
    INT4_KERNELS, for GPTQ weights on CUDA."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder))
    reason = unsupported_reason(config)
    if reason:
        raise WeightFormatError(f"{folder.name}: the fast decoder does not support {reason}")
    quant = getattr(config, "quantization_config", None)
    quant = quant if isinstance(quant, dict) or quant is None else quant.to_dict()
    if quant and quant.get("quant_method") == "gptq":
        check_gptq_settings(quant)
    return build_decoder(config, read_tensors(folder), quant, device=torch.device(device), dtype=dtype,
                         int4_kernel=int4_kernel)


def build_decoder(config, tensors: dict[str, torch.Tensor], quant: dict | None, *, device: torch.device,
                  dtype: torch.dtype, int4_kernel: str = "auto") -> Decoder:
    """The Decoder from a transformers-layout state dict (consumed: tensors are popped as used)."""
    if int4_kernel not in INT4_KERNELS:
        raise ValueError(f"int4_kernel {int4_kernel!r}: expected one of {', '.join(INT4_KERNELS)}")
    prefix = "model."

    def dense(name: str) -> torch.Tensor:
        if name not in tensors:
            raise WeightFormatError(f"tensor {name} is missing")
        return tensors.pop(name).to(device=device, dtype=dtype)

    blocks = []
    for index in range(config.num_hidden_layers):
        layer = f"{prefix}layers.{index}"
        attention, mlp = f"{layer}.self_attn", f"{layer}.mlp"
        projections = [_projection(tensors, names, quant, dtype, device, int4_kernel) for names in (
            [f"{attention}.q_proj", f"{attention}.k_proj", f"{attention}.v_proj"], [f"{attention}.o_proj"],
            [f"{mlp}.gate_proj", f"{mlp}.up_proj"], [f"{mlp}.down_proj"])]
        norms = (RMSNorm(dense(f"{layer}.input_layernorm.weight"), config.rms_norm_eps),
                 RMSNorm(dense(f"{layer}.post_attention_layernorm.weight"), config.rms_norm_eps))
        blocks.append(Block(*projections, norms, config))
    embed = dense(f"{prefix}embed_tokens.weight")
    lm_head = DenseLinear(embed if config.tie_word_embeddings else dense("lm_head.weight"))
    norm = RMSNorm(dense(f"{prefix}norm.weight"), config.rms_norm_eps)
    return Decoder(config, embed, blocks, norm, lm_head).eval()
