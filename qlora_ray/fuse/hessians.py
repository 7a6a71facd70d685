"""Calibration statistics for bulk GPTQ: each quantized weight's input Hessian.

GPTQ quantizes a weight against H = 2/n · XᵀX, X being the n token rows that reach the weight on
calibration data. Per-tenant GPTQ (GPTQModel) re-captures every layer's inputs through each tenant's
own merged model. Bulk GPTQ with pooled Hessians captures them once per job, on the merge base
itself (the 16-bit original or its NF4-dequantized form), from every tenant's calibration rows, and
stores the set; with per-tenant Hessians, fuse/gptq_stream.py sums them layer by layer through each
tenant's own merged layers with the pieces here (catch_layer_inputs, layer_sites, layer_hessians,
advance) and stores nothing.

Weights that read the same input tensor (q/k/v of attention, gate/up of an MLP) share one Hessian
("site"): found at capture, by the forward handing each of them the very same tensor object, so no
architecture's module names are hard-coded. On disk a set is one safetensors file per base shard,
holding the upper triangles of the sites its quantized weights read (a Hessian is symmetric, so
half is stored: an 8B's set is 16 GB rather than 33), with the weight -> site map in its metadata.
Local functions only (no Ray, no store).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


@dataclass
class Hessians:
    """XᵀX sums (float32) per site, their token counts, and the site each weight reads."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    weight_sites: dict[str, str] = field(default_factory=dict)

    def normalized(self, site: str) -> torch.Tensor:
        """H as GPTQModel's GPTQ holds it: 2/n · XᵀX over the n calibration tokens."""
        return self.sums[site] * (2.0 / self.tokens[site])


@dataclass(frozen=True)
class SiteHessian:
    """One site's H (2/n · XᵀX, float32) and its n calibration tokens."""

    matrix: torch.Tensor
    tokens: int


class _WeightsReached(Exception):
    """Raised by the hook of the last weight a layer pass sums: the rest of the layer is not needed."""


class _LayerInputs(Exception):
    """Raised by the hook that caught the first decoder layer's inputs: the rest of the forward is not needed."""


