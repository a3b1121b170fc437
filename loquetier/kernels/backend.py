"""Which path a kernel op takes: its Triton kernel or its plain-PyTorch reference.

`backend` is "auto" (Triton on CUDA tensors when Triton imports, the reference elsewhere),
"triton" (forced: on the CPU the kernels then run under TRITON_INTERPRET=1, as the tests do)
or "torch" (the reference).
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(x: torch.Tensor, backend: str = "auto") -> bool:
    if backend == "triton":
        return True
    return backend == "auto" and x.is_cuda and triton_available()
