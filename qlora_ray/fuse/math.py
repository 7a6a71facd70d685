"""The merge arithmetic of the fuse stage: pure functions over tensors (no I/O, no Ray, no bitsandbytes).

    W' = W + scaling · B @ A        scaling = alpha / r, or alpha / sqrt(r) with rsLoRA

computed in float32 and cast back to the base's dtype once. The rank and alpha of each module
follow peft's `rank_pattern` / `alpha_pattern` (matched with peft's own `get_pattern_key`), so the
result equals peft's `merge_and_unload` on the same weights (tests/unit/test_fuse_math.py checks it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from peft.utils.other import get_pattern_key

PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraDelta:
    """One module's LoRA factors and scale, addressed by the base weight they update.

    Linear:    lora_a (r, in),  lora_b (out, r),  delta = scaling · B @ A        -> (out, in)
    Embedding: lora_a (r, vocab), lora_b (dim, r), delta = scaling · (B @ A)^T  -> (vocab, dim)
    """

    weight_name: str
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float
    embedding: bool = False
    fan_in_fan_out: bool = False
    # peft saves a targeted embedding's full weight too (save_embedding_layers); loading the adapter
    # puts it in place of the base's, so the merge starts from it.
    base_override: torch.Tensor | None = None


def lora_scaling(alpha: float, r: int, *, use_rslora: bool) -> float:
    if r <= 0:
        raise ValueError(f"LoRA rank must be positive (got {r})")
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def module_rank_alpha(module_path: str, config: dict) -> tuple[int, float]:
    """The (r, alpha) peft gives the module at module_path, honouring rank_pattern and alpha_pattern."""
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module_path), config["r"])
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module_path), config["lora_alpha"])
    return int(r), float(alpha)


def delta_weight(delta: LoraDelta) -> torch.Tensor:
    """scaling · B @ A in float32, shaped like the base weight it updates."""
    product = delta.lora_b.float() @ delta.lora_a.float()
    if delta.embedding or delta.fan_in_fan_out:
        product = product.T
    return product * delta.scaling


def check_fits(delta: LoraDelta, base_shape: tuple[int, ...]) -> None:
    """Raise ValueError naming the weight when the factors do not fit a base weight of base_shape
    (an adapter trained for another model, or a rank that does not match its config)."""
    a, b = delta.lora_a, delta.lora_b
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise ValueError(f"{delta.weight_name}: LoRA factors do not chain: A {tuple(a.shape)}, B {tuple(b.shape)}")
    base_shape = tuple(base_shape)
    if delta.base_override is not None and tuple(delta.base_override.shape) != base_shape:
        raise ValueError(f"{delta.weight_name}: the adapter carries a weight of shape "
                         f"{tuple(delta.base_override.shape)} for a base weight of {base_shape} "
                         "(a resized vocabulary cannot be fused)")
    expected = (a.shape[1], b.shape[0]) if (delta.embedding or delta.fan_in_fan_out) else (b.shape[0], a.shape[1])
    if base_shape != expected:
        raise ValueError(
            f"{delta.weight_name}: the adapter expects a weight of shape {expected} but the base has "
            f"{base_shape}; was the adapter trained for another base model?"
        )


def fuse_weight(base: torch.Tensor, delta: LoraDelta) -> torch.Tensor:
    """The merged weight, computed in float32 and cast back to base.dtype once (on base's device).

    Raises ValueError naming the weight when the factors do not fit the base.
    """
    check_fits(delta, tuple(base.shape))
    if delta.base_override is not None:
        base = delta.base_override.to(device=base.device, dtype=base.dtype)
    if delta.lora_b.device != base.device:  # merge where the base weight lives (the GPU, on a GPU worker)
        delta = replace(delta, lora_a=delta.lora_a.to(base.device), lora_b=delta.lora_b.to(base.device))
    update = delta_weight(delta)
    return (base.float() + update).to(base.dtype)


def adapter_deltas(adapter_state: dict[str, torch.Tensor], config: dict) -> dict[str, LoraDelta]:
    """Group a PEFT adapter's tensors into one LoraDelta per base weight name.

    adapter_state is the content of adapter_model.safetensors; config that of adapter_config.json.
    Raises ValueError for tensors this merge cannot apply (biases, DoRA magnitudes, modules_to_save,
    unpaired factors), so nothing is silently dropped.
    """
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"only LoRA adapters can be fused (this one is {config.get('peft_type')})")
    if config.get("use_dora"):
        raise ValueError("DoRA adapters cannot be fused by a plain LoRA merge")
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in adapter_state.items():
        module, kind = _split_key(key)
        factors.setdefault(module, {})[kind] = tensor
    deltas = {}
    for module, parts in sorted(factors.items()):
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a = parts.get("lora_embedding_A" if embedding else "lora_A")
        b = parts.get("lora_embedding_B" if embedding else "lora_B")
        override = parts.pop("base_layer", None)
        if override is not None and not embedding:
            raise ValueError(f"{module}: only embeddings may carry their full weight in an adapter")
        if a is None or b is None or len(parts) != 2:
            raise ValueError(f"{module}: expected one A and one B LoRA factor, found {sorted(parts)}")
        r, alpha = module_rank_alpha(module, config)
        if a.shape[0] != r:
            raise ValueError(f"{module}: factor rank {a.shape[0]} does not match the config's r={r}")
        deltas[f"{module}.weight"] = LoraDelta(
            weight_name=f"{module}.weight", lora_a=a, lora_b=b,
            scaling=lora_scaling(alpha, r, use_rslora=bool(config.get("use_rslora"))),
            embedding=embedding, fan_in_fan_out=bool(config.get("fan_in_fan_out")) and not embedding,
            base_override=override,
        )
    return deltas


_KINDS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "base_layer")


def _split_key(key: str) -> tuple[str, str]:
    """'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' -> ('model.layers.0.self_attn.q_proj', 'lora_A')."""
    name = key.removeprefix(PEFT_PREFIX)
    for kind in _KINDS:
        for suffix in (f".{kind}.weight", f".{kind}"):
            if name.endswith(suffix):
                return name[: -len(suffix)], kind
    raise ValueError(f"{key}: not a LoRA factor this merge understands (biases, DoRA and modules_to_save are not)")
