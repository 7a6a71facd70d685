"""What the fuse stage knows about a base before touching its weights, and the checks it makes with it.

The layout comes from the base's small files (index and config.json): which tensor lives in which
shard, every weight's shape (from the config, on the meta device, so an 8B base costs nothing),
and which weights the 4-bit loader quantizes. With it the driver rejects an adapter that does not
fit the base (another model's shapes, targets the base does not have) before any worker starts,
so such a tenant publishes nothing and the others go on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_ray.bases import INDEX_NAME
from qlora_ray.fuse.math import LoraDelta, check_fits
from qlora_ray.fuse.quant import quantized_weight_names


@dataclass(frozen=True)
class BaseLayout:
    shards: dict[str, tuple[str, ...]]  # shard file -> the tensor names it holds
    shapes: dict[str, tuple[int, ...]]  # tensor name -> shape
    quantized: frozenset[str]  # the weight names load_in_4bit quantizes
    tied_output: str | None  # the output embedding's weight name when it is tied to the input's

    @property
    def shard_files(self) -> list[str]:
        return sorted(self.shards)


def read_layout(base_dir: Path) -> BaseLayout:
    """The layout of the base whose config.json and index are in base_dir (the shards need not be)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    index = json.loads((base_dir / INDEX_NAME).read_text())
    shards: dict[str, list[str]] = {}
    for name, file in index["weight_map"].items():
        shards.setdefault(file, []).append(name)
    config = AutoConfig.from_pretrained(str(base_dir), trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    missing = sorted(set(index["weight_map"]) - set(shapes))
    if missing:
        raise ValueError(f"{base_dir}: the index names tensors its config does not define: {missing[:5]}")
    tied = None
    if getattr(config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        tied = next(name for name, module in model.named_modules() if module is model.get_output_embeddings()) + ".weight"
    return BaseLayout(
        shards={file: tuple(sorted(names)) for file, names in shards.items()},
        shapes={name: shapes[name] for name in index["weight_map"]},
        quantized=quantized_weight_names(config),
        tied_output=tied if tied not in index["weight_map"] else None,
    )


def adapter_problems(layout: BaseLayout, deltas: dict[str, LoraDelta]) -> list[str]:
    """Why these LoRA deltas cannot be merged into this base; empty when they can."""
    problems = []
    for name, delta in sorted(deltas.items()):
        if name == layout.tied_output:
            problems.append(f"{name}: the adapter adapts the output embedding, which this base ties to the input "
                            "embedding; merging it would change both, so it cannot be fused")
        elif name not in layout.shapes:
            problems.append(f"{name}: the adapter targets a weight this base does not have "
                            "(an adapter for another architecture, or unknown target modules)")
        else:
            try:
                check_fits(delta, layout.shapes[name])
            except ValueError as exc:
                problems.append(str(exc))
    return problems
