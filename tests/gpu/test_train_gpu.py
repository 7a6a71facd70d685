"""The train stage's CUDA path: the default GPU settings, and every speed option together.

Skipped without a CUDA GPU (CI has none); run on the lent H100 with `python -m pytest tests/gpu`.
A SmolLM2-135M-shaped base with random weights: these tests check that training runs and learns
with each setting, not what it learns.
"""

from __future__ import annotations

import pytest
import torch

from qlora_ray.bases import import_base
from qlora_ray.data import read_rows
from qlora_ray.spec import TrainSpec
from qlora_ray.store import Store
from qlora_ray.train.finetune import finetune
from tests.conftest import REPO

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def gpu_base(tmp_path_factory):
    store = Store(str(tmp_path_factory.mktemp("store")))
    import_base("shape:smollm2-135m", "smollm2-shape", store, progress=lambda _: None)
    local = tmp_path_factory.mktemp("base")
    store.fetch("bases/smollm2-shape", local)
    return local


@pytest.mark.parametrize(
    "settings",
    [
        {},  # the defaults on a GPU: fused kernels, paged 8-bit AdamW, every layer checkpointed
        {"optimizer": "adamw_torch_fused", "compile_layers": True, "uncheckpointed_layers": 10},
    ],
    ids=["defaults", "all-speed-options"],
)
def test_gpu_training_learns(gpu_base, tmp_path, settings):
    rows = read_rows(str(REPO / "jobs" / "data" / "units" / "train.jsonl")).rows
    spec = TrainSpec(max_steps=40, batch_size=8, seq_len=128, learning_rate=2e-3, lr_scheduler="constant",
                     checkpoint_every=1000, **settings)
    result = finetune(spec, gpu_base, rows, rows[:16], tmp_path)
    metrics = result.metrics
    assert metrics["fused_kernels"] is True
    assert metrics["compiled_layers"] is bool(settings.get("compile_layers"))
    assert metrics["optimizer"] == settings.get("optimizer", "paged_adamw_8bit")
    assert metrics["final_loss"] < 0.7 * metrics["first_loss"], metrics
    assert (result.adapter_dir / "adapter_model.safetensors").exists()
