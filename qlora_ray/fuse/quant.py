"""4-bit arithmetic of the fuse stage, through bitsandbytes: the same quantizer QLoRA trained with.

Two uses:
- the nf4-dequantized merge base: dequantize(quantize(W)), the exact weight a QLoRA adapter saw
  during training (transformers' load_in_4bit quantizes every Linear this way when it loads);
- the `nf4` scheme: a merged weight quantized and written as the tensors bitsandbytes' Linear4bit
  puts in its state_dict, which transformers' 4-bit loader reads back with no extra code.

Both work one tensor at a time, so the fuse stage can apply them shard by shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# bitsandbytes' Params4bit default, and so what transformers' load_in_4bit used during training.
BLOCKSIZE = 64


@dataclass(frozen=True)
class FourBit:
    """A bitsandbytes 4-bit format: the tenant's training quantization, or the nf4 scheme's."""

    quant_type: str = "nf4"  # "nf4" | "fp4"
    double_quant: bool = True  # quantize the per-block scales too (QLoRA's "double quantization")

    def quantization_config(self) -> dict:
        """The config.json `quantization_config` transformers needs to load weights in this format."""
        from transformers import BitsAndBytesConfig

        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_quant_storage=torch.uint8,
        )
        return config.to_dict()


def quantize_4bit(weight: torch.Tensor, fmt: FourBit):
    """(packed uint8 of shape (numel/2, 1), QuantState), exactly as Params4bit quantizes a weight."""
    import bitsandbytes.functional as bnbf

    return bnbf.quantize_4bit(
        weight.contiguous(), blocksize=BLOCKSIZE, compress_statistics=fmt.double_quant,
        quant_type=fmt.quant_type, quant_storage=torch.uint8,
    )


def trained_format(adapter_manifest: dict, default_quantization: str, default_double_quant: bool) -> FourBit | None:
    """The 4-bit format an adapter was trained against (None: a 16-bit LoRA), as its manifest
    records it (inputs.training, written by the train stage), so that a job file edited since
    training cannot change the base it is merged into or evaluated on. An adapter put in the store
    by hand has no record: the job file's settings (the defaults) are all there is. A record that
    names no known format is refused (ValueError)."""
    recorded = (adapter_manifest.get("inputs") or {}).get("training")
    recorded = recorded if isinstance(recorded, dict) else {}
    quantization = recorded.get("quantization", default_quantization)
    double_quant = recorded.get("double_quant", default_double_quant)
    if quantization not in ("nf4", "fp4", "none") or not isinstance(double_quant, bool):
        raise ValueError(f"the adapter's manifest records training quantization {quantization!r} and double_quant "
                         f"{double_quant!r}; expected nf4, fp4 or none, and true or false")
    return None if quantization == "none" else FourBit(quantization, double_quant)


def roundtrip_4bit(weight: torch.Tensor, fmt: FourBit) -> torch.Tensor:
    """dequantize(quantize(weight)) in weight.dtype: the weight a QLoRA adapter was trained against."""
    import bitsandbytes.functional as bnbf

    packed, state = quantize_4bit(weight, fmt)
    return bnbf.dequantize_4bit(packed, state).to(weight.dtype)


def serialize_4bit(name: str, weight: torch.Tensor, fmt: FourBit) -> dict[str, torch.Tensor]:
    """The state_dict entries of a Linear4bit holding `weight`, keyed from the weight's name.

    name is 'model.layers.0.self_attn.q_proj.weight'; the result holds it (packed) plus
    name.absmax, name.quant_map, name.quant_state.bitsandbytes__nf4 and, with double
    quantization, name.nested_absmax and name.nested_quant_map (Linear4bit._save_to_state_dict).
    """
    packed, state = quantize_4bit(weight, fmt)
    tensors = {name: packed}
    for key, value in state.as_dict(packed=True).items():
        # every state shares one quant_map tensor; safetensors refuses shared storage in a file
        tensors[f"{name}.{key}"] = value.clone()
    return tensors


def quantized_weight_names(config) -> frozenset[str]:
    """Names of the weights transformers' 4-bit loader quantizes for a model of this config.

    Built on the meta device (no memory, no weights) and converted by transformers' own
    replace_with_bnb_linear with its own skip list (lm_head, tied and fp32-kept modules), so the
    set is exactly the one load_in_4bit would quantize, for any architecture.
    """
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.integrations import replace_with_bnb_linear
    from transformers.quantizers.auto import AutoHfQuantizer

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    quantizer = AutoHfQuantizer.from_config(BitsAndBytesConfig(load_in_4bit=True))
    skip = quantizer.get_modules_to_not_convert(model, None, model._keep_in_fp32_modules)
    model = replace_with_bnb_linear(model, modules_to_not_convert=skip,
                                    quantization_config=quantizer.quantization_config, pre_quantized=False)
    return frozenset(f"{name}.weight" for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit))
