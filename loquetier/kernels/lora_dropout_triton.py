"""Triton kernel for counter-based LoRA dropout (see `lora_dropout.py` for the math and the reference)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import lora_dropout as ref

# compiled kernels read module globals only as constexprs
MIX_A = tl.constexpr(ref.MIX_A)
MIX_B = tl.constexpr(ref.MIX_B)
COL_MUL = tl.constexpr(ref.COL_MUL)

DROPOUT_BLOCK = 1024     # columns per program: 16-byte accesses for 16-bit values
DROPOUT_NUM_WARPS = 4


@triton.jit
def _mix32(h):
    h = h ^ (h >> 16)
    h = h * MIX_A
    h = h ^ (h >> 15)
    h = h * MIX_B
    return h ^ (h >> 16)


@triton.jit(do_not_specialize=["n_rows", "salt"])
def _lora_dropout_kernel(x_ptr, out_ptr, keys_ptr, token_slot_ptr, slot_p_ptr, n_rows, width, salt,
                         stride_x, stride_out, BLOCK: tl.constexpr):
    # grid: (row, column block); rows >= n_rows are copied unchanged
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=mask, other=0.0)
    if row < n_rows:
        p = tl.load(slot_p_ptr + tl.load(token_slot_ptr + row))
        key = tl.load(keys_ptr + row).to(tl.uint32)
        h = _mix32(key ^ salt.to(tl.uint32))
        u = (_mix32(h ^ (cols.to(tl.uint32) * COL_MUL)) >> 8).to(tl.float32) * (1.0 / 16777216.0)
        scale = tl.where(u >= p, 1.0 / (1.0 - p), 0.0)
        x = (x.to(tl.float32) * scale).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row.to(tl.int64) * stride_out + cols, x, mask=mask)


def lora_dropout(x: torch.Tensor, n_rows: int, keys: torch.Tensor, token_slot: torch.Tensor,
                 slot_p: torch.Tensor, salt: int) -> torch.Tensor:
    assert x.dim() == 2 and x.stride(1) == 1 and slot_p.dtype == torch.float32
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.shape[0] == 0:
        return out
    grid = (x.shape[0], triton.cdiv(x.shape[1], DROPOUT_BLOCK))
    _lora_dropout_kernel[grid](x, out, keys, token_slot, slot_p, n_rows, x.shape[1], salt,
                               x.stride(0), out.stride(0), BLOCK=DROPOUT_BLOCK, num_warps=DROPOUT_NUM_WARPS)
    return out
