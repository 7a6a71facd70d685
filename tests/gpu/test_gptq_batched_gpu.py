"""The batched GPTQ solve's CUDA path: its CUDA graphs against its own step-by-step walk, and its codes
against GPTQModel's solve on the GPU (GPTQModel runs a fused CUDA kernel of its own there).

Skipped without a CUDA GPU (CI has none); run on the lent H200 with `python -m pytest tests/gpu`.
"""

from __future__ import annotations

import pytest
import torch

from qlora_ray.fuse import gptq_batched
from qlora_ray.fuse.gptq_bulk import integer_codes, quantize_config, solve_stacked
from qlora_ray.spec import GptqSpec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytest.importorskip("gptqmodel")


def _block(seed: int, batch: int = 3, rows: int = 256, width: int = 128):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    block = torch.randn(batch, width, rows, generator=generator, device="cuda") * 0.02  # column-major, as the walk hands it
    factor = torch.linalg.cholesky(torch.eye(width, device="cuda") * 2 + 0.1, upper=True).expand(batch, -1, -1).contiguous()
    scales = torch.full((batch, width, rows), 0.006, device="cuda")
    zeros = torch.full((batch, width, rows), 8.0, device="cuda")
    return block, factor, scales, zeros


def test_the_captured_graph_replays_the_step_by_step_walk():
    steps, maxq = gptq_batched._ColumnSteps(), 15.0
    for seed in (1, 2, 3):  # the first run captures; the later ones replay on new values
        block, factor, scales, zeros = _block(seed)
        eager_out, graph_out = torch.empty_like(block), torch.empty_like(block)
        eager = gptq_batched._columns(block.clone(), factor, scales, zeros, maxq, eager_out)
        graphed = steps.run(block.clone(), factor, scales, zeros, maxq, graph_out)
        assert torch.equal(eager, graphed) and torch.equal(eager_out, graph_out)
    assert len(steps._graphs) == 1 and not steps._refused
    steps.clear()


@pytest.mark.parametrize("spec", [GptqSpec(), GptqSpec(static_groups=True), GptqSpec(desc_act=False)],
                         ids=["default", "static", "group-aware"])
def test_codes_match_gptqmodels_on_the_gpu(spec):
    config = quantize_config(spec)
    generator = torch.Generator(device="cuda").manual_seed(0)
    weights = [(torch.randn(512, 1024, generator=generator, device="cuda") * 0.02).to(torch.bfloat16) for _ in range(3)]
    hessians = []
    for _ in weights:
        inputs = torch.randn(4096, 1024, generator=generator, device="cuda") * torch.rand(1024, generator=generator, device="cuda")
        hessians.append(2.0 / 4096 * inputs.T @ inputs)
    ours = gptq_batched.solve_batched(weights, hessians, [4096] * 3, config)
    gptq_batched.release_graphs()
    for weight, hessian, mine in zip(weights, hessians, ours):
        (theirs,) = solve_stacked([weight], hessian, 4096, config)
        # GPTQModel's fused kernel rounds in its own order, and the inverse factor takes another route:
        # a rounding tie may fall the other way
        mine_codes, its_codes = integer_codes(mine, 4), integer_codes(theirs, 4)
        assert (mine_codes != its_codes).float().mean() < 1e-3
        torch.testing.assert_close(mine.scales, theirs.scales, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("budget", ["fixed, inputs parked", "the whole GPU"])
def test_a_walk_on_the_gpu_batches_tenants_as_each_alone(budget, monkeypatch):
    """The walk on CUDA, its tenants solved in one batch through the CUDA graphs, gives each tenant
    what a walk of its own gives: with the fixed budgets and every tenant's inputs parked on the
    CPU, or sized to the whole GPU (walk_memory), every tenant's inputs kept on it."""
    from qlora_ray.fuse.gptq_stream import StreamTenant, quantize_tenants_layerwise, walk_memory
    from qlora_ray.fuse.hessians import padded_batches
    from qlora_ray.fuse.math import LoraDelta
    from tests.unit.test_gptq_stream import NAMES, ROWS, SPEC
    from tests.unit.test_gptq_bulk import _tiny_llama

    if budget.startswith("fixed"):
        monkeypatch.setattr("qlora_ray.fuse.gptq_stream.RESIDENT_INPUT_BYTES", 0)  # park every tenant
    captures = []
    real_capture = gptq_batched._ColumnSteps._capture
    monkeypatch.setattr(gptq_batched._ColumnSteps, "_capture",
                        staticmethod(lambda *args: captures.append(args[0].shape) or real_capture(*args)))

    def walk(names: dict[str, int]) -> dict[str, dict[str, torch.Tensor]]:
        model = _tiny_llama().cuda()
        start = {name: p.data.clone() for name, p in model.named_parameters() if name in NAMES}
        tenants = []
        for name, seed in names.items():
            generator = torch.Generator().manual_seed(seed)
            deltas = {weight: LoraDelta(weight, torch.randn(2, start[weight].shape[1], generator=generator).cuda() * 0.3,
                                        torch.randn(start[weight].shape[0], 2, generator=generator).cuda() * 0.3, 1.0)
                      for weight in sorted(NAMES)}
            tenants.append(StreamTenant(name, deltas, list(padded_batches(ROWS[name], 2, 0, "cuda"))))
        packed = {name: {} for name in names}
        memory = None if budget.startswith("fixed") else walk_memory(
            torch.cuda.get_device_properties(0).total_memory, 1.0, torch.cuda.memory_allocated())
        quantize_tenants_layerwise(model, start, tenants, quantize_config(SPEC), SPEC.bits, park="cpu",
                                   on_layer=lambda _, tensors, __: [packed[n].update(t) for n, t in tensors.items()],
                                   memory=memory)
        return packed

    together = walk({"acme": 0, "globex": 1})
    assert captures, "no CUDA graph was captured"
    for name, seed in (("acme", 0), ("globex", 1)):
        alone = walk({name: seed})[name]
        assert sorted(alone) == sorted(together[name])
        for key in alone:
            assert torch.equal(alone[key], together[name][key]), key
