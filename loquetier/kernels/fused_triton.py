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

from .smlm_triton import _dot_precision, _tile_lora_delta, rank_step, slot_ranks_pad

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


# --------------------------------------------------------------------------- inference-only fusions
# Forward-only kernels for steps without a backward (decode graphs, prefill). Each may also add a
# folded layer's pending LoRA delta (`LoraDelta`: every slot's shrink in v, each token adds its own
# slot's `scaling * B @ v`), rounding exactly where the separate expand kernel would: the result
# equals expand, then residual add, then RMSNorm (or SiLU-and-mul), up to fp32 summation order.

ADD_NORM_CHUNK = 1024
ADD_NORM_NUM_WARPS = 8
# The delta goes in by tiles of consecutive rows, any slot mix, addressed by token_slot alone
# (`_tile_lora_delta`); add + norm with a delta then runs as two kernels (the add over tiles of the
# whole grid, the norm per row). On the H200 this beat one program per row that read its slot's whole
# B, and per-segment SiLU tiles: 6.56 against 6.71 ms a batch-64 decode replay with 4 adapters. One
# kernel that sums each row's delta on the CUDA cores (1, 2 or 4 rows a program, chunks of 256-2048
# columns) took 8.2-23 us a call against the pair's 4.6 at batch 64 (rank 16, Llama-3-8B widths;
# `benchmarks/tune_many_adapters.py`), and at batches 1, 128 and 256 too.
# ADD_NORM_SPLIT_BASE: the same two kernels without a delta too (else one program per row).
ADD_NORM_SPLIT_BASE = False
LORA_TILE_M = 16
ADD_NORM_TILE_N = 128
# `python benchmarks/tune_many_adapters.py` on the H200 (batch 64): 128 columns on 8 warps beat 64 on 4
# at 16 and 64 adapters of ranks 8-64 (36.6 / 125 against 39.7 / 137 us a call) and are within 0.25 us
# of the fastest setting for 4 adapters of rank 16 (5.22 against 5.10 us; `--adapters 4 --ranks 16`).
# With a table of rank 16 or less, 128 columns ran faster on 4 warps than on 8 at batches 1, 64, 128 and
# 256 in two sweeps (64: 5.07-5.10 against 5.18-5.22 us; 256: 13.7 against 14.9), the fastest setting
# at 64-256: such tables take 4. In a batch-64 decode replay the two were equal (1.065x against 1.066x
# the base, `benchmarks/profile_decode.py --tile-configs 16x128x128x8,16x128x128x4`).
SILU_LORA_TILE_N = 128
SILU_LORA_NUM_WARPS = 8
SILU_LORA_NUM_WARPS_SMALL_RANK = 4
NORM_ROW_CHUNK = 4096


@triton.jit
def _normalize_row(h_ptr, w_ptr, y_ptr, row, width, rstd, CHUNK: tl.constexpr):
    """y[row] = w * round(h[row] * rstd), CHUNK columns at a time (h and y contiguous [N, width])."""
    dt = h_ptr.dtype.element_ty
    for c in range(0, width, CHUNK):
        cols = c + tl.arange(0, CHUNK)
        mask = cols < width
        h = tl.load(h_ptr + row * width + cols, mask=mask, other=0.0).to(tl.float32)
        normed = (h * rstd).to(dt).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * width + cols, (w * normed).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_rms_norm_kernel(out_ptr, res_ptr, w_ptr, y_ptr, h_ptr, width, eps, stride_out, stride_res,
                         CHUNK: tl.constexpr):
    # one program per row, no delta: pass 1 writes h = residual + out and sums h^2; pass 2 normalises
    row = tl.program_id(0).to(tl.int64)
    dt = h_ptr.dtype.element_ty
    sq = tl.zeros([CHUNK], dtype=tl.float32)
    for c in range(0, width, CHUNK):
        cols = c + tl.arange(0, CHUNK)
        mask = cols < width
        o = tl.load(out_ptr + row * stride_out + cols, mask=mask, other=0.0)
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        h = (r.to(tl.float32) + o.to(tl.float32)).to(dt)
        tl.store(h_ptr + row * width + cols, h, mask=mask)
        hf = h.to(tl.float32)
        sq += hf * hf
    rstd = tl.math.rsqrt(tl.sum(sq, axis=0) / width + eps)
    _normalize_row(h_ptr, w_ptr, y_ptr, row, width, rstd, CHUNK)