@dataclass
class LayerInput:
    """One calibration batch as it enters a decoder layer: its hidden states, the other arguments the
    decoder hands every layer (positions, masks), and which of its token rows are not padding."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict
    keep: torch.Tensor

    def through(self, layer: torch.nn.Module):
        return layer(self.hidden, *self.args, **self.kwargs)

    @property
    def nbytes(self) -> int:
        """The bytes of its tensors (hidden states, positions, masks, padding flags)."""
        def size(value) -> int:
            if isinstance(value, torch.Tensor):
                return value.numel() * value.element_size()
            if isinstance(value, (tuple, list)):
                return sum(map(size, value))
            return 0

        return size(self.hidden) + size(self.args) + size(self.keep) + sum(map(size, self.kwargs.values()))

    def to(self, device) -> None:
        """Move its tensors (hidden states, positions, masks) to `device`, in place."""
        def moved(value):
            if isinstance(value, torch.Tensor):
                return value.to(device)
            if isinstance(value, (tuple, list)):
                return type(value)(moved(v) for v in value)
            return value

        self.hidden, self.args, self.keep = moved(self.hidden), moved(self.args), moved(self.keep)
        self.kwargs = {key: moved(value) for key, value in self.kwargs.items()}


def _sum_hooks(module: torch.nn.Module, prefix: str, weight_names: frozenset[str], hessians: Hessians, state: dict) -> list:
    """Forward pre-hooks on the linears of `module` whose weight (`prefix` + its name) is in
    weight_names, summing XᵀX of the non-padding rows they read (state["keep"]) into `hessians`.
    Weights handed the very same input tensor in a row (state["input"]) share one site."""
    def hook_for(weight: str):
        def hook(_, args):
            x = args[0]
            site = hessians.weight_sites.setdefault(weight, state["site"] if x is state["input"] else weight)
            state["input"], state["site"] = x, site
            # a weight that reads the input another weight of its site already summed adds nothing
            if site == weight and not state.get("map_only"):
                rows = x.reshape(-1, x.shape[-1])[state["keep"]].float()
                if site not in hessians.sums:
                    hessians.sums[site] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=x.device)
                    hessians.tokens[site] = 0
                hessians.sums[site].addmm_(rows.T, rows)
                hessians.tokens[site] += rows.shape[0]
            if state.get("stop_after"):  # the rest of the layer's forward is not needed once all are reached
                state["seen"].add(weight)
                if len(state["seen"]) == state["stop_after"]:
                    raise _WeightsReached
        return hook

    return [sub.register_forward_pre_hook(hook_for(f"{prefix}{name}.weight")) for name, sub in module.named_modules()
            if isinstance(sub, torch.nn.Linear) and f"{prefix}{name}.weight" in weight_names]


@contextmanager
def tf32_matmuls():
    """Matmuls on a GPU in TF32 (fp32 accumulation, 10-bit mantissa inputs) while the context lasts.
    XᵀX is most of a capture's work (a pool of 24 tenants' rows is ~1M tokens): from a bf16 model's
    inputs, which TF32 holds exactly, the tensor cores give the same sums as full fp32, many times
    faster. The bulk walk's float32 forward (gptq_stream.WALK_DTYPE) runs in it too: on the tensor
    cores, where full float32 would leave them idle; its solve stays outside, in IEEE float32."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def capture_hessians(model: torch.nn.Module, batches, weight_names: frozenset[str], quantize_layer=None) -> Hessians:
    """Run the model's decoder over `batches` ((input_ids, attention_mask) pairs on the model's device)
    and sum XᵀX of the non-padding token rows reaching every nn.Linear whose weight is in weight_names.

    With quantize_layer, layer by layer as GPTQ itself goes: each decoder layer's Hessians are taken
    from the outputs of the layers before it once those are quantized (quantize_layer(layer, its
    name + ".", {weight name: SiteHessian}) quantizes a layer's weights in place), so that every layer's
    quantization is chosen against the error the earlier layers' quantization left. Without it,
    from the model as it is, in one forward."""
    missing = sorted(weight_names - {f"{name}.weight" for name, _ in model.named_modules()})
    if missing:
        raise ValueError(f"the model has no linear layers for {missing[:3]} ({len(missing)} weight(s))")
    hessians = Hessians()
    with torch.no_grad(), tf32_matmuls():
        if quantize_layer is None:
            state = {"input": None, "site": None, "keep": None}
            handles = _sum_hooks(model, "", weight_names, hessians, state)
            try:
                for input_ids, attention_mask in batches:
                    state.update(input=None, site=None, keep=attention_mask.reshape(-1).bool())
                    # The decoder alone: the LM head is never quantized, and its logits would cost vocab x tokens.
                    model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            finally:
                for handle in handles:
                    handle.remove()
        else:
            inputs = catch_layer_inputs(model, batches)
            for layer, prefix in decoder_layers(model):
                found = layer_hessians(layer, prefix, weight_names, inputs)
                for part in ("sums", "tokens", "weight_sites"):
                    getattr(hessians, part).update(getattr(found, part))
                quantize_layer(layer, prefix, {weight: SiteHessian(found.normalized(site), found.tokens[site])
                                               for weight, site in found.weight_sites.items()})
                del found
                advance(layer, inputs)
    unreached = sorted(weight_names - set(hessians.weight_sites))
    if unreached:
        raise ValueError(f"no calibration input reached {unreached[:3]} ({len(unreached)} weight(s))")
    return hessians


