"""GPTQ for many tenants' weights of one site at once, each against its own Hessian: GPTQModel's
solver, batched over tenants (local functions: no Ray, no store).

Bulk GPTQ with per-tenant Hessians solves every tenant's weights of every site. GPTQModel's solver
takes one weight and one Hessian a call, and its walk over the columns is sequential: a call is a
long chain of small steps over one weight's rows, and the walks of bulk GPTQ spent most of their
time in these calls (benchmarks/results/2026-11-30-h200-gptq-walk-stages.md). Stacking tenants
row-wise (gptq_bulk.solve_stacked) only works for tenants that share a Hessian. Here the tenants of
a site are a batch dimension instead: each step of the walk runs once for all of them, every
tenant's rows against its own inverse Hessian. On a GPU, the steps of a block of 128 columns run as
one CUDA graph, so they do not wait on their launches.

GPTQModel has no batched solver, so this one is ours; it follows GPTQModel's `GPTQ.quantize` step by
step (the configurations `quantize_config` builds: natural, activation-ordered or act-group-aware
column order, groups found as the walk reaches them or, with static groups, fixed before it), and
reuses its pieces: the Quantizer, the damping and its recovery, and the group-aware orderings. The
inverse factor takes a cheaper route than GPTQModel's (_inverse_factor). A tenant whose Hessian has
no inverse factor, or whose walk ends with a NaN loss, is solved by GPTQModel itself, which has its
fallbacks for those.
tests/unit/test_gptq_batched.py checks the codes, scales and zeros against GPTQModel's, tenant by
tenant: the same but for a rare rounding tie.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qlora_ray.fuse.gptq_bulk import GptqCodes, solve_stacked

BLOCK = 128  # GPTQModel's block of columns between the lazy batch updates


@dataclass
class _Order:
    """One tenant's column order: perm[new] = old (None: natural), and for act-group-aware order the
    groups' order, whose scales and zeros are put back in the groups' own order afterwards."""

    perm: torch.Tensor | None = None
    group_perm: torch.Tensor | None = None


def solve_batched(weights: list[torch.Tensor], hessians: list[torch.Tensor], tokens: list[int], config
                  ) -> list[GptqCodes]:
    """GPTQ-quantize each weight (all of one shape (out, in), on one device) against its own Hessian
    (in, in) of tokens[i] calibration tokens: what GPTQModel's solver gives each alone."""
    if not (len(weights) == len(hessians) == len(tokens)) or not weights:
        raise ValueError("solve_batched takes one Hessian and one token count per weight, and at least one weight")
    if len({tuple(w.shape) for w in weights}) != 1:
        raise ValueError(f"solve_batched solves weights of one shape (got {sorted({tuple(w.shape) for w in weights})})")
    if config.mock_quantization or float(config.mse or 0.0) > 0.0:
        raise ValueError("solve_batched follows GPTQModel without mock quantization or an MSE search")
    static = bool(config.static_groups)
    if static and (config.act_group_aware or config.group_size == -1):
        raise ValueError("solve_batched follows GPTQModel's static groups over groups of columns, in activation "
                         "or natural order")
    from gptqmodel.quantization.gptq import GPTQ

    rows, columns = weights[0].shape
    device = weights[0].device
    count = len(weights)
    batch = torch.empty(count, rows, columns, dtype=torch.float32, device=device)
    inverses = torch.empty(count, columns, columns, dtype=torch.float32, device=device)
    with torch.device("meta"):
        linear = torch.nn.Linear(columns, rows, bias=False)
    task = GPTQ(linear, config)  # its quantizer and its damped inverse, configured as GPTQModel's processor does
    task.quantizer.configure(perchannel=True)
    orders, solvable = [], []
    group_scales = group_zeros = None
    if static:
        groups = math.ceil(columns / config.group_size)
        group_scales = torch.empty(count, rows, groups, dtype=torch.float32, device=device)
        group_zeros = torch.empty_like(group_scales)
    for slot, (weight, hessian) in enumerate(zip(weights, hessians)):
        matrix = hessian.to(device=device, dtype=torch.float32, copy=True)
        batch[slot] = weight
        dead = torch.diag(matrix) == 0
        matrix[dead, dead] = 1
        batch[slot][:, dead] = 0
        if static:  # from the weight in its own order, before the walk reorders it, as GPTQModel's
            group_scales[slot], group_zeros[slot] = _static_groups(task.quantizer, batch[slot], config.group_size)
        order = _column_order(matrix, config)
        if order.perm is not None:
            batch[slot] = batch[slot][:, order.perm]
            matrix = matrix[order.perm][:, order.perm]
        inverse = _inverse_factor(task, matrix)
        if inverse is None:  # walked on an identity, its result dropped
            inverses[slot] = torch.eye(columns, device=device)
        else:
            inverses[slot] = inverse
            solvable.append(slot)
        orders.append(order)
        del matrix, inverse
    if config.group_size == -1:  # one group a row: GPTQModel finds its scale on the weight as given
        task.quantizer.find_params(torch.cat([weight.float() for weight in weights]), weight=True)
    column_groups = None
    if static:  # the group of each column in the walk's order: the group of the column it came from
        column_groups = torch.stack([(o.perm if o.perm is not None else torch.arange(columns, device=device))
                                     // config.group_size for o in orders])
    dequantized, scales, zeros, losses = _walk(batch, inverses, task.quantizer, config.group_size,
                                               (group_scales, group_zeros, column_groups) if static else None)
    del batch, inverses
    codes: dict[int, GptqCodes] = {}
    for slot in solvable:
        if tokens[slot] and not math.isnan(losses[slot].item()):
            codes[slot] = _unpermute(dequantized[slot], scales[slot], zeros[slot], orders[slot],
                                     config.group_size if config.group_size != -1 else columns, weights[slot].dtype,
                                     static)
    for slot, weight in enumerate(weights):
        if slot not in codes:  # no inverse factor, or a NaN loss: GPTQModel's own fallbacks decide
            (codes[slot],) = solve_stacked([weight], hessians[slot], tokens[slot], config)
    return [codes[slot] for slot in range(count)]


def _column_order(hessian: torch.Tensor, config) -> _Order:
    """The order GPTQModel quantizes the columns in, from the Hessian's diagonal."""
    if config.desc_act:
        return _Order(perm=torch.argsort(torch.diag(hessian), descending=True))
    if config.act_group_aware:
        from gptqmodel.quantization.gar import (compose_final_perm, compute_global_perm, compute_local_perms,
                                                extend_perm_with_tail)

        diagonal = torch.diag(hessian)
        local, values = compute_local_perms(diagonal, config.group_size, return_values=True)
        groups = compute_global_perm(diagonal, config.group_size, precomputed_values=values)
        perm = extend_perm_with_tail(compose_final_perm(local, groups, config.group_size), diagonal.numel())
        return _Order(perm=perm, group_perm=groups)
    return _Order()


def _static_groups(quantizer, weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's scale and zero (out, groups) from the weight (out, in) as it stands: GPTQModel's
    static groups, found by one call over all full groups (and one for a last, shorter one) where
    GPTQModel calls the quantizer once a group: the same operations on each row of each group."""
    rows, columns = weight.shape
    full = columns // group_size
    scales, zeros = [], []
    if full:
        quantizer.find_params(weight[:, :full * group_size].reshape(rows * full, group_size), weight=True)
        scales.append(quantizer.scale.view(rows, full))
        zeros.append(quantizer.zero.view(rows, full))
    if columns % group_size:
        quantizer.find_params(weight[:, full * group_size:], weight=True)
        scales.append(quantizer.scale.view(rows, 1))
        zeros.append(quantizer.zero.view(rows, 1))
    return torch.cat(scales, 1), torch.cat(zeros, 1)


def _inverse_factor(task, hessian: torch.Tensor) -> torch.Tensor | None:
    """The upper Cholesky factor U of the damped Hessian's inverse, U^T U = (H + damp * mean(diag H) * I)^-1,
    which GPTQ's walk reads; None where GPTQModel's damping recovery fails too.

    GPTQModel factors H, inverts it from its factor (cholesky_inverse) and factors that inverse again:
    on an 8B's down_proj, most of a tenant's solve. With J the reversal of the columns, if J H J = L L^T
    then H^-1 = (J L^-1 J)^T (J L^-1 J), and J L^-1 J is upper triangular with a positive diagonal: it
    is U, one factorization and one triangular inverse away (benchmarks/results/
    2026-12-01-h200-gptq-inverse-route.md compares the two routes' time and error). Where the configured
    damp does not make H positive definite, GPTQModel's hessian_inverse takes over with its recovery, as
    it would alone."""
    mean = torch.mean(hessian.diagonal())
    reversed_hessian = hessian.flip(0, 1)
    reversed_hessian.diagonal().add_(float(task.qcfg.damp_percent) * mean)  # GPTQModel's first try, to the float
    lower, info = torch.linalg.cholesky_ex(reversed_hessian)
    del reversed_hessian
    inverse = torch.empty_like(lower)
    _lower_inverse(lower, inverse)
    del lower  # before the flip copies the inverse
    if bool((info == 0) & torch.isfinite(inverse).all()):
        return inverse.flip(0, 1)
    del inverse
    return task.hessian_inverse(hessian)[0]


def _lower_inverse(lower: torch.Tensor, out: torch.Tensor, leaf: int = 1024) -> None:
    """Write the inverse of a lower-triangular matrix into `out`, by halves: [[A, 0], [B, C]]^-1 =
    [[A^-1, 0], [-C^-1 B A^-1, C^-1]]. torch has no triangular inverse (LAPACK's trtri);
    solve_triangular against the identity does all n^3 of a general solve's work, where the halves'
    products do 2n^3/3 of it as large matrix products. Below `leaf` columns, solve_triangular does it."""
    size = lower.shape[-1]
    if size <= leaf:
        out.copy_(torch.linalg.solve_triangular(lower, torch.eye(size, dtype=lower.dtype, device=lower.device),
                                                upper=False))
        return
    half = size // 2
    _lower_inverse(lower[:half, :half], out[:half, :half], leaf)
    _lower_inverse(lower[half:, half:], out[half:, half:], leaf)
    out[:half, half:].zero_()
    out[half:, :half] = out[half:, half:] @ (lower[half:, :half] @ out[:half, :half])
    out[half:, :half].neg_()


def _walk(weights: torch.Tensor, inverses: torch.Tensor, quantizer, group_size: int, static=None):
    """GPTQ's column walk for a batch of weights (batch, out, in) in the order they are to be solved,
    each with its inverse Hessian's upper Cholesky factor (batch, in, in); the weights are worked on
    in place. Groups of group_size columns get their scales as the walk reaches them (-1: the
    quantizer's, set by the caller), or, with `static` = (scales, zeros (batch, out, groups), each
    walked column's group (batch, in)), are given. Returns the dequantized weights, the scales and
    zeros of each group in the order the walk met them, or the static ones (batch, out, groups), and
    each weight's summed loss (batch,)."""
    batch, rows, columns = weights.shape
    maxq = float(quantizer.maxq)  # the largest code, read once: inside a CUDA graph it cannot be read
    dequantized = torch.zeros_like(weights)
    losses = torch.zeros(batch, dtype=torch.float32, device=weights.device)
    scales, zeros = [], []
    if group_size == -1:
        scales.append(quantizer.scale.view(batch, rows))
        zeros.append(quantizer.zero.view(batch, rows))
    for first in range(0, columns, BLOCK):
        last = min(first + BLOCK, columns)
        # The block is walked column-major (batch, width, out): each column's steps and each error's
        # spread over the later columns touch memory in runs, where the weights' own layout would
        # read one float in every row's stride. Each element sees the same float operations, so the
        # codes stay GPTQModel's (tests/unit/test_gptq_batched.py).
        if static is not None:
            index = static[2][:, first:last].unsqueeze(1).expand(batch, rows, last - first)
            column_scales = static[0].gather(2, index).transpose(1, 2).contiguous()
            column_zeros = static[1].gather(2, index).transpose(1, 2).contiguous()
        else:
            column_scales, column_zeros = _found_groups(weights, first, last, group_size, quantizer, scales, zeros)
        block = weights[:, :, first:last].transpose(1, 2).contiguous()
        block_codes = torch.empty_like(block)
        errors = _COLUMNS.run(block, inverses[:, first:last, first:last], column_scales, column_zeros, maxq, block_codes)
        dequantized[:, :, first:last] = block_codes.transpose(1, 2)
        losses += errors.square().sum(dim=(1, 2)) / 2  # each error is (w - q) / d: GPTQModel's loss terms, summed
        errors = errors.transpose(1, 2).contiguous()  # (batch, out, width), as GPTQModel multiplies them
        for b in range(batch):  # one product per weight: the same kernels, so the same sums, as GPTQModel's
            weights[b, :, last:] -= errors[b].matmul(inverses[b, first:last, last:])
    if static is not None:
        return dequantized, static[0], static[1], losses
    return dequantized, torch.stack(scales, dim=2), torch.stack(zeros, dim=2), losses


def _found_groups(weights: torch.Tensor, first: int, last: int, group_size: int, quantizer, scales: list,
                  zeros: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Each column's scale and zero (batch, width, out) in the block [first, last) of the walk: the
    groups starting in it find theirs from the weights as they stand at the block's start, as
    GPTQModel's do (the walk changes the weights only after the block), appended to scales and zeros;
    the others keep the last group's."""
    batch, rows, _ = weights.shape
    column_scales = torch.empty(batch, last - first, rows, dtype=weights.dtype, device=weights.device)
    column_zeros = torch.empty_like(column_scales)
    starts = {c for c in range(first, last) if group_size != -1 and c % group_size == 0}
    bounds = sorted(starts | {first}) + [last]
    for at, end in zip(bounds, bounds[1:]):  # runs of columns under one group's scale
        if at in starts:
            quantizer.find_params(weights[:, :, at:at + group_size].reshape(batch * rows, -1), weight=True)
            scales.append(quantizer.scale.view(batch, rows))
            zeros.append(quantizer.zero.view(batch, rows))
        column_scales[:, at - first:end - first] = scales[-1].unsqueeze(1)
        column_zeros[:, at - first:end - first] = zeros[-1].unsqueeze(1)
    return column_scales, column_zeros


def _columns(block: torch.Tensor, corner: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, maxq: float,
             out: torch.Tensor) -> torch.Tensor:
    """GPTQ's steps over one block's columns, column-major (batch, width, out), each against its
    scale and zero (batch, width, out) and the block's corner of the inverse factor (batch, width,
    width): each column quantized into `out`, its error spread over the block's later columns.
    Returns the errors divided by the factor's diagonal (batch, width, out), which the caller spreads
    over the columns after the block. A column's error is spread by one in-place baddbmm of inner size
    1: a product and a subtraction per element, as GPTQModel's, with the block read and written once.

    The rounding is GPTQModel's `quantizer.quantize` for asymmetric codes, written out: its own
    function compares its `maxq` tensor with 0 in Python, a read of the GPU that a CUDA graph's
    capture refuses (and that stalls the step-by-step walk at every column)."""
    errors = torch.zeros_like(block)
    for i in range(block.shape[1]):
        w, scale, zero = block[:, i], scales[:, i], zeros[:, i]
        q = scale * (torch.clamp(torch.round(w / scale) + zero, 0, maxq) - zero)
        out[:, i] = q
        delta = errors[:, i]
        torch.sub(w, q, out=delta)
        delta.div_(corner[:, i, i].unsqueeze(1))
        block[:, i + 1:].baddbmm_(corner[:, i, i + 1:].unsqueeze(2), delta.unsqueeze(1), alpha=-1)
    return errors


class _ColumnSteps:
    """Runs _columns: on a GPU, as a CUDA graph captured once per block shape, replayed for every
    block of that shape. A block is about ten small kernels a column, each over a batch's rows; one
    launch a block instead of over a thousand keeps the GPU from waiting on the launches. Elsewhere,
    or if a capture fails, step by step."""

    def __init__(self):
        self._graphs: dict[tuple, tuple] = {}
        self._refused: set[tuple] = set()

    def run(self, block, corner, scales, zeros, maxq, out) -> torch.Tensor:
        key = (tuple(block.shape), block.dtype, str(block.device), maxq)
        if block.device.type != "cuda" or key in self._refused:
            return _columns(block, corner, scales, zeros, maxq, out)
        if key not in self._graphs:
            try:
                self._graphs[key] = self._capture(block, corner, scales, zeros, maxq)
            except RuntimeError as exc:
                from qlora_ray.library_output import say

                say(f"gptq: CUDA graph capture of a {tuple(block.shape)} block failed ({exc}); solving it step by step")
                self._refused.add(key)
                return _columns(block, corner, scales, zeros, maxq, out)
        graph, inputs, (errors, result) = self._graphs[key]
        for static, value in zip(inputs, (block, corner, scales, zeros)):
            static.copy_(value)
        graph.replay()
        out.copy_(result)
        return errors

    @staticmethod
    def _capture(block, corner, scales, zeros, maxq):
        inputs = tuple(t.clone() for t in (block, corner, scales, zeros))
        result = torch.empty_like(block)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # a warm-up off the capture, as torch.cuda.graphs asks
            _columns(*(t.clone() for t in inputs), maxq, result)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            errors = _columns(*inputs, maxq, result)
        return graph, inputs, (errors, result)

    def clear(self) -> None:
        """Free the graphs and their buffers (a walk ends)."""
        self._graphs.clear()
        self._refused.clear()


_COLUMNS = _ColumnSteps()


def release_graphs() -> None:
    """Free the CUDA graphs the batched solves captured (their buffers hold a block's tensors each)."""
    _COLUMNS.clear()


def _unpermute(dequantized: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, order: _Order, group: int,
               dtype: torch.dtype, static: bool = False) -> GptqCodes:
    """One weight's result back in its own column order, as GPTQModel returns it (static groups are
    already in the weight's own order)."""
    columns = dequantized.shape[1]
    g_idx = torch.arange(columns, device=dequantized.device, dtype=torch.int32) // group
    if order.perm is not None:
        inverse = torch.argsort(order.perm)
        dequantized = dequantized[:, inverse]
        if order.group_perm is not None:
            groups = torch.argsort(order.group_perm)
            kept = torch.cat([groups, torch.arange(groups.numel(), scales.shape[1], device=groups.device)])
            scales, zeros = scales[:, kept], zeros[:, kept]
        elif not static:
            g_idx = g_idx[inverse]
    return GptqCodes(dequantized.to(dtype), scales, zeros, g_idx)
