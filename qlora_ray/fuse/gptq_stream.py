"""Bulk GPTQ with each tenant's own Hessians, never stored: many tenants' models GPTQ-quantized in
one walk over the merge base, layer by layer, as GPTQ itself goes (local functions: no Ray, no store).

Per-tenant GPTQ (GPTQModel) takes each layer's Hessian from the tenant's own merged model, the layers
before it already quantized. A pooled Hessian, from every tenant's rows on the merge base, costs one
capture for all but quantizes a tenant whose inputs are a minority of the pool for the wrong
directions; a stored set per tenant costs a capture and 16 GB each on an 8B (docs/quality.md).

Here one model (the merge base) serves every tenant of a group. Per decoder layer, for a batch of
tenants, site by site (the weights that read one input: q/k/v, o, gate/up, down) in the order the
forward reaches them, as GPTQModel quantizes a layer's subsets: each tenant's weights are put in the
layer (the sites before quantized, the rest merged) and its calibration rows run through it summing
XᵀX of the site; the site's weights of the whole batch are solved at once, every tenant against its
own Hessian (gptq_batched.py; a tenant's weights that read one input stacked). Then each tenant's
rows run through the layer once more, now quantized, to make its inputs to the next layer.
A Hessian lives for one layer of one batch; what stays is each tenant's hidden states and its packed
tensors, until the caller writes them.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

from qlora_ray.fuse.gptq_batched import release_graphs, solve_batched
from qlora_ray.fuse.gptq_bulk import GptqCodes, pack_gptq
from qlora_ray.fuse.hessians import (LayerInput, advance, catch_layer_inputs, decoder_layers, layer_hessians,
                                     layer_sites)
from qlora_ray.fuse.math import LoraDelta, fuse_weight
from qlora_ray.fuse.shards import stacks

# Without a memory budget (walk_memory: a CPU, or a worker that claimed no share of its GPU), the
# bytes one batch of tenants is solved in, and the layer inputs a walk keeps on the model's device
# over all its tenants; past those, a tenant's wait on the park between its turns. 12 GiB takes 4
# tenants of an 8B's layer (down_proj's Hessian alone is 0.8 GB a tenant) and 4 GiB the inputs of 6
# (128 rows of 512 tokens are about 0.6 GB a tenant, and each move costs two copies a layer): what
# four workers sharing an H200 fit beside their bases.
BATCH_BYTES = 12 * 2**30
RESIDENT_INPUT_BYTES = 4 * 2**30
# Of a worker's share of its GPU, what a walk leaves free: the passes' activations (a 128-row batch
# through an 8B's MLP is about 2 GB), the CUDA graphs' pools and the allocator's slack.
RESERVE_FRACTION = 0.1
RESERVE_MIN_BYTES = 4 * 2**30
# The dtype the walk's model computes in, whatever the device's own: in bf16 (a GPU, or a CPU with
# AVX512-BF16) bulk fell behind per-tenant GPTQ on the demo tenants, in float32 it did not
# (docs/quality.md). On a GPU its forward passes run in TF32 (hessians.tf32_matmuls).
WALK_DTYPE = torch.float32


def walk_memory(total_bytes: int, share: float, held_bytes: int) -> int:
    """The bytes a walk may hold on its GPU beside what the worker holds already (the model): its
    share of the device (resources.num_gpus, at most all of it) less a reserve. A worker with a GPU
    to itself then solves every tenant of a layer in one batch, where the fixed BATCH_BYTES split
    them in fours (benchmarks/results/2026-12-02-h200-gptq-bulk-one-worker.md)."""
    mine = total_bytes * min(share, 1.0)
    return max(0, int(mine - max(RESERVE_FRACTION * mine, RESERVE_MIN_BYTES)) - held_bytes)


def tenant_batch_bytes(start: dict[str, torch.Tensor]) -> int:
    """The bytes one tenant adds to a layer's batch (start: the merge base's tensors of the layer's
    quantized weights): its merged copy of them (their dtype) and its quantized one (float32, as the
    solve leaves it), and at the largest site the solve's float32 weight, its dequantized result, the
    Hessian and its inverse factor."""
    merged = sum(t.numel() * t.element_size() for t in start.values())
    quantized = sum(4 * t.numel() for t in start.values())
    return merged + quantized + max(4 * 2 * (t.numel() + t.shape[1] ** 2) for t in start.values())


@dataclass
class StreamTenant:
    """One tenant of the walk: its LoRA deltas (weight name -> delta, on the model's device) and its
    calibration batches ((input_ids, attention_mask) pairs on the model's device)."""

    name: str
    deltas: dict[str, LoraDelta]
    batches: list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class StageClock:
    """Seconds the walk spends in each of its steps, summed over layers and tenants: where a long
    walk's time goes. The device is synchronized at the end of each step, so work a GPU had queued
    counts for the step that queued it (the solver waits on the GPU anyway)."""

    device: torch.device
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, stage: str):
        began = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - began

    def summary(self) -> str:
        return ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in self.seconds.items())


