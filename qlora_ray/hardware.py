"""The machine a stage runs on: its device, what it computes natively (where that changes how a
stage should run), and its peak memory."""

from __future__ import annotations

import resource


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


def preferred_device() -> str:
    """The device a stage's work runs on: the GPU Ray gave this process, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def peak_memory_bytes(device: str) -> int:
    """Peak GPU memory allocated, or this process's peak resident set on the CPU."""
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
