"""A compact Llama-family decoder with a static KV cache, for serving fused models fast.

transformers' generate() spends most of a decode step in Python and small kernel launches (the
best plain setup in research/gpu-anchors.md reaches 18 % of the int4 bandwidth floor). This module
is the gpt-fast recipe instead: fixed-shape buffers for the KV cache, one forward per step whose
shapes never change, so that on CUDA the step is compiled and captured once as a CUDA graph
(serve/engine.py) and replayed for every token.

The weights come from the fused folders as written (serve/weights.py): bf16 weights are used as
they are, GPTQ int4 weights are repacked at load time for GPTQModel's Marlin kernel or torch's int4
matmul (tinygemm) on CUDA, and
bitsandbytes NF4 weights stay NF4 and go through bitsandbytes' 4-bit matmul. On the CPU the 4-bit
weights are dequantized once at load time (the same values, exactly), so tests exercise the same
decoder on any machine.

Only the architectures whose computation this module reproduces exactly are accepted
(`supported(config)`); everything else is served by transformers (serve/engine.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qlora_ray.marlin import marlin_int4_mm

SUPPORTED_MODEL_TYPES = ("llama",)


def unsupported_reason(config) -> str | None:
    """Why this decoder cannot run a model with this transformers config, or None if it can."""
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {config.model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "biased attention or MLP projections"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r}"
    return None


class DenseLinear(nn.Module):
    """y = x W^T with a 16-bit W of shape [out, in]."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


# Above this many rows (prompt tokens) an int4 matmul dequantizes its weight and runs a 16-bit
# matmul: tinygemm is built for decode's few rows and is about ten times slower than bf16 on a long
# prompt (figures in benchmarks/results/).
DEQUANTIZE_ABOVE_ROWS = 32


