"""serve/marlin.py's pure parts on the CPU: the kernel's type id and scale order must be GPTQModel's
(the kernel itself runs on CUDA only: tests/gpu/test_serve_gpu.py), and without CUDA the loader
says why and GPTQ weights fall back to dequantized ones."""

from __future__ import annotations

import pytest
import torch

from qlora_ray.serve import marlin
from qlora_ray.serve.weights import build_decoder
from qlora_ray.shapes import shape_config


def test_weight_type_id_and_scale_order_are_gptqmodels():
    from gptqmodel.utils.marlin import get_scale_perms
    from gptqmodel.utils.marlin_scalar_type import scalar_types

    assert marlin.UINT4B8 == scalar_types.uint4b8.id
    grouped, per_column = get_scale_perms()
    assert marlin._scale_permutation(128, 4096) == grouped
    assert marlin._scale_permutation(4096, 4096) == per_column


@pytest.mark.parametrize("in_features, out_features, group_size, fits", [
    (4096, 6144, 128, True), (14336, 4096, 128, True), (256, 512, 64, True), (576, 960, 64, False),
    (64, 64, 64, False),
    (4096, 4100, 128, False), (4096, 4096, 96, False)])
def test_fits_marlins_tiles(in_features, out_features, group_size, fits):
    assert marlin.fits(in_features, out_features, group_size) is fits


def test_act_order_is_columns_out_of_group_order():
    consecutive = (torch.arange(512) // 128).int()
    assert not marlin.act_order(consecutive, 128)
    assert marlin.act_order(consecutive[torch.randperm(512, generator=torch.Generator().manual_seed(0))], 128)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour")
def test_without_cuda_the_reason_is_given_and_the_kernel_choice_is_checked():
    with pytest.raises(marlin.MarlinUnavailable, match="no CUDA device"):
        marlin.ops()
    assert marlin.unavailable_reason() == "no CUDA device"
    with pytest.raises(ValueError, match="int4_kernel 'fast'"):
        build_decoder(shape_config("tiny"), {}, None, device=torch.device("cpu"), dtype=torch.float32,
                      int4_kernel="fast")
