"""The batched GPTQ solve against GPTQModel's own solver, tenant by tenant."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qlora_ray.fuse.gptq_batched import solve_batched
from qlora_ray.fuse.gptq_bulk import quantize_config, solve_stacked
from qlora_ray.spec import GptqSpec

pytest.importorskip("gptqmodel")


def _hessian(columns: int, tokens: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # columns of unequal size, as activations are: the column orders differ between tenants
    inputs = torch.randn(tokens, columns, generator=generator) * torch.rand(columns, generator=generator) * 3
    return 2.0 / tokens * inputs.T @ inputs


def _weights(count: int, rows: int, columns: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randn(rows, columns, generator=generator) * 0.02 for _ in range(count)]


def _assert_same(ours, theirs):
    assert torch.equal(ours.dequantized, theirs.dequantized)
    assert torch.equal(ours.scales, theirs.scales)
    assert torch.equal(ours.zeros, theirs.zeros)
    assert torch.equal(ours.g_idx.int(), theirs.g_idx.int())


@pytest.mark.parametrize("group_size,desc_act,act_group_aware,columns", [
    (32, False, True, 160),    # the job's default order, act-group-aware; a full and a partial block of 128
    (32, False, False, 160),   # natural order
    (32, True, False, 160),    # activation order
    (-1, False, False, 160),   # one scale a row
    (64, False, True, 320),    # two groups begin in each block
    (256, False, False, 320),  # a group spans two blocks
])
def test_each_tenant_gets_the_codes_of_gptqmodels_own_solve(group_size, desc_act, act_group_aware, columns):
    config = quantize_config(GptqSpec(group_size=group_size, desc_act=desc_act))
    config = dataclasses.replace(config, act_group_aware=act_group_aware) if config.act_group_aware != act_group_aware else config
    assert config.act_group_aware == act_group_aware
    weights = _weights(3, 48, columns)
    hessians = [_hessian(columns, 300 + 50 * i, seed=i) for i in range(3)]
    tokens = [300, 350, 400]
    ours = solve_batched(weights, hessians, tokens, config)
    for weight, hessian, count, mine in zip(weights, hessians, tokens, ours):
        (theirs,) = solve_stacked([weight], hessian, count, config)
        _assert_same(mine, theirs)


def test_dead_columns_and_bf16_weights_as_gptqmodel():
    config = quantize_config(GptqSpec(group_size=32))
    weights = [w.to(torch.bfloat16) for w in _weights(2, 32, 64)]
    hessians = [_hessian(64, 200, seed=3), _hessian(64, 200, seed=4)]
    hessians[1][5, :] = hessians[1][:, 5] = 0  # an input no token reached
    ours = solve_batched(weights, hessians, [200, 200], config)
    assert ours[1].dequantized.dtype == torch.bfloat16
    assert not ours[1].dequantized[:, 5].any()
    for weight, hessian, mine in zip(weights, hessians, ours):
        _assert_same(mine, solve_stacked([weight], hessian, 200, config)[0])


def test_a_tenant_without_an_inverse_hessian_is_left_to_gptqmodel(monkeypatch):
    """A Hessian the batch cannot factor goes to GPTQModel's own solve (and its fallbacks); the
    other tenants of the batch are unaffected."""
    from gptqmodel.quantization.gptq import GPTQ

    config = quantize_config(GptqSpec(group_size=32))
    weights = _weights(2, 32, 64)
    hessians = [_hessian(64, 200, seed=5), _hessian(64, 200, seed=6)]
    real, batched_calls = GPTQ.hessian_inverse, []

    def second_fails_in_the_batch(self, matrix):
        if self.module.weight.device.type == "meta":  # the batch's tasks hold no weight
            batched_calls.append(matrix)
            if len(batched_calls) == 2:
                return None, 1.0
        return real(self, matrix)

    monkeypatch.setattr(GPTQ, "hessian_inverse", second_fails_in_the_batch)
    ours = solve_batched(weights, hessians, [200, 200], config)
    assert len(batched_calls) == 2
    for weight, hessian, mine in zip(weights, hessians, ours):
        _assert_same(mine, solve_stacked([weight], hessian, 200, config)[0])


def test_refuses_weights_of_different_shapes():
    config = quantize_config(GptqSpec(group_size=32))
    with pytest.raises(ValueError, match="one shape"):
        solve_batched([torch.zeros(8, 32), torch.zeros(16, 32)], [torch.eye(32)] * 2, [10, 10], config)
