"""Triton kernels for the decoder layer's elementwise chains, each with a fused backward.

    rms_norm:      y = weight * round(x * rstd),  rstd = 1 / sqrt(mean(x^2) + eps)   (per row)
    silu_and_mul:  y = round(silu(gate)) * up,     [gate | up] = x along the last dim

`round` is a cast to the input's dtype: the kernels round where the PyTorch references do, so
16-bit results agree with them up to the last bit's rounding. Arithmetic is fp32 throughout.
The references and the dispatch live in `fused.py`; the autograd Functions here save only the
inputs (and the per-row rstd), recomputing the rest in the backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# silu_and_mul: a [BLOCK] slice of one row per program, 16-byte loads of 16-bit values per thread.
SILU_BLOCK = 1024
SILU_NUM_WARPS = 4


def _norm_num_warps(block: int) -> int:
    # one program per row holds the whole row in registers: wider rows get more warps
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


# --------------------------------------------------------------------------- RMSNorm


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, heads, stride_x0, stride_x1, width, eps,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    x_row = x_ptr + (row // heads) * stride_x0 + (row % heads) * stride_x1
    x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / width + eps)
    tl.store(rstd_ptr + row, rstd)
    normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * width + cols, (w * normed).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_rows_ptr, heads,
                         stride_x0, stride_x1, stride_dy0, stride_dy1, width,
                         BLOCK: tl.constexpr, HAS_DW: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    outer, head = row // heads, row % heads
    x = tl.load(x_ptr + outer * stride_x0 + head * stride_x1 + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + outer * stride_dy0 + head * stride_dy1 + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + row)
    normed = x * rstd
    dnormed = dy * w
    # d/dx of x * rstd(x): rstd * (dn - n * mean(dn * n))
    dx = rstd * (dnormed - normed * (tl.sum(dnormed * normed, axis=0) / width))
    tl.store(dx_ptr + row * width + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if HAS_DW:  # this row's share of dweight; the sum over rows is one torch reduction
        normed_rounded = normed.to(x_ptr.dtype.element_ty).to(tl.float32)
        tl.store(dw_rows_ptr + row * width + cols, dy * normed_rounded, mask=mask)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., D] as [A, heads, D] with unit last stride, a view where the strides allow.

    Qwen3's q/k norm gets [N, heads, D] slices of the fused qkv output: rows are not evenly
    spaced there, so a row is addressed as (row // heads, row % heads).
    """
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-2] if t.dim() > 2 else 1, t.shape[-1])


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        width = x.shape[-1]
        assert weight.shape == (width,), (weight.shape, x.shape)
        x3 = _as_rows(x)
        rows = x3.shape[0] * x3.shape[1]
        y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        if rows:
            block = triton.next_power_of_2(width)
            _rms_norm_fwd_kernel[(rows,)](x3, weight, y, rstd, x3.shape[1], x3.stride(0), x3.stride(1),
                                          width, eps, BLOCK=block, num_warps=_norm_num_warps(block))
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[:2]
        width = x.shape[-1]
        x3, dy3 = _as_rows(x), _as_rows(dy)
        rows = rstd.shape[0]
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        dw_rows = torch.empty(rows if need_dw else 0, width, dtype=torch.float32, device=x.device)
        if rows:
            block = triton.next_power_of_2(width)
            _rms_norm_bwd_kernel[(rows,)](dy3, x3, weight, rstd, dx, dw_rows, x3.shape[1],
                                          x3.stride(0), x3.stride(1), dy3.stride(0), dy3.stride(1), width,
                                          BLOCK=block, HAS_DW=need_dw, num_warps=_norm_num_warps(block))
        dw = dw_rows.sum(0).to(weight.dtype) if need_dw else None
        return (dx if need_dx else None), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of `x` [..., D] (any leading dims), differentiable in x and weight."""
    return _RMSNormFunction.apply(x, weight, eps)


# --------------------------------------------------------------------------- SiLU-and-mul


@triton.jit
def _silu_and_mul_fwd_kernel(x_ptr, y_ptr, inter, stride_x, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + row * inter + cols, (act * up).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_and_mul_bwd_kernel(dy_ptr, x_ptr, dx_ptr, inter, stride_dy, stride_x, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-gate))
    act = (gate * sig).to(x_ptr.dtype.element_ty).to(tl.float32)
    dgate = dy * up * sig * (1.0 + gate * (1.0 - sig))
    dx_row = dx_ptr + row * 2 * inter
    tl.store(dx_row + cols, dgate.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dx_row + inter + cols, (dy * act).to(dx_ptr.dtype.element_ty), mask=mask)


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])


class _SiluAndMulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        x = _as_matrix(gate_up)
        inter = x.shape[1] // 2
        y = torch.empty(*gate_up.shape[:-1], inter, dtype=gate_up.dtype, device=gate_up.device)
        if x.numel():
            grid = (x.shape[0], triton.cdiv(inter, SILU_BLOCK))
            _silu_and_mul_fwd_kernel[grid](x, y, inter, x.stride(0), BLOCK=SILU_BLOCK, num_warps=SILU_NUM_WARPS)
        ctx.save_for_backward(gate_up)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (gate_up,) = ctx.saved_tensors
        x, dy2 = _as_matrix(gate_up), _as_matrix(dy)
        inter = x.shape[1] // 2
        dx = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
        if x.numel():
            grid = (x.shape[0], triton.cdiv(inter, SILU_BLOCK))
            _silu_and_mul_bwd_kernel[grid](dy2, x, dx, inter, dy2.stride(0), x.stride(0),
                                           BLOCK=SILU_BLOCK, num_warps=SILU_NUM_WARPS)
        return dx


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for `gate_up` [..., 2 * inter] = [gate | up]; returns [..., inter]."""
    assert gate_up.shape[-1] % 2 == 0, gate_up.shape
    return _SiluAndMulFunction.apply(gate_up)
