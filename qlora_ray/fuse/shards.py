"""One base shard, many tenants: the unit of work of the fuse stage (local files only: no Ray, no store).

A shard is read once; for every target (a tenant under one merge base) its tensors are merged with
that tenant's LoRA deltas and written once per scheme as a shard of the same name. For bf16 and nf4
only one target's merged tensors are alive at a time, so memory is bounded by a few shards plus the
LoRA factors, whatever the model's size. The nf4-dequantized base is computed once per shard for all
the tenants that merge into it.

Bulk gptq-int4 with pooled Hessians goes weight by weight instead: every target's merged copy of one
weight is quantized against that weight's stored Hessian (fuse/hessians.py), the targets sharing a Hessian stacked into
one solve (fuse/gptq_bulk.py); the packed results, a quarter of the 16-bit size, are kept until the
shard's file is written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qlora_ray.fuse.gptq_bulk import pack_gptq, quantize_config, solve_stacked
from qlora_ray.fuse.hessians import SiteHessian
from qlora_ray.fuse.math import LoraDelta, fuse_weight
from qlora_ray.fuse.quant import FourBit, roundtrip_4bit, serialize_4bit
from qlora_ray.spec import FusedVariant, GptqSpec

# The schemes always written shard by shard; gptq-int4 is too in bulk mode with pooled Hessians (a target
# with a hessian_pool).
SHARD_SCHEMES = ("bf16", "nf4")
GPTQ = "gptq-int4"
# The most weight elements solved in one stacked GPTQ call: 2^29 (an 8B's down_proj for 9 tenants)
# keeps a solve near 10 GB, so that workers sharing a GPU fit; more tenants per stack gain little.
MAX_STACK_ELEMENTS = 2**29


@dataclass(frozen=True)
class ShardTarget:
    """One tenant under one merge base, and the shard-wise schemes it wants."""

    tenant: str
    merge_base: str  # "original" | "nf4-dequantized"
    schemes: tuple[str, ...]  # a subset of SHARD_SCHEMES, plus gptq-int4 in bulk mode
    trained_format: FourBit | None  # how the tenant's base was quantized in training (None: 16-bit LoRA)
    output_format: FourBit  # the nf4 scheme's format
    hessian_pool: str | None = None  # pooled bulk gptq-int4: the Hessian set its weights are quantized against


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
    *,
    hessians: dict[str, dict[str, SiteHessian]] | None = None,
    gptq: GptqSpec | None = None,
) -> dict[tuple[str, str], ShardOutput]:
    """Write out_dir/<tenant>/<variant>/<file_name> for every target and scheme.

    base: the shard's tensors (on the device to compute on); deltas: tenant -> weight name ->
    LoraDelta (any weights; those of this shard are used); quantized: the weights the 4-bit
    loader quantizes (and GPTQ does). on_output(tenant, variant name, output) is called as each
    file is written (the worker uploads and deletes it there, so local disk holds one output at a
    time). hessians (Hessian pool -> weight name -> its Hessian) and gptq (the settings) are needed
    when a target wants gptq-int4. Returns {(tenant, variant name): ShardOutput}.
    """
    dequantized: dict[FourBit, dict[str, torch.Tensor]] = {}

    def start_of(target: ShardTarget) -> dict[str, torch.Tensor]:
        if target.merge_base != "nf4-dequantized":
            return base
        if target.trained_format is None:
            raise ValueError(f"{target.tenant}: trained on the 16-bit base; there is no 4-bit base to merge into")
        if target.trained_format not in dequantized:
            dequantized[target.trained_format] = {
                name: roundtrip_4bit(tensor, target.trained_format) if name in quantized else tensor
                for name, tensor in base.items()
            }
        return dequantized[target.trained_format]

    outputs = {}

    def write(target: ShardTarget, scheme: str, tensors: dict[str, torch.Tensor], seconds: float) -> None:
        variant = FusedVariant(scheme, target.merge_base).name
        path = out_dir / target.tenant / variant / file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        cpu = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
        save_file(cpu, str(path), metadata={"format": "pt"})
        outputs[(target.tenant, variant)] = ShardOutput(
            path=path, tensors=tuple(sorted(cpu)), tensor_bytes=sum(t.numel() * t.element_size() for t in cpu.values()),
            seconds=round(seconds, 3))
        del cpu
        if on_output is not None:
            on_output(target.tenant, variant, outputs[(target.tenant, variant)])

    for target in targets:
        if not set(target.schemes) - {GPTQ}:
            continue
        started = time.perf_counter()
        start = start_of(target)
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
            elif scheme == GPTQ:
                continue
            else:
                raise ValueError(f"scheme {scheme!r} is not written shard by shard")
            write(target, scheme, tensors, merge_seconds + time.perf_counter() - started)
            del tensors
        del merged
    gptq_targets = [target for target in targets if GPTQ in target.schemes]
    if gptq_targets:
        if gptq is None or hessians is None or any(t.hessian_pool is None for t in gptq_targets):
            raise ValueError("gptq-int4 targets need the GPTQ settings and the Hessians (a Hessian pool each)")
        started = time.perf_counter()
        packed = gptq_shard(base, gptq_targets, start_of, deltas, quantized, hessians, gptq)
        share = (time.perf_counter() - started) / len(gptq_targets)  # one solve serves many: an even share each
        for target in gptq_targets:
            write(target, GPTQ, packed.pop(target), share)
    return outputs


def stacks(members: list, weight_elements: int) -> list[list]:
    """The members split into near-equal stacks of at most MAX_STACK_ELEMENTS weight elements each (at
    least one member a stack): GPTQ holds about five float32 copies of what it solves at once."""
    per_stack = max(1, MAX_STACK_ELEMENTS // weight_elements)
    count = -(-len(members) // per_stack)
    size = -(-len(members) // count)
    return [members[i:i + size] for i in range(0, len(members), size)]


def checkpoint_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor GPTQ leaves unquantized, as a gptq-int4 checkpoint keeps it: on the CPU, in bf16
    where the base computes in fp32 (as GPTQModel's checkpoints store them here)."""
    return (tensor.to(torch.bfloat16) if tensor.dtype == torch.float32 else tensor).cpu()


