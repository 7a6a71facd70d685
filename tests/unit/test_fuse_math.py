"""The merge math against peft's own merge_and_unload, on tiny models built from a config."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from transformers import LlamaConfig, LlamaForCausalLM

from qlora_ray.fuse.math import LoraDelta, adapter_deltas, fuse_weight, lora_scaling, module_rank_alpha

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(dtype=torch.float32, tied=False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(config).to(dtype)


def adapter_copy(peft_model) -> dict:
    """The adapter's tensors as saved (cloned: merge_and_unload later changes the live ones in place)."""
    return {k: v.clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def merge_ours(base_state: dict, adapter_state: dict, config: dict) -> dict:
    deltas = adapter_deltas(adapter_state, config)
    merged = dict(base_state)
    for name, delta in deltas.items():
        merged[name] = fuse_weight(base_state[name], delta)
    return merged


# alpha != r everywhere: with alpha == r the scaling is 1 and a missing factor would go unnoticed.
CASES = {
    "alpha-ne-r": dict(r=4, lora_alpha=16),
    "rslora": dict(r=8, lora_alpha=16, use_rslora=True),
    "patterns": dict(r=4, lora_alpha=8, rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
                     alpha_pattern={"v_proj": 32}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fuse_equals_peft_merge_and_unload(case, dtype):
    base = tiny_llama(dtype)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    peft_model = get_peft_model(base, LoraConfig(target_modules=TARGETS, init_lora_weights=False, **CASES[case]))
    adapter_state = adapter_copy(peft_model)
    config = peft_model.peft_config["default"].to_dict()
    reference = peft_model.merge_and_unload().state_dict()

    ours = merge_ours(base_state, adapter_state, config)
    assert ours.keys() == reference.keys()
    changed = 0
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], rtol=0, atol=0)  # same fp32 math, same cast
        changed += not torch.equal(ours[name], base_state[name])
    assert changed == 2 * len(TARGETS)  # every adapted weight moved, nothing else did


def test_patterns_pick_the_rank_and_alpha_peft_picks():
    config = {"r": 4, "lora_alpha": 8, "rank_pattern": {"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
              "alpha_pattern": {"v_proj": 32}}
    assert module_rank_alpha("model.layers.0.self_attn.q_proj", config) == (2, 8.0)
    assert module_rank_alpha("model.layers.1.mlp.down_proj", config) == (6, 8.0)
    assert module_rank_alpha("model.layers.0.mlp.down_proj", config) == (4, 8.0)
    assert module_rank_alpha("model.layers.0.self_attn.v_proj", config) == (4, 32.0)
    assert lora_scaling(16, 4, use_rslora=False) == 4.0
    assert lora_scaling(16, 4, use_rslora=True) == 8.0


def test_embedding_lora_on_tied_weights_matches_peft():
    """LoRA on the input embedding of a model whose lm_head shares it: the fused embedding (and so
    the tied head) equals peft's merge."""
    base = tiny_llama(tied=True)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=12, target_modules=["embed_tokens", "q_proj"],
                                                 init_lora_weights=False))
    adapter_state = adapter_copy(peft_model)
    merged = peft_model.merge_and_unload()
    reference = merged.state_dict()
    ours = merge_ours(base_state, adapter_state, peft_model.peft_config["default"].to_dict())
    torch.testing.assert_close(ours["model.embed_tokens.weight"], reference["model.embed_tokens.weight"],
                               rtol=0, atol=0)
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()  # still tied


def test_shape_mismatch_names_the_weight():
    delta = LoraDelta("model.layers.0.self_attn.q_proj.weight", torch.zeros(4, 32), torch.zeros(32, 4), 2.0)
    with pytest.raises(ValueError, match=r"q_proj.weight: the adapter expects a weight of shape \(32, 32\) but the base "
                                         r"has \(64, 64\); was the adapter trained for another base model\?"):
        fuse_weight(torch.zeros(64, 64), delta)
    with pytest.raises(ValueError, match="LoRA factors do not chain"):
        fuse_weight(torch.zeros(32, 32), LoraDelta("w", torch.zeros(4, 32), torch.zeros(32, 3), 1.0))


@pytest.mark.parametrize(
    "state, config, expected",
    [
        ({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 8)},
         {"r": 4, "lora_alpha": 8}, "expected one A and one B LoRA factor, found ['lora_A']"),
        ({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 8),
          "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(8, 2)},
         {"r": 4, "lora_alpha": 8}, "factor rank 2 does not match the config's r=4"),
        ({"base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias": torch.zeros(8)},
         {"r": 4, "lora_alpha": 8}, "not a LoRA factor this merge understands"),
        ({}, {"r": 4, "lora_alpha": 8, "use_dora": True}, "DoRA"),
        ({}, {"peft_type": "IA3"}, "only LoRA adapters can be fused"),
    ],
)
def test_adapters_the_merge_cannot_apply_are_refused(state, config, expected):
    with pytest.raises(ValueError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        adapter_deltas(state, config)
