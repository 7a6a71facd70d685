"""The batched GPTQ solve against GPTQModel's own solver, tenant by tenant."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qlora_ray.fuse.gptq_batched import _inverse_factor, solve_batched
from qlora_ray.fuse.gptq_bulk import integer_codes, quantize_config, solve_stacked
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


def _assert_same(ours, theirs, bits=4):
    """The same codes, zeros and groups, but for a rare rounding tie that falls the other way: the
    inverse factor takes another route than GPTQModel's, equal to float rounding
    (test_the_inverse_factor_is_gptqmodels_and_as_accurate)."""
    mine, its = integer_codes(ours, bits), integer_codes(theirs, bits)
    assert (mine != its).float().mean() <= 1e-3 and (mine - its).abs().max() <= 1
    assert torch.equal(ours.zeros, theirs.zeros)
    assert torch.equal(ours.g_idx.int(), theirs.g_idx.int())
    torch.testing.assert_close(ours.scales, theirs.scales, rtol=1e-5, atol=0)


def _gptqmodel_task(columns: int, config):
    from gptqmodel.quantization.gptq import GPTQ

    with torch.device("meta"):
        return GPTQ(torch.nn.Linear(columns, 8, bias=False), config)


@pytest.mark.parametrize("columns,tokens", [(300, 200), (300, 3000), (1100, 500)])  # 1100: inverted by halves
def test_the_inverse_factor_is_gptqmodels_and_as_accurate(columns, tokens):
    config = quantize_config(GptqSpec())
    hessian = _hessian(columns, tokens, seed=columns + tokens)
    ours = _inverse_factor(_gptqmodel_task(columns, config), hessian.clone())
    theirs, damp = _gptqmodel_task(columns, config).hessian_inverse(hessian.clone())
    assert damp == config.damp_percent
    assert torch.equal(ours, ours.triu())
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * theirs.abs().max().item())
    damped = hessian.double()
    damped.diagonal().add_(config.damp_percent * torch.mean(damped.diagonal()))
    exact = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    assert (ours.double() - exact).norm() <= 1.5 * (theirs.double() - exact).norm()


def test_a_hessian_the_damp_cannot_factor_gets_gptqmodels_recovery():
    config = quantize_config(GptqSpec())
    hessian = _hessian(64, 200, seed=9)
    hessian[3, 3] = -50.0  # not positive definite at the configured damp
    ours = _inverse_factor(_gptqmodel_task(64, config), hessian.clone())
    theirs, damp = _gptqmodel_task(64, config).hessian_inverse(hessian.clone())
    assert theirs is not None
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("group_size,desc_act,act_group_aware,columns,static_groups", [
    (32, False, True, 160, False),    # the job's default order, act-group-aware; a full and a partial block of 128
    (32, False, False, 160, False),   # natural order
    (32, True, False, 160, False),    # activation order
    (32, True, False, 160, True),     # activation order, groups fixed before the walk
    (64, True, False, 160, True),     # static groups, the last one shorter
    (-1, False, False, 160, False),   # one scale a row
    (64, False, True, 320, False),    # two groups begin in each block
    (256, False, False, 320, False),  # a group spans two blocks
])
def test_each_tenant_gets_the_codes_of_gptqmodels_own_solve(group_size, desc_act, act_group_aware, columns,
                                                            static_groups):
    config = quantize_config(GptqSpec(group_size=group_size, desc_act=desc_act, static_groups=static_groups))
    config = dataclasses.replace(config, act_group_aware=act_group_aware) if config.act_group_aware != act_group_aware else config
    assert config.act_group_aware == act_group_aware
    weights = _weights(3, 48, columns)
    hessians = [_hessian(columns, 300 + 50 * i, seed=i) for i in range(3)]
    tokens = [300, 350, 400]
    ours = solve_batched(weights, hessians, tokens, config)
    for weight, hessian, count, mine in zip(weights, hessians, tokens, ours):
        (theirs,) = solve_stacked([weight], hessian, count, config)
        _assert_same(mine, theirs)
    if static_groups:  # activation order in the walk, yet groups of consecutive columns in the checkpoint
        natural = torch.arange(columns, dtype=torch.int32) // group_size
        assert all(torch.equal(codes.g_idx.int(), natural) for codes in ours)


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
    from qlora_ray.fuse import gptq_batched

    config = quantize_config(GptqSpec(group_size=32))
    weights = _weights(2, 32, 64)
    hessians = [_hessian(64, 200, seed=5), _hessian(64, 200, seed=6)]
    real, batched_calls = gptq_batched._inverse_factor, []

    def second_fails_in_the_batch(task, matrix):
        batched_calls.append(matrix)
        return None if len(batched_calls) == 2 else real(task, matrix)

    monkeypatch.setattr(gptq_batched, "_inverse_factor", second_fails_in_the_batch)
    ours = solve_batched(weights, hessians, [200, 200], config)
    assert len(batched_calls) == 2
    for weight, hessian, mine in zip(weights, hessians, ours):
        _assert_same(mine, solve_stacked([weight], hessian, 200, config)[0])


def test_refuses_weights_of_different_shapes():
    config = quantize_config(GptqSpec(group_size=32))
    with pytest.raises(ValueError, match="one shape"):
        solve_batched([torch.zeros(8, 32), torch.zeros(16, 32)], [torch.eye(32)] * 2, [10, 10], config)
