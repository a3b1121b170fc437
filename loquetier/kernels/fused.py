"""The decoder layer's elementwise chains (RMSNorm, residual add + RMSNorm, SiLU-and-mul) as single ops.

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


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def add_rms_norm(out: torch.Tensor, delta, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(h), h) with h = residual + out (+ `delta`, a pending `LoraDelta` of out's layer).

    `residual` None: h = out (+ delta). Without autograd on CUDA this is one kernel (the delta's
    expand, the residual add and the norm); otherwise the ops run one after another.
    """
    if residual is None and delta is None:
        return rms_norm(out, weight, eps, backend), out
    if use_triton(out, backend) and not _needs_grad(out, residual, weight):
        from .fused_triton import add_rms_norm as kernel
        return kernel(out, delta, residual, weight, eps)
    if delta is not None:
        out = delta.apply_(out)
    h = out if residual is None else residual + out
    return rms_norm(h, weight, eps, backend), h


def silu_and_mul_with_delta(gate_up: torch.Tensor, delta, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up after adding `delta` (a pending two-slice `LoraDelta` of gate_up's layer, or None)."""
    if delta is None:
        return silu_and_mul(gate_up, backend)
    if use_triton(gate_up, backend) and not _needs_grad(gate_up):
        from .fused_triton import silu_and_mul_lora as kernel
        return kernel(gate_up, delta)
    return silu_and_mul(delta.apply_(gate_up), backend)
