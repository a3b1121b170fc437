"""The decoder layer's elementwise chains (RMSNorm, SiLU-and-mul) as single ops.

On CUDA each is one fused Triton kernel forward and one backward (`fused_triton.py`): as a chain
of PyTorch ops each costs several launches and autograd nodes per layer, which keeps LoRA
training host-bound. Elsewhere the plain-PyTorch references below run, with their exact numerics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import use_triton


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm: normalize in fp32, round to x's dtype, then scale by the weight."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for `gate_up` [..., 2 * inter] = [gate | up]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto") -> torch.Tensor:
    """RMSNorm over the last dim of x [..., D]; backend "auto" (Triton on CUDA), "triton" or "torch"."""
    if use_triton(x, backend):
        from .fused_triton import rms_norm as kernel
        return kernel(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def silu_and_mul(gate_up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up for gate_up [..., 2 * inter]; backend "auto" (Triton on CUDA), "triton" or "torch"."""
    if use_triton(gate_up, backend):
        from .fused_triton import silu_and_mul as kernel
        return kernel(gate_up)
    return silu_and_mul_ref(gate_up)