def quantize_tenants_layerwise(model: torch.nn.Module, start: dict[str, torch.Tensor], tenants: list[StreamTenant],
                               config, bits: int, *, sequential: bool = True, park: str | None = None,
                               on_layer: Callable[[int, dict[str, dict[str, torch.Tensor]], dict[str, float]], None],
                               clock: StageClock | None = None, memory: int | None = None) -> None:
    """GPTQ-quantize every tenant's merged copy of the weights in `start` (weight name -> the merge
    base's tensor, in the dtype the base stores; the model's own weights are swapped in and out, and
    put back at the end of each layer). `memory` (walk_memory; None: the fixed budgets) is what the
    walk may hold on the model's device: up to half of it the tenants' layer inputs, the rest a
    batch's solve. With `park` (a device), the layer inputs of the tenants past that wait there
    between their turns: on a GPU, a walk of many tenants with long rows would otherwise hold all
    their hidden states at once (up to 2 GiB a tenant on an 8B).

    After each decoder layer, on_layer(index, {tenant: its packed checkpoint tensors of the layer, on
    the CPU}, {tenant: seconds of its work on the layer}) is called. With sequential, a tenant's next
    layer reads its layers before quantized (GPTQ's own order); without, its 16-bit merged layers.
    `clock` (default: a fresh one) sums the seconds of each step.
    """
    layers = decoder_layers(model)
    outside = sorted(name for name in start if not any(name.startswith(prefix) for _, prefix in layers))
    if outside:
        raise ValueError(f"{outside[:3]} ({len(outside)} weight(s)) lie outside the decoder layers, which bulk GPTQ "
                         "with per-tenant Hessians quantizes one at a time")
    compute = next(model.parameters()).dtype
    device = next(model.parameters()).device
    clock = clock or StageClock(device)
    inputs: dict[str, list[LayerInput]] = {}
    parked: dict[str, str | None] = {}  # tenant -> where its inputs wait between its turns (None: the model's device)
    resident, resident_limit = 0, RESIDENT_INPUT_BYTES if memory is None else memory // 2
    for tenant in tenants:
        with clock("first inputs"):
            inputs[tenant.name] = _first_inputs(model, tenant, frozenset(start))
        size = sum(entry.nbytes for entry in inputs[tenant.name])
        if park is None or resident + size <= resident_limit:
            parked[tenant.name], resident = None, resident + size
        else:
            parked[tenant.name] = park
            with clock("park"):
                _move(inputs[tenant.name], parked[tenant.name])
    batch_bytes = BATCH_BYTES if memory is None else memory - resident
    try:  # the CUDA graphs of the batched solves hold a block's buffers each: freed as the walk ends
        for index, (layer, prefix) in enumerate(layers):
            params = {name: layer.get_parameter(name.removeprefix(prefix)) for name in start if name.startswith(prefix)}
            packed: dict[str, dict[str, torch.Tensor]] = {tenant.name: {} for tenant in tenants}
            seconds = {tenant.name: 0.0 for tenant in tenants}
            together = max(1, batch_bytes // tenant_batch_bytes({name: start[name] for name in params}))
            groups = _site_order(layer, prefix, params, inputs[tenants[0].name][0], parked[tenants[0].name]) \
                if sequential else [sorted(params)]
            for first in range(0, len(tenants), together):
                batch = tenants[first:first + together]
                for tenant, work in _solve_batch(layer, prefix, start, params, groups, batch, inputs, config, bits,
                                                 parked=parked, sequential=sequential, compute=compute,
                                                 clock=clock).items():
                    packed[tenant], seconds[tenant] = work
            for name, parameter in params.items():
                parameter.data = start[name].to(compute)
            on_layer(index, packed, seconds)
    finally:
        release_graphs()


def _move(inputs: list[LayerInput], device) -> None:
    """Move a tenant's layer inputs to `device`; none: where they are."""
    if device is not None:
        for entry in inputs:
            entry.to(device)


def _first_inputs(model: torch.nn.Module, tenant: StreamTenant, quantized: frozenset[str]) -> list[LayerInput]:
    """What reaches the first decoder layer for the tenant's rows, through its own merged weights
    before the layers (an adapter may train the embeddings): merged in for the catch, then put back."""
    before = {}
    try:
        for name, delta in tenant.deltas.items():
            if name not in quantized:
                parameter = model.get_parameter(name)
                before[name] = parameter.data
                parameter.data = fuse_weight(parameter.data, delta)
        return catch_layer_inputs(model, tenant.batches)
    finally:
        for name, tensor in before.items():
            model.get_parameter(name).data = tensor


def _solve_batch(layer: torch.nn.Module, prefix: str, start: dict[str, torch.Tensor], params: dict,
                 groups: list[list[str]], batch: list[StreamTenant], inputs: dict[str, list[LayerInput]], config,
                 bits: int, *, parked: dict, sequential: bool, compute: torch.dtype,
                 clock: StageClock) -> dict[str, tuple[dict, float]]:
    """One layer for a batch of tenants, one group of weights after another (with sequential, its
    sites in the order the forward reaches them, as GPTQModel's subsets go; without, all of them in
    one pass from the merged layer): each tenant's Hessians of the group from a pass of its inputs
    through its layer, the groups before already quantized; the group's weights of all of them
    solved in one batched solve per site (the weights that read one input stacked, per tenant),
    packed. Then each tenant's inputs are advanced through its layer, quantized with sequential,
    merged without. Returns {tenant: (its packed tensors, seconds of its work: its own steps, and its
    share of the batched ones)}."""
    device = next(layer.parameters()).device
    merged, spent = {}, {}
    for tenant in batch:
        began = time.perf_counter()
        with clock("merge"):
            merged[tenant.name] = {name: fuse_weight(start[name], tenant.deltas[name]) if name in tenant.deltas
                                   else start[name] for name in params}
        spent[tenant.name] = time.perf_counter() - began
    packed: dict[str, dict[str, torch.Tensor]] = {tenant.name: {} for tenant in batch}
    quantized: dict[str, dict[str, torch.Tensor]] = {tenant.name: {} for tenant in batch}
    for names in groups:
        hessians = {}
        for tenant in batch:
            began = time.perf_counter()
            weights = {**merged[tenant.name], **quantized[tenant.name]}
            for name, parameter in params.items():
                parameter.data = weights[name].to(compute)
            with clock("park"):
                _move(inputs[tenant.name], parked[tenant.name] and device)
            with clock("hessians"):
                hessians[tenant.name] = layer_hessians(layer, prefix, frozenset(names), inputs[tenant.name])
            with clock("park"):
                _move(inputs[tenant.name], parked[tenant.name])
            unreached = sorted(set(names) - set(hessians[tenant.name].weight_sites))
            if unreached:
                raise ValueError(f"no calibration input reached {unreached[:3]} ({len(unreached)} weight(s)) for {tenant.name}")
            spent[tenant.name] += time.perf_counter() - began
        began = time.perf_counter()
        _solve_sites(names, params, batch, merged, hessians, config, bits, packed, quantized if sequential else None, clock)
        for tenant in batch:
            spent[tenant.name] += (time.perf_counter() - began) / len(batch)
    for tenant in batch:
        began = time.perf_counter()
        weights = quantized[tenant.name] if sequential else merged[tenant.name]
        for name, parameter in params.items():
            parameter.data = weights[name].to(compute)
        with clock("park"):
            _move(inputs[tenant.name], parked[tenant.name] and device)
        with clock("advance"):
            advance(layer, inputs[tenant.name])
        with clock("park"):
            _move(inputs[tenant.name], parked[tenant.name])
        spent[tenant.name] += time.perf_counter() - began
    return {tenant.name: (packed[tenant.name], spent[tenant.name]) for tenant in batch}


def _site_order(layer: torch.nn.Module, prefix: str, params: dict, entry: LayerInput, park: str | None
                ) -> list[list[str]]:
    """The layer's weights grouped by site, in the order its forward reaches the sites: found on one
    input of one tenant, through the layer as it stands (the sites do not depend on the weights'
    values). `park`: where the input waits (None: on the layer's device)."""
    if park:
        entry.to(next(layer.parameters()).device)
    try:
        return layer_sites(layer, prefix, frozenset(params), entry)
    finally:
        if park:
            entry.to(park)


def _solve_sites(names: list[str], params: dict, batch: list[StreamTenant], merged: dict, hessians: dict, config,
                 bits: int, packed: dict, quantized: dict | None, clock: StageClock) -> None:
    """Solve the weights `names` of every tenant of the batch against its own Hessians (one batched
    solve per stack of weights that read one site), pack them into `packed`, and keep their
    dequantized weights in `quantized` (None: not kept)."""
    sites: dict[str, list[str]] = {}
    for name in sorted(names):  # every tenant's layer is the same layer: the same sites
        sites.setdefault(hessians[batch[0].name].weight_sites[name], []).append(name)
    for site, stacked in sites.items():
        tokens = [hessians[tenant.name].tokens[site] for tenant in batch]
        # H = 2/n·XᵀX made in place of each sum (each is (in, in) float32: 0.8 GB for an 8B's down_proj)
        matrices = [hessians[tenant.name].sums.pop(site).mul_(2.0 / count) for tenant, count in zip(batch, tokens)]
        for stack in stacks(stacked, max(params[name].numel() for name in stacked)):
            with clock("solve"):
                solved = solve_batched([torch.cat([merged[tenant.name][name] for name in stack]) for tenant in batch],
                                       matrices, tokens, config)
            with clock("pack"):
                rows = [params[name].shape[0] for name in stack]
                for tenant, codes in zip(batch, solved):
                    for name, part in zip(stack, _split(codes, rows)):
                        packed[tenant.name].update(pack_gptq(name, part, bits))
                        if quantized is not None:
                            quantized[tenant.name][name] = part.dequantized
        del matrices


def _split(codes: GptqCodes, rows: list[int]) -> list[GptqCodes]:
    """A stacked solve's result, one part per weight of the stack (their rows, in order)."""
    if len(rows) == 1:
        return [codes]
    return [GptqCodes(d, s, z, codes.g_idx) for d, s, z in
            zip(codes.dequantized.split(rows), codes.scales.split(rows), codes.zeros.split(rows))]