@triton.jit
def _grid_tile(n, width, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's [BLOCK_M, BLOCK_N] tile of an [n, width] grid: offsets, their masks, the 2-D mask."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < n
    mask_n = offs_n < width
    return offs_m, offs_n, mask_m, mask_n, mask_m[:, None] & mask_n[None, :]


@triton.jit
def _add_lora_sumsq_kernel(out_ptr, res_ptr, h_ptr, sq_ptr, v_ptr, b_ptr, scaling_ptr, token_slot_ptr, slot_rank_ptr,
                           n, width, num_chunks, stride_out, stride_res, stride_v, stride_vl, stride_bl, stride_bn,
                           stride_sl, rank, num_slots, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           RANK_PAD: tl.constexpr, HAS_RES: tl.constexpr, HAS_LORA: tl.constexpr,
                           DOT_PRECISION: tl.constexpr, HAS_SLOT_RANK: tl.constexpr, SLOTS_PAD: tl.constexpr,
                           RANK_STEP: tl.constexpr):
    # h = residual + (out + delta) over a [BLOCK_M, BLOCK_N] tile; each row's sum of h^2 over the tile
    # goes to sq[row, column tile], for the norm kernel to add up
    offs_m, offs_n, mask_m, mask_n, mask = _grid_tile(n, width, BLOCK_M, BLOCK_N)
    rows = offs_m[:, None].to(tl.int64)
    dt = h_ptr.dtype.element_ty
    o = tl.load(out_ptr + rows * stride_out + offs_n[None, :], mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + rows * stride_res + offs_n[None, :], mask=mask, other=0.0)
    h = o
    if HAS_LORA:
        zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        d, _ = _tile_lora_delta(zero, zero, offs_m, mask_m, offs_n, mask_n, v_ptr, b_ptr, scaling_ptr,
                                token_slot_ptr, 0, stride_v, stride_vl, stride_bl, stride_bn, stride_sl, rank,
                                RANK_PAD, False, DOT_PRECISION, slot_rank_ptr, HAS_SLOT_RANK, 1, num_slots, SLOTS_PAD,
                                RANK_STEP)
        h = (o.to(tl.float32) + d).to(dt)
    if HAS_RES:
        h = (r.to(tl.float32) + h.to(tl.float32)).to(dt)
    tl.store(h_ptr + rows * width + offs_n[None, :], h, mask=mask)
    hf = h.to(tl.float32)
    tl.store(sq_ptr + offs_m * num_chunks + tl.program_id(1), tl.sum(hf * hf, axis=1), mask=mask_m)


@triton.jit
def _rms_norm_from_sumsq_kernel(h_ptr, sq_ptr, w_ptr, y_ptr, width, num_chunks, eps, CHUNK: tl.constexpr,
                                CHUNKS_PAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs_c = tl.arange(0, CHUNKS_PAD)
    sq = tl.load(sq_ptr + row * num_chunks + offs_c, mask=offs_c < num_chunks, other=0.0)
    rstd = tl.math.rsqrt(tl.sum(sq, axis=0) / width + eps)
    _normalize_row(h_ptr, w_ptr, y_ptr, row, width, rstd, CHUNK)


# Tables of a smaller rank than this read B's zero padding past each slot's rank rather than mask it
# by the slot's rank: on the H200 (4 adapters of rank 16, `benchmarks/tune_many_adapters.py`) the
# masks cost SiLU-and-mul 13.6 against 10.3 us at batch 256 and the batch-128 replay 1.058x against
# 1.045x the base (`benchmarks/profile_decode.py`).
SLOT_RANK_MASK_MIN_TABLE_RANK = 32


def _delta_args(delta, num_slices: int, dummy: torch.Tensor):
    """Kernel arguments of a pending LoRA delta (`dummy` pointers, never read, without one), then the
    constexpr flags of `_tile_lora_delta` that follow from it: HAS_SLOT_RANK (B's padding past each
    slot's rank is skipped), SLOTS_PAD and RANK_STEP."""
    if delta is None:
        return (dummy, dummy, dummy, dummy, dummy, 0, 0, 0, 0, 0, 0, 16, 0), \
            dict(HAS_SLOT_RANK=False, SLOTS_PAD=0, RANK_STEP=1)
    assert len(delta.slice_offsets) - 1 == num_slices and delta.v.stride(1) == 1 and delta.lora_b.stride(2) == 1
    b, v, slot_rank = delta.lora_b, delta.v, delta.slot_rank
    if b.shape[2] < SLOT_RANK_MASK_MIN_TABLE_RANK:
        slot_rank = None
    assert slot_rank is None or slot_rank.dtype == torch.int32
    num_slots = b.shape[0]
    flags = dict(HAS_SLOT_RANK=slot_rank is not None, SLOTS_PAD=slot_ranks_pad(num_slots, slot_rank is not None),
                 RANK_STEP=rank_step(b.shape[2]))
    return (v, b, delta.scaling, delta.meta.token_slot, dummy if slot_rank is None else slot_rank, v.stride(0),
            delta.slot_stride, b.stride(0), b.stride(1), delta.scaling.stride(0), b.shape[2],
            max(16, triton.next_power_of_2(b.shape[2])), num_slots), flags


def add_rms_norm(out: torch.Tensor, delta, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """(rms_norm(h), h) with h = residual + (out + delta); no autograd. Without a delta one kernel
    (one program per row); with one, a tiled add that also sums each tile's squares, then the norm.

    `out` [N, D] may be a strided view (a folded GEMM's base columns); `delta` a `LoraDelta` of a
    one-slice layer or None; `residual` [N, D] or None (then h = out + delta).
    """
    assert out.dim() == 2 and out.stride(1) == 1 and weight.shape == (out.shape[1],)
    n, width = out.shape
    h = torch.empty(n, width, dtype=out.dtype, device=out.device)
    y = torch.empty(n, width, dtype=torch.promote_types(out.dtype, weight.dtype), device=out.device)
    if residual is not None:
        assert residual.shape == out.shape and residual.stride(1) == 1
    if not n:
        return y, h
    if delta is None and residual is not None and not ADD_NORM_SPLIT_BASE:
        _add_rms_norm_kernel[(n,)](out, residual, weight, y, h, width, eps, out.stride(0), residual.stride(0),
                                   CHUNK=min(ADD_NORM_CHUNK, triton.next_power_of_2(width)),
                                   num_warps=ADD_NORM_NUM_WARPS)
        return y, h
    (v, b, scaling, token_slot, slot_rank, s_v, s_vl, s_bl, s_bn, s_sl, rank, rank_pad, num_slots), flags = \
        _delta_args(delta, 1, out)
    chunks = triton.cdiv(width, ADD_NORM_TILE_N)
    sq = torch.empty(n, chunks, dtype=torch.float32, device=out.device)
    _add_lora_sumsq_kernel[(triton.cdiv(n, LORA_TILE_M), chunks)](
        out, residual if residual is not None else out, h, sq, v, b, scaling, token_slot, slot_rank, n, width, chunks,
        out.stride(0), residual.stride(0) if residual is not None else 0, s_v, s_vl, s_bl, s_bn, s_sl, rank,
        num_slots, BLOCK_M=LORA_TILE_M, BLOCK_N=ADD_NORM_TILE_N, RANK_PAD=rank_pad, HAS_RES=residual is not None,
        HAS_LORA=delta is not None, DOT_PRECISION=_dot_precision(out.dtype), num_warps=4, **flags)
    _rms_norm_from_sumsq_kernel[(n,)](h, sq, weight, y, width, chunks, eps,
                                      CHUNK=min(NORM_ROW_CHUNK, triton.next_power_of_2(width)),
                                      CHUNKS_PAD=triton.next_power_of_2(chunks), num_warps=ADD_NORM_NUM_WARPS)
    return y, h


@triton.jit
def _silu_and_mul_lora_tile_kernel(x_ptr, y_ptr, v_ptr, b_ptr, scaling_ptr, token_slot_ptr, slot_rank_ptr, n, inter,
                                   stride_x, stride_v, stride_vl, stride_bl, stride_bn, stride_sl, rank, num_slots,
                                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RANK_PAD: tl.constexpr,
                                   DOT_PRECISION: tl.constexpr, HAS_SLOT_RANK: tl.constexpr, SLOTS_PAD: tl.constexpr,
                                   RANK_STEP: tl.constexpr):
    offs_m, offs_n, mask_m, mask_n, mask = _grid_tile(n, inter, BLOCK_M, BLOCK_N)
    dt = x_ptr.dtype.element_ty
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_x + offs_n[None, :]
    gate = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptrs + inter, mask=mask, other=0.0).to(tl.float32)
    gate, up = _tile_lora_delta(gate, up, offs_m, mask_m, offs_n, mask_n, v_ptr, b_ptr, scaling_ptr, token_slot_ptr,
                                inter, stride_v, stride_vl, stride_bl, stride_bn, stride_sl, rank, RANK_PAD, True,
                                DOT_PRECISION, slot_rank_ptr, HAS_SLOT_RANK, 1, num_slots, SLOTS_PAD, RANK_STEP)
    gate = gate.to(dt).to(tl.float32)
    up = up.to(dt).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * inter + offs_n[None, :], (act * up).to(y_ptr.dtype.element_ty),
             mask=mask)


def silu_and_mul_lora(gate_up: torch.Tensor, delta) -> torch.Tensor:
    """silu(gate) * up of `gate_up` [N, 2*inter] (a strided view is fine) plus a pending two-slice
    (gate, up) `LoraDelta`, in one kernel; no autograd. Tiles of consecutive rows read each slot's B
    tile once (rows sorted by adapter, as a decode batch is, have one or two slots a tile)."""
    assert gate_up.dim() == 2 and gate_up.stride(1) == 1 and gate_up.shape[1] % 2 == 0
    n, inter = gate_up.shape[0], gate_up.shape[1] // 2
    assert delta.slice_offsets == (0, inter, 2 * inter)
    y = torch.empty(n, inter, dtype=gate_up.dtype, device=gate_up.device)
    (v, b, scaling, token_slot, slot_rank, s_v, s_vl, s_bl, s_bn, s_sl, rank, rank_pad, num_slots), flags = \
        _delta_args(delta, 2, gate_up)
    if n:
        grid = (triton.cdiv(n, LORA_TILE_M), triton.cdiv(inter, SILU_LORA_TILE_N))
        _silu_and_mul_lora_tile_kernel[grid](
            gate_up, y, v, b, scaling, token_slot, slot_rank, n, inter, gate_up.stride(0), s_v, s_vl, s_bl, s_bn,
            s_sl, rank, num_slots, BLOCK_M=LORA_TILE_M, BLOCK_N=SILU_LORA_TILE_N, RANK_PAD=rank_pad,
            DOT_PRECISION=_dot_precision(gate_up.dtype),
            num_warps=SILU_LORA_NUM_WARPS_SMALL_RANK if rank_pad <= 16 else SILU_LORA_NUM_WARPS, **flags)
    return y
