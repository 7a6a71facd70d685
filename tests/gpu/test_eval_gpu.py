"""The eval stage's GPTQ loads on a GPU: a model with SmolLM2's widths (192-wide k/v projections,
which GPTQModel's first choice on Hopper, Machete, refuses) quantized by the fuse stage's own GPTQ
call, then loaded as the eval stage loads it: on the cluster's Marlin build, without GPTQModel
compiling its own.

Skipped without a CUDA GPU (CI has none); run on the lent H200 with `python -m pytest tests/gpu`.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from qlora_ray import marlin
from qlora_ray.bases import write_hf_folder
from qlora_ray.fuse.gptq import calibration_texts, gptq_quantize
from qlora_ray.quality.configs import GPTQ_MARLIN_PRECISION, EvalConfig, gptq_kernel, gptq_layer_shapes, load_config
from qlora_ray.shapes import byte_tokenizer, shape_config
from qlora_ray.spec import FusedVariant, GptqSpec
from tests.conftest import REPO

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_a_gptq_model_with_smollm2_widths_loads_for_eval_on_this_gpu(tmp_path, monkeypatch):
    gptqmodel_builds = tmp_path / "gptqmodel-builds"
    monkeypatch.setenv("GPTQMODEL_TORCH_EXTENSIONS_DIR", str(gptqmodel_builds))
    config = shape_config("smollm2-135m")
    config.num_hidden_layers = 2
    torch.manual_seed(0)
    merged = tmp_path / "merged"
    write_hf_folder(AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16), byte_tokenizer(), merged,
                    max_shard_size=10**10)
    rows = [json.loads(line) for line in (REPO / "jobs/data/dates/train.jsonl").read_text().splitlines()]
    texts = calibration_texts(rows, byte_tokenizer(), 16)
    out = tmp_path / "gptq"
    gptq_quantize(merged, out, texts, GptqSpec(group_size=64, calibration_samples=16), device="cuda")
    assert {(576, 192), (576, 576), (576, 1536), (1536, 576)} == gptq_layer_shapes(out)
    # as the eval stage does before its GPTQ rows
    assert marlin.prepare(None, share=False, precision=GPTQ_MARLIN_PRECISION) is None
    chosen = gptq_kernel(out, "cuda")
    assert chosen and "machete" not in chosen

    quantization_builds = set(gptqmodel_builds.rglob("*.so"))  # GPTQModel's own, built by the quantization
    loaded = load_config(EvalConfig("gptq-int4.original", "fused", "", FusedVariant("gptq-int4", "original")),
                         {"model": out}, "cuda")
    kernels = {name for name in loaded.module_types if name.startswith("gptqmodel.")}
    assert kernels and not any("Machete" in name for name in kernels), loaded.module_types
    if chosen == "gptq_marlin":  # GPTQModel used the ops the shared build registered
        assert set(gptqmodel_builds.rglob("*.so")) == quantization_builds, list(gptqmodel_builds.rglob("*.so"))
    ids = torch.tensor([byte_tokenizer()("the 7th of March, 2024")["input_ids"]], device="cuda")
    reference = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():
        expected, got = reference(ids).logits.float(), loaded.model(ids).logits.float()
    assert torch.isfinite(got).all()
    assert (got - expected).norm() / expected.norm() < 0.2
