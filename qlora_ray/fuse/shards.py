"""One base shard, many tenants: the unit of work of the fuse stage (local files only: no Ray, no store).

A shard is read once; for every target (a tenant under one merge base) its tensors are merged with
that tenant's LoRA deltas and written once per scheme as a shard of the same name. Only one
target's merged tensors are alive at a time, so memory is bounded by a few shards plus the LoRA
factors, whatever the model's size. The nf4-dequantized base is computed once per shard for all
the tenants that merge into it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qlora_ray.fuse.math import LoraDelta, fuse_weight
from qlora_ray.fuse.quant import FourBit, roundtrip_4bit, serialize_4bit
from qlora_ray.spec import FusedVariant

SHARD_SCHEMES = ("bf16", "nf4")  # the schemes written shard by shard; gptq-int4 needs the whole model


@dataclass(frozen=True)
class ShardTarget:
    """One tenant under one merge base, and the shard-wise schemes it wants."""

    tenant: str
    merge_base: str  # "original" | "nf4-dequantized"
    schemes: tuple[str, ...]  # a subset of SHARD_SCHEMES
    trained_format: FourBit | None  # how the tenant's base was quantized in training (None: 16-bit LoRA)
    output_format: FourBit  # the nf4 scheme's format


@dataclass(frozen=True)
class ShardOutput:
    path: Path
    tensors: tuple[str, ...]  # names in the file, for the artifact's index
    tensor_bytes: int
    seconds: float  # merge + quantize + write time of this output


def load_shard(path: Path, device: str) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt", device=device) as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def fuse_shard(
    base: dict[str, torch.Tensor],
    targets: list[ShardTarget],
    deltas: dict[str, dict[str, LoraDelta]],
    quantized: frozenset[str],
    out_dir: Path,
    file_name: str,
    on_output: Callable[[str, str, ShardOutput], None] | None = None,
) -> dict[tuple[str, str], ShardOutput]:
    """Write out_dir/<tenant>/<variant>/<file_name> for every target and scheme.

    base: the shard's tensors (on the device to compute on); deltas: tenant -> weight name ->
    LoraDelta (any weights; those of this shard are used); quantized: the weights the 4-bit
    loader quantizes. on_output(tenant, variant name, output) is called as each file is written
    (the worker uploads and deletes it there, so local disk holds one output at a time).
    Returns {(tenant, variant name): ShardOutput}.
    """
    dequantized: dict[FourBit, dict[str, torch.Tensor]] = {}
    outputs = {}
    for target in targets:
        started = time.perf_counter()
        start = base
        if target.merge_base == "nf4-dequantized":
            if target.trained_format is None:
                raise ValueError(f"{target.tenant}: trained on the 16-bit base; there is no 4-bit base to merge into")
            if target.trained_format not in dequantized:
                dequantized[target.trained_format] = {
                    name: roundtrip_4bit(tensor, target.trained_format) if name in quantized else tensor
                    for name, tensor in base.items()
                }
            start = dequantized[target.trained_format]
        tenant_deltas = deltas[target.tenant]
        merged = {name: fuse_weight(tensor, tenant_deltas[name]) if name in tenant_deltas else tensor
                  for name, tensor in start.items()}
        merge_seconds = time.perf_counter() - started
        for scheme in target.schemes:
            started = time.perf_counter()
            if scheme == "bf16":
                tensors = merged
            elif scheme == "nf4":
                tensors = {}
                for name, tensor in merged.items():
                    tensors.update(serialize_4bit(name, tensor, target.output_format) if name in quantized
                                   else {name: tensor})
            else:
                raise ValueError(f"scheme {scheme!r} is not written shard by shard")
            path = out_dir / target.tenant / FusedVariant(scheme, target.merge_base).name / file_name
            path.parent.mkdir(parents=True, exist_ok=True)
            cpu = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
            save_file(cpu, str(path), metadata={"format": "pt"})
            variant = FusedVariant(scheme, target.merge_base).name
            outputs[(target.tenant, variant)] = ShardOutput(
                path=path, tensors=tuple(sorted(cpu)),
                tensor_bytes=sum(t.numel() * t.element_size() for t in cpu.values()),
                seconds=round(merge_seconds + time.perf_counter() - started, 3),
            )
            del cpu, tensors
            if on_output is not None:
                on_output(target.tenant, variant, outputs[(target.tenant, variant)])
        del merged
    return outputs