def gptq_shard(base: dict[str, torch.Tensor], targets: list[ShardTarget], start_of, deltas: dict[str, dict[str, LoraDelta]],
               quantized: frozenset[str], hessians: dict[str, dict[str, SiteHessian]],
               gptq: GptqSpec) -> dict[ShardTarget, dict[str, torch.Tensor]]:
    """Every target's gptq-int4 tensors of this shard (on the CPU): the quantized weights packed,
    the others merged and kept in 16 bits (bf16 where the base computes in fp32, as GPTQModel's
    checkpoints store them here). Weight by weight, each Hessian pool's targets solved stacked."""
    config = quantize_config(gptq)
    pools: dict[str, list[ShardTarget]] = {}
    for target in targets:
        pools.setdefault(target.hessian_pool, []).append(target)
    packed: dict[ShardTarget, dict[str, torch.Tensor]] = {target: {} for target in targets}

    def merged(target: ShardTarget, name: str) -> torch.Tensor:
        tensor = start_of(target)[name]
        delta = deltas[target.tenant].get(name)
        return tensor if delta is None else fuse_weight(tensor, delta)

    for name in sorted(base):
        if name not in quantized:
            # One host copy of a tensor no adapter changes (an 8B's embeddings: 1 GB), not one per tenant;
            # each source is held until the name is done, so that no id is reused meanwhile.
            copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            for target in targets:
                tensor = merged(target, name)
                if id(tensor) not in copies:
                    copies[id(tensor)] = (tensor, checkpoint_copy(tensor))
                packed[target][name] = copies[id(tensor)][1]
            del copies
            continue
        for pool, members in pools.items():
            hessian = hessians.get(pool, {}).get(name)
            if hessian is None:
                raise ValueError(f"{name}: the Hessian set {pool!r} has no Hessian for this weight")
            for stack in stacks(members, base[name].numel()):
                codes = solve_stacked([merged(target, name) for target in stack], hessian.matrix, hessian.tokens, config)
                for target, one in zip(stack, codes):
                    packed[target].update(pack_gptq(name, one, gptq.bits))
                del codes
    return packed
