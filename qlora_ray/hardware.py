"""What the machine computes natively, where that changes how a stage should run."""

from __future__ import annotations


def native_bf16(device: str) -> bool:
    """Whether bf16 matmuls run natively: on a GPU, and on a CPU with AVX512-BF16 (bitsandbytes' own
    test, which also picks its bf16 CPU kernels). Elsewhere they are emulated, tens of times slower
    than fp32."""
    if device == "cuda":
        return True
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:
        return False
    return bool(has_avx512bf16())


def compute_dtype(device: str):
    """bf16 where it is native, else fp32: the dtype to train and quantize in on `device`."""
    import torch

    return torch.bfloat16 if native_bf16(device) else torch.float32