def decoder_layers(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    """(layer, its weights' name prefix) of every decoder layer, in order."""
    layers = getattr(model.base_model, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise ValueError(f"{type(model).__name__}: no decoder layers at base_model.layers to quantize layer by layer")
    names = {module: name for name, module in model.named_modules()}
    return [(layer, names[layer] + ".") for layer in layers]


def catch_layer_inputs(model: torch.nn.Module, batches) -> list[LayerInput]:
    """What reaches the first decoder layer for every batch (GPTQ's "catcher"); the model runs no further."""
    first = decoder_layers(model)[0][0]
    caught = []

    def catch(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        caught.append((hidden, tuple(args[1:]), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _LayerInputs

    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    keeps = []
    try:
        with torch.no_grad(), tf32_matmuls():
            for input_ids, attention_mask in batches:
                keeps.append(attention_mask.reshape(-1).bool())
                try:
                    model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                except _LayerInputs:
                    pass
    finally:
        handle.remove()
    return [LayerInput(hidden, args, kwargs, keep) for (hidden, args, kwargs), keep in zip(caught, keeps)]


def layer_hessians(layer: torch.nn.Module, prefix: str, weight_names: frozenset[str], inputs: list[LayerInput]) -> Hessians:
    """The Hessian sums of the layer's weights in weight_names, from one pass of `inputs` through it
    (each input's pass ends once every one of them has read its input)."""
    return _layer_passes(layer, prefix, weight_names, inputs)


def layer_sites(layer: torch.nn.Module, prefix: str, weight_names: frozenset[str], entry: LayerInput) -> list[list[str]]:
    """The layer's weights in weight_names grouped by the input they read (sites), in the order its
    forward reaches them: one pass of one input, summing nothing."""
    groups: dict[str, list[str]] = {}
    for weight, site in _layer_passes(layer, prefix, weight_names, [entry], map_only=True).weight_sites.items():
        groups.setdefault(site, []).append(weight)
    return list(groups.values())


def _layer_passes(layer: torch.nn.Module, prefix: str, weight_names: frozenset[str], inputs: list[LayerInput],
                  map_only: bool = False) -> Hessians:
    """Each input through the layer with the hooks of _sum_hooks, until its weights in weight_names
    have all read their inputs."""
    hessians = Hessians()
    state = {"input": None, "site": None, "keep": None, "map_only": map_only}
    handles = _sum_hooks(layer, prefix, weight_names, hessians, state)
    state["stop_after"] = len(handles)
    try:
        with torch.no_grad(), tf32_matmuls():
            for entry in inputs:
                state.update(input=None, site=None, keep=entry.keep, seen=set())
                try:
                    entry.through(layer)
                except _WeightsReached:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return hessians


def advance(layer: torch.nn.Module, inputs: list[LayerInput]) -> None:
    """Make each input the layer's output: what the next layer reads."""
    with torch.no_grad(), tf32_matmuls():
        for entry in inputs:
            output = entry.through(layer)
            entry.hidden = output[0] if isinstance(output, tuple) else output


def padded_batches(rows: list[list[int]], batch_size: int, pad_id: int, device: str):
    """(input_ids, attention_mask) batches of token rows, right-padded; rows of similar length go
    together so little is padded."""
    ordered = sorted((row for row in rows if row), key=len)
    for start in range(0, len(ordered), batch_size):
        chunk = ordered[start:start + batch_size]
        width = len(chunk[-1])
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, row in enumerate(chunk):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        yield ids.to(device), mask.to(device)


def upper_triangle(matrix: torch.Tensor) -> torch.Tensor:
    """The upper triangle (diagonal included) of a square matrix, row by row, as one vector."""
    keep = torch.ones(matrix.shape, dtype=torch.bool, device=matrix.device).triu()
    return matrix[keep]


def symmetric_from_upper(packed: torch.Tensor, size: int) -> torch.Tensor:
    """The symmetric matrix whose upper triangle upper_triangle() gave."""
    keep = torch.ones((size, size), dtype=torch.bool, device=packed.device).triu()
    full = torch.zeros((size, size), dtype=packed.dtype, device=packed.device)
    full[keep] = packed
    return full + full.triu(1).T


def write_hessians(hessians: Hessians, weight_map: dict[str, str], folder: Path) -> dict[str, int]:
    """One file per base shard (named as the shard; weight_map is the base's index: tensor -> shard)
    holding the sites its weights read, normalized. Shards without quantized weights get no file.
    Returns {file: bytes}."""
    shards: dict[str, list[str]] = {}
    for name, shard_file in weight_map.items():
        shards.setdefault(shard_file, []).append(name)
    written = {}
    for shard_file, names in sorted(shards.items()):
        weights = {name: hessians.weight_sites[name] for name in names if name in hessians.weight_sites}
        if not weights:
            continue
        sites = sorted(set(weights.values()))
        tensors = {site: upper_triangle(hessians.normalized(site)).cpu() for site in sites}
        metadata = {"weight_sites": json.dumps(weights, sort_keys=True),
                    "tokens": json.dumps({site: hessians.tokens[site] for site in sites}, sort_keys=True),
                    "columns": json.dumps({site: hessians.sums[site].shape[0] for site in sites}, sort_keys=True)}
        path = folder / shard_file
        save_file(tensors, str(path), metadata={"format": "pt", **metadata})
        written[shard_file] = path.stat().st_size
        del tensors
    return written


def read_hessians(path: Path, device: str) -> dict[str, SiteHessian]:
    """weight name -> its site's Hessian, from a file write_hessians made (weights of one site share one tensor)."""
    with safe_open(str(path), framework="pt", device=device) as handle:
        metadata = handle.metadata()
        weight_sites, tokens, columns = (json.loads(metadata[k]) for k in ("weight_sites", "tokens", "columns"))
        sites = {site: SiteHessian(symmetric_from_upper(handle.get_tensor(site), columns[site]), tokens[site])
                 for site in sorted(set(weight_sites.values()))}
    return {weight: sites[site] for weight, site in weight_sites.items()}