@torch.compile(dynamic=False)
def _dequantize_columns(packed_columns: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """W^T [in, out] in bf16 from 4-bit values packed eight per int32 along `in` ([in/8, out]),
    w = (q - 8) * scale + zero per group of `group_size` input rows. Compiled: one fused kernel."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed_columns.device)
    q = ((packed_columns.unsqueeze(1) >> shifts.view(1, 8, 1)) & 0xF).reshape(-1, packed_columns.shape[1])
    groups = scales_and_zeros.shape[0]
    q = q.view(groups, group_size, -1).to(torch.bfloat16)
    w = (q - 8) * scales_and_zeros[:, None, :, 0] + scales_and_zeros[:, None, :, 1]
    return w.reshape(groups * group_size, -1)


class Int4Linear(nn.Module):
    """y = x W^T with W in torch's tinygemm int4 layout (CUDA, bf16 activations).

    `packed` comes from aten._convert_weight_to_int4pack; `scales_and_zeros` is [in/group, out, 2]
    with tinygemm's convention w = (q - 8) * scale + zero. `column_order` (act-order GPTQ) permutes
    the input columns so that every quantization group is contiguous, as tinygemm requires.
    `packed_columns` holds the same 4-bit values eight per int32 along the input ([in/8, out]), which
    a fused kernel dequantizes quickly for prompts (DEQUANTIZE_ABOVE_ROWS); it doubles the int4 bytes.
    Without it (a Marlin linear's one-row companion, which sees no prompts) every call runs tinygemm.
    """

    def __init__(self, packed: torch.Tensor, packed_columns: torch.Tensor | None, scales_and_zeros: torch.Tensor,
                 group_size: int, out_features: int, column_order: torch.Tensor | None):
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("packed_columns", packed_columns)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.register_buffer("column_order", column_order)
        self.group_size = group_size
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.column_order is not None:
            x = x.index_select(-1, self.column_order)
        flat = x.reshape(-1, x.shape[-1])
        if self.packed_columns is not None and flat.shape[0] > DEQUANTIZE_ABOVE_ROWS:
            y = flat @ _dequantize_columns(self.packed_columns, self.scales_and_zeros, self.group_size)
        else:
            y = torch.ops.aten._weight_int4pack_mm(flat, self.packed, self.group_size, self.scales_and_zeros)
        return y.reshape(*x.shape[:-1], self.out_features)


class MarlinInt4Linear(nn.Module):
    """y = x W^T with W packed for GPTQModel's Marlin kernel (marlin.py), for prompts and
    decode alike: Marlin is a GEMM, fast at one row and at hundreds.

    `one_row`, if given, holds the same weight for tinygemm and runs the calls of exactly one row
    (decode at batch 1): on small weights Marlin's one-row call is the slower of the two (see
    serve/weights.py, ONE_ROW_TINYGEMM_BELOW_BYTES)."""

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, perm: torch.Tensor,
                 out_features: int, one_row: Int4Linear | None = None):
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.register_buffer("g_idx", g_idx)
        self.register_buffer("perm", perm)
        self.out_features = out_features
        self.one_row = one_row

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.one_row is not None and x.numel() == x.shape[-1]:
            return self.one_row(x)
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        y = marlin_int4_mm(flat, self.packed, self.scales, self.g_idx, self.perm, self.out_features)
        return y.reshape(*x.shape[:-1], self.out_features)


class Parallel(nn.Module):
    """Several projections of one input, concatenated: for weights that cannot be fused into one
    matrix (bitsandbytes 4-bit states are per tensor)."""

    def __init__(self, linears: list[nn.Module]):
        super().__init__()
        self.linears = nn.ModuleList(linears)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([linear(x) for linear in self.linears], dim=-1)


class NF4Linear(nn.Module):
    """y = x W^T with W a bitsandbytes 4-bit parameter (NF4 or FP4, with its quant state)."""

    def __init__(self, weight):
        super().__init__()
        self.weight = weight  # bitsandbytes Params4bit, kept as bitsandbytes packed it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        return bnb.matmul_4bit(x, self.weight.t(), quant_state=self.weight.quant_state)


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As transformers' LlamaRMSNorm: normalize in fp32, scale in the model's dtype.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def grouped_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                             mask: torch.Tensor) -> torch.Tensor:
    """Attention for one new token per row: q [B, heads, 1, d] over keys/values [B, kv_heads, S, d],
    mask [B, 1, 1, S] (True: may attend); returns [B, heads, 1, d].

    The query heads that share a key head are the rows of one matmul against it, so K and V are read
    as they are, never repeated per query head. Scores are scaled and soft-maxed in fp32. Against
    SDPA (which Inductor runs as cuDNN's attention) it is a little faster at batch 1, the latency
    target, and a little slower at batch 8 (benchmarks/results/)."""
    batch, heads, _, head_dim = q.shape
    kv_heads = keys.shape[1]
    rows = q.reshape(batch, kv_heads, heads // kv_heads, head_dim)
    scores = (rows @ keys.transpose(-1, -2)).float() * head_dim ** -0.5  # [B, kv_heads, group, S]
    scores = scores.masked_fill(~mask, float("-inf"))  # mask [B, 1, 1, S] broadcasts over heads and group
    weights = torch.softmax(scores, dim=-1).to(values.dtype)
    return (weights @ values).reshape(batch, heads, 1, head_dim)


class Block(nn.Module):
    """One decoder layer: attention over the static cache, then the SwiGLU MLP."""

    def __init__(self, qkv_proj: nn.Module, o_proj: nn.Module, gate_up_proj: nn.Module, down_proj: nn.Module,
                 norms: tuple[RMSNorm, RMSNorm], config):
        """qkv_proj maps hidden to q, k and v concatenated; gate_up_proj to gate and up: one matmul
        where a model has three (or two) reads the activations once and launches fewer kernels."""
        super().__init__()
        self.qkv_proj, self.o_proj, self.gate_up_proj, self.down_proj = qkv_proj, o_proj, gate_up_proj, down_proj
        self.input_layernorm, self.post_attention_layernorm = norms
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.intermediate = config.intermediate_size
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, x, pending, cos, sin, positions, mask, rows=None):
        """x [B, T, hidden] is the residual stream before the previous layer's MLP output `pending`
        (same shape; zeros for the first layer) is added; returns this layer's (x, pending).
        Adding a layer's output at the start of the next one puts the add in the same fused kernel as
        the next RMSNorm (when each layer is compiled on its own), one kernel fewer per layer.
        cos/sin [B, T, head_dim]; positions [B, T]: each token's position, which is also the cache
        slot it is written to (every row starts at slot 0); mask [B, 1, T, S]: attention reads the
        first S slots. rows: None for a decode step over the cache's first B rows (views, no copy);
        else [B] the cache rows a prompt (chunk) is written to and read from."""
        x = x + pending
        batch, steps, _ = x.shape
        h = self.input_layernorm(x)
        q, k, v = self.qkv_proj(h).split(
            [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], dim=-1)
        q = q.view(batch, steps, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, steps, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, steps, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        seen = mask.shape[-1]
        if rows is None:
            key_rows, value_rows = self.k_cache[:batch], self.v_cache[:batch]
            index = positions[:, None, :, None].expand(batch, self.kv_heads, steps, self.head_dim)
            key_rows.scatter_(2, index, k)
            value_rows.scatter_(2, index, v)
            keys, values = key_rows[:, :, :seen], value_rows[:, :, :seen]
        else:
            heads = torch.arange(self.kv_heads, device=x.device)
            where = (rows[:, None, None], heads[None, :, None], positions[:, None, :])
            self.k_cache.index_put_(where, k)
            self.v_cache.index_put_(where, v)
            keys = self.k_cache[:, :, :seen].index_select(0, rows)
            values = self.v_cache[:, :, :seen].index_select(0, rows)
        if steps == 1:
            attended = grouped_decode_attention(q, keys, values, mask)
        else:
            # Prompts: SDPA (its fused kernels on long prompts; with a mask and grouped-query heads,
            # its math path, which Inductor fuses).
            attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                      enable_gqa=self.heads != self.kv_heads)
        x = x + self.o_proj(attended.transpose(1, 2).reshape(batch, steps, self.heads * self.head_dim))
        h = self.post_attention_layernorm(x)
        gate, up = self.gate_up_proj(h).split(self.intermediate, dim=-1)
        return x, self.down_proj(F.silu(gate) * up)


class Decoder(nn.Module):
    """The whole model over a static KV cache of rows (one per sequence) by positions."""

    def __init__(self, config, embed: torch.Tensor, blocks: list[Block], norm: RMSNorm, lm_head: nn.Module):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Parameter(embed, requires_grad=False)
        self.layers = nn.ModuleList(blocks)
        self.norm = norm
        self.lm_head = lm_head
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        # transformers' own rotary module, so every rope scaling it knows (llama3, yarn, ...) is right.
        self.rotary = LlamaRotaryEmbedding(config).to(embed.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    def reserve_cache(self, rows: int, context: int) -> None:
        """Give every layer a KV cache of `rows` rows by `context` positions: a row per sequence,
        each starting at slot 0, and one spare position past the context that is never read, where
        the padding of prompts prefilled together may write. Allocated once and kept, since a CUDA
        graph captured over the cache must find the same tensors again; asking for another size
        replaces it (graphs captured over the old one must then be dropped)."""
        first = self.layers[0]
        shape = (rows, first.kv_heads, context + 1, first.head_dim)
        if first.k_cache is not None and tuple(first.k_cache.shape) == shape:
            return
        for layer in self.layers:
            layer.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            layer.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)

    def cache_bytes(self) -> int:
        return sum(layer.k_cache.nbytes + layer.v_cache.nbytes for layer in self.layers if layer.k_cache is not None)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor | None = None,
                layers=None, last: torch.Tensor | None = None):
        """Next-token logits [B, vocab] (fp32) after tokens [B, T] at positions [B, T] (also the
        cache slots they are written to); mask [B, 1, T, S] says which of the first S slots each
        token may attend to; rows: None for a decode step over the cache's first B rows, else the
        cache row of each prompt (Block.forward). Only each row's last token (`last` [B], its index
        in a row padded past it; default T - 1) goes through the LM head: a prompt's other logits
        are never used. `layers`: callables standing in for self.layers (their compiled versions)."""
        x = F.embedding(tokens, self.embed_tokens)
        cos, sin = self.rotary(x, positions)
        # Zeros, not None, for the first layer: every layer then has one signature, and compiles once.
        pending = torch.zeros_like(x)
        for layer in layers or self.layers:
            x, pending = layer(x, pending, cos, sin, positions, mask, rows)
        if last is None:
            x, pending = x[:, -1], pending[:, -1]
        else:
            picked = torch.arange(x.shape[0], device=x.device)
            x, pending = x[picked, last], pending[picked, last]
        return self.lm_head(self.norm(x + pending)).float()
