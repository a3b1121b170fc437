"""Which step failures the engine survives, and what a training job that failed is told.

A CUDA error is sticky: once a kernel faults, every later launch in the process fails too and the
device memory can no longer be trusted, so no step after it can succeed. Running out of memory is
not: the allocation failed, nothing was corrupted, and the work that needed the memory can be
dropped while everything else goes on.
"""

from __future__ import annotations

import torch

# torch.AcceleratorError (torch >= 2.8) is what a faulted CUDA/XPU kernel raises; older versions
# raise a RuntimeError whose message names the failing API
_DEVICE_ERROR_TYPES = tuple(getattr(torch, name) for name in ("AcceleratorError",) if hasattr(torch, name))
_DEVICE_ERROR_MARKERS = ("CUDA error", "CUDA driver error", "Triton Error [CUDA]")


def is_device_failure(error: BaseException) -> bool:
    """True when `error` means the device itself failed (no later step can be trusted)."""
    if isinstance(error, torch.OutOfMemoryError):
        return False
    if _DEVICE_ERROR_TYPES and isinstance(error, _DEVICE_ERROR_TYPES):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in _DEVICE_ERROR_MARKERS)


def training_failure_message(error: BaseException) -> str:
    """What a job whose training step raised `error` reports (its API error message)."""
    if isinstance(error, torch.OutOfMemoryError):
        detail = str(error).strip().splitlines()[0] if str(error).strip() else "out of memory"
        return (f"out of GPU memory in a training step ({detail}); use a smaller batch_size or shorter "
                "examples, or leave more memory free for training (a smaller --num-kv-blocks)")
    return f"training step failed: {type(error).__name__}: {error}"
