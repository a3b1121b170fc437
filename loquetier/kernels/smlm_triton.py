"""Triton kernels for Segmented Multi-LoRA Multiplication (SMLM).

One flat token batch, split into contiguous segments that each use one adapter slot:

    shrink:  v[t]                  = lora_a[slot(t)] @ x[t]                          # [S*R]
    expand:  y[t, o_s:o_{s+1}]    += scaling[slot(t), s] * lora_b[slot(t), o_s:o_{s+1}] @ v[t, s*R:(s+1)*R]

Layouts (one, possibly fused, linear layer with S output slices and max rank R):
    x        [N, d_in]                 activations, unit last stride
    lora_a   [L, S*R, d_in]            slice s uses rows s*R..(s+1)*R, ranks < R zero-padded
    lora_b   [L, d_out_total, R]       rows o_s..o_{s+1} belong to slice s
    scaling  [L, S] fp32
    seg_cu   [G+1] int32 token offsets; seg_slot [G] int32 (-1 = no adapter)
    token_slot [N] int32, used by the decode (gather) path

Each op is one launch for all segments and slices (shrink adds a tiny sum kernel when it splits
d_in). Two paths, picked on the host from ``max_seg_len``: segment-grouped ``tl.dot`` tiles when
some segment is longer than one token (reads seg_cu/seg_slot), and a per-token gather (GEMV) when
every segment is one token (reads token_slot). Segments only mean "a run of tokens with one slot":
an engine that orders decode tokens by adapter and gives each run one segment lets its decode
tokens share weight tiles (the segment path), which beats the gather path from about 32 tokens.
The backward for training segments is plain torch (``smlm._SMLMFunction``): few, large matmuls.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

MAX_SLICES = 4  # expand takes the slice boundaries as scalar arguments
GATHER_MAX_SEG_LEN = 1  # segments no longer than this use the per-token gather path

# Segment-grouped path (prefill / training); tuned on H100, bf16, d=4096, R=16, S=3.
SHRINK_BLOCK_M = 64
SHRINK_BLOCK_N_MAX = 32  # several programs over the few S*R rows beat one wide tile
SHRINK_BLOCK_K = 64
SHRINK_NUM_WARPS = 4
SHRINK_NUM_STAGES = 4
EXPAND_BLOCK_M = 32
EXPAND_BLOCK_N = 128
EXPAND_NUM_WARPS = 4
EXPAND_NUM_STAGES = 3
# Decode-sized batches (<= SHORT_BATCH_TOKENS tokens: many short segments, one per adapter) take
# narrower token tiles: H200, batch 64 of 16 adapters (four rows each) and of 64 (one row each),
# Llama-3-8B shapes (`benchmarks/tune_many_adapters.py`): shrink 16 x 64 instead of 64 x 32 saved
# 2-12 us per layer and projection, expand 16 x 256 instead of 32 x 128 up to 5 us (gate/up, q/k/v).
SHORT_BATCH_TOKENS = 256
SHRINK_SHORT_BLOCK_M = 16
SHRINK_SHORT_BLOCK_N_MAX = 64
EXPAND_SHORT_BLOCK_M = 16
EXPAND_SHORT_BLOCK_N = 256
# Both shrink paths split d_in across programs (fp32 partials + a small sum kernel) until
# tiles x splits reach SHRINK_WAVES waves of SMs: small batches are latency-, not bandwidth-bound.
SHRINK_SPLIT_K_MAX = 16
SHRINK_WAVES = 2
# Gather path (decode).
SHRINK_GATHER_BLOCK_N_MAX = 16
SHRINK_GATHER_BLOCK_K = 512
# the gather shrink's K tile when tokens x row tiles fill the GPU without splitting d_in: 64 distinct
# adapters at batch 64 on the H200, shrink + expand, down 36.3 against 45.5 us, gate/up 86.3 against
# 89.4 (`python benchmarks/tune_many_adapters.py`); small batches keep the narrower tile and its splits
SHRINK_GATHER_BLOCK_K_UNSPLIT = 1024
SHRINK_GATHER_NUM_WARPS = 4
EXPAND_GATHER_BLOCK_N = 128
EXPAND_GATHER_NUM_WARPS = 4
# From GATHER_MANY_TOKENS tokens (the per-token graphs of many adapters, where every row has its own
# slot) the gather expand's programs fill the GPU many times over, and 2 warps a program beat 4: H200,
# 64 adapters, Llama-3-8B shapes, per layer (q/k/v + o + gate/up + down) 16 us less at batch 64, 36 at
# 128, 67 at 256, gate/up most (`python benchmarks/tune_many_adapters.py --sections gather-grid`).
# Smaller batches were not timed with 2 warps and keep 4.
GATHER_MANY_TOKENS = 32
EXPAND_GATHER_NUM_WARPS_MANY_TOKENS = 2


def _ptr_or(t: torch.Tensor | None, dummy: torch.Tensor) -> torch.Tensor:
    """`t`, or for an optional input the kernel does not read (its flag off) any tensor as its pointer."""
    return dummy if t is None else t


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would otherwise run as tf32 on GPU; 16-bit inputs ignore this.
    return "ieee" if dtype == torch.float32 else "tf32"


# Kernels that learn a token's slot from memory read the slot-rank table whole, in the same wave as
# the slot ids, and pick each slot's rank from registers: a load of one entry, which can only start
# once the slot id has arrived, would add a memory latency before the loads of B, in kernels that are
# latency-bound at decode sizes. Tables of more slots than this read the one entry.
SLOT_RANKS_IN_REGISTERS_MAX = 1024


def slot_ranks_pad(num_slots: int, has_slot_rank: bool) -> int:
    """SLOTS_PAD of the kernels that take one: the rank table's padded length, 0 to read one entry a slot."""
    if not has_slot_rank or num_slots > SLOT_RANKS_IN_REGISTERS_MAX:
        return 0
    return triton.next_power_of_2(num_slots)


def rank_step(table_rank: int) -> int:
    """What a slot's rank is rounded up to where a kernel masks B by it: 8 ranks (16 bytes of a 16-bit
    B row) when the table's rank allows, so that the masked loads stay vectorised."""
    return 8 if table_rank % 8 == 0 else 1


def _rank_pad(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot needs every dim >= 16


# --------------------------------------------------------------------------- segment tiles


@triton.jit
def _segment_tile(pid, seg_cu_ptr, num_segments, BLOCK_M: tl.constexpr, SEG_PAD: tl.constexpr):
    """Flat token-tile index -> (segment, first token, end token); segment >= num_segments: no tile.

    Segments are cut into BLOCK_M-token tiles one after another, so the grid needs only
    cdiv(N, BLOCK_M) + G programs whatever the mix of long and one-token segments.
    """
    offs = tl.arange(0, SEG_PAD)
    mask = offs < num_segments
    lo = tl.load(seg_cu_ptr + offs, mask=mask, other=0)
    hi = tl.load(seg_cu_ptr + offs + 1, mask=mask, other=0)
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    tiles_end = tl.cumsum(tiles, axis=0)
    g = tl.sum((tiles_end <= pid).to(tl.int32), axis=0)
    pick = offs == g
    first_tile = tl.sum(tl.where(pick, tiles_end - tiles, 0), axis=0)
    m_start = tl.sum(tl.where(pick, lo, 0), axis=0) + (pid - first_tile) * BLOCK_M
    seg_end = tl.sum(tl.where(pick, hi, 0), axis=0)
    return g, m_start, seg_end


MIN_SEG_PAD = 64  # coarse buckets: a new segment count rarely means a new compile mid-serving


def _seg_pad(num_segments: int) -> int:
    return max(MIN_SEG_PAD, triton.next_power_of_2(num_segments))


def _segment_grid_rows(num_tokens: int, num_segments: int, block_m: int) -> int:
    return triton.cdiv(num_tokens, block_m) + num_segments  # >= sum over segments of cdiv(len, block_m)


# --------------------------------------------------------------------------- shrink


@triton.jit
def _live_rows(mask_n, offs_n, slot, slot_rank_ptr, rank, HAS_SLOT_RANK: tl.constexpr):
    """Rows of A (or ranks of v) that hold weights: row n of slice n // R is rank n % R, and ranks at
    or past the slot's own (`slot_rank[slot]`, zero padding) need not be read."""
    if HAS_SLOT_RANK:
        mask_n = mask_n & ((offs_n % rank) < tl.load(slot_rank_ptr + slot))
    return mask_n


@triton.jit
def _rounded_rank(live_rank, RANK_STEP: tl.constexpr):
    """A slot's rank rounded up to RANK_STEP (`rank_step`): the masks of B and v built from it keep
    the 16-byte vectors that a mask of any length would likely cost (the padding read is zeros)."""
    return (live_rank + RANK_STEP - 1) // RANK_STEP * RANK_STEP


@triton.jit(do_not_specialize=["num_segments"])  # a new segment count is no new compile
def _shrink_segment_kernel(
    x_ptr, a_ptr, out_ptr, seg_cu_ptr, seg_slot_ptr, slot_rank_ptr,
    d_in, num_rows, rank, num_segments, k_per_split,  # num_rows = S*R, rank = R
    stride_xm, stride_al, stride_an, stride_os, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SEG_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HAS_SLOT_RANK: tl.constexpr,
):
    # grid: (token tile of some segment, tile of the S*R outputs, split of d_in).
    # With several splits, out is an fp32 workspace [splits, N, S*R] that _sum_splits_kernel reduces.
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    g, m_start, seg_end = _segment_tile(tl.program_id(0), seg_cu_ptr, num_segments, BLOCK_M, SEG_PAD)
    if g >= num_segments:
        return
    slot = tl.load(seg_slot_ptr + g)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < seg_end
    mask_n = offs_n < num_rows
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if slot >= 0:  # slot -1: the rows are written as zeros
        mask_a = _live_rows(mask_n, offs_n, slot, slot_rank_ptr, rank, HAS_SLOT_RANK)
        k_start = split * k_per_split
        # a tile of padding rows only (ranks past the slot's own) reads nothing and writes zeros
        k_end = tl.where(tl.max(mask_a.to(tl.int32), axis=0) > 0, tl.minimum(k_start + k_per_split, d_in), k_start)
        x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + k_start + offs_k[None, :]
        a_ptrs = a_ptr + slot.to(tl.int64) * stride_al + offs_n[None, :] * stride_an + k_start + offs_k[:, None]
        for k in range(k_start, k_end, BLOCK_K):
            mask_k = offs_k < k_end - k
            x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]
            a = tl.load(a_ptrs, mask=mask_k[:, None] & mask_a[None, :], other=0.0)  # [BK, BN]
            acc = tl.dot(x, a, acc, input_precision=DOT_PRECISION)
            x_ptrs += BLOCK_K
            a_ptrs += BLOCK_K
    out_ptrs = out_ptr + split * stride_os + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _shrink_gather_kernel(
    x_ptr, a_ptr, out_ptr, token_slot_ptr, slot_rank_ptr,
    d_in, num_rows, rank, k_per_split,
    stride_xm, stride_al, stride_an, stride_os, stride_om,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_SLOT_RANK: tl.constexpr,
):
    # grid: (token, tile of the S*R outputs, split of d_in); one GEMV per token.
    # With several splits, out is an fp32 workspace [splits, N, S*R] that _sum_splits_kernel reduces.
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    slot = tl.load(token_slot_ptr + t)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < num_rows
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if slot >= 0:
        mask_a = _live_rows(mask_n, offs_n, slot, slot_rank_ptr, rank, HAS_SLOT_RANK)
        k_start = split * k_per_split
        k_end = tl.where(tl.max(mask_a.to(tl.int32), axis=0) > 0, tl.minimum(k_start + k_per_split, d_in), k_start)
        x_ptrs = x_ptr + t.to(tl.int64) * stride_xm + k_start + offs_k
        a_ptrs = a_ptr + slot.to(tl.int64) * stride_al + offs_n[:, None] * stride_an + k_start + offs_k[None, :]
        for k in range(k_start, k_end, BLOCK_K):
            mask_k = offs_k < k_end - k
            x = tl.load(x_ptrs, mask=mask_k, other=0.0).to(tl.float32)  # [BK]
            a = tl.load(a_ptrs, mask=mask_a[:, None] & mask_k[None, :], other=0.0)  # [BN, BK]
            acc += a.to(tl.float32) * x[None, :]
            x_ptrs += BLOCK_K
            a_ptrs += BLOCK_K
    out = tl.sum(acc, axis=1)
    out_ptrs = out_ptr + split * stride_os + t.to(tl.int64) * stride_om + offs_n
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_n)


@triton.jit(do_not_specialize=["num_tokens"])
def _sum_splits_kernel(
    part_ptr, v_ptr, num_tokens, num_rows, stride_vm,
    BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
):
    # grid: (token,); v[t] = sum over splits of part[split, t]  (part: fp32 [SPLIT_K, N, S*R])
    t = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, SPLIT_K)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < num_rows
    parts = tl.load(part_ptr + ((offs_s * num_tokens + t) * num_rows)[:, None] + offs_n[None, :],
                    mask=mask_n[None, :], other=0.0)
    tl.store(v_ptr + t * stride_vm + offs_n, tl.sum(parts, axis=0).to(v_ptr.dtype.element_ty), mask=mask_n)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_k(num_programs: int, d_in: int, block_k: int, device: torch.device) -> int:
    """Split d_in across programs (power of two) when token x row tiles cannot fill the GPU."""
    want = triton.cdiv(SHRINK_WAVES * _num_sms(device), num_programs)
    most = min(SHRINK_SPLIT_K_MAX, triton.cdiv(d_in, block_k))
    split = 1
    while split * 2 <= min(want, most):
        split *= 2
    return split


def shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    seg_cu: torch.Tensor,
    seg_slot: torch.Tensor,
    token_slot: torch.Tensor,
    max_seg_len: int,
    out: torch.Tensor | None = None,
    slot_rank: torch.Tensor | None = None,
    table_rank: int = 0,
) -> torch.Tensor:
    """v[t] = lora_a[slot(t)] @ x[t] for all tokens in one launch; [N, S*R] in x.dtype, 0 where slot -1.

    ``out`` (optional, [N, S*R], unit last stride) is written instead of a new tensor. ``slot_rank``
    (optional, int32 [L]) with ``table_rank`` R: each slot's rank; the zero rows past it are not read.
    """
    assert x.dim() == 2 and lora_a.dim() == 3 and x.shape[1] == lora_a.shape[2]
    assert x.stride(1) == 1 and lora_a.stride(2) == 1 and x.dtype == lora_a.dtype
    num_tokens, d_in = x.shape
    num_rows = lora_a.shape[1]
    rank = table_rank or num_rows
    assert slot_rank is None or (table_rank > 0 and num_rows % table_rank == 0 and slot_rank.dtype == torch.int32)
    if out is None:
        out = torch.empty(num_tokens, num_rows, dtype=x.dtype, device=x.device)
    assert out.shape == (num_tokens, num_rows) and out.stride(1) == 1
    v = out
    if num_tokens == 0:
        return v
    gather = max_seg_len <= GATHER_MAX_SEG_LEN
    short = num_tokens <= SHORT_BATCH_TOKENS
    block_m = SHRINK_SHORT_BLOCK_M if short else SHRINK_BLOCK_M
    block_n_max = SHRINK_GATHER_BLOCK_N_MAX if gather else SHRINK_SHORT_BLOCK_N_MAX if short else SHRINK_BLOCK_N_MAX
    block_n = min(max(16, triton.next_power_of_2(num_rows)), block_n_max)
    block_k = SHRINK_GATHER_BLOCK_K if gather else SHRINK_BLOCK_K
    num_segments = seg_slot.numel()
    grid_rows = num_tokens if gather else _segment_grid_rows(num_tokens, num_segments, block_m)
    row_tiles = triton.cdiv(num_rows, block_n)
    split_k = _split_k(grid_rows * row_tiles, d_in, block_k, x.device)
    if gather and split_k == 1:
        block_k = SHRINK_GATHER_BLOCK_K_UNSPLIT
    k_per_split = triton.cdiv(triton.cdiv(d_in, split_k), block_k) * block_k
    part = v if split_k == 1 else torch.empty(split_k, num_tokens, num_rows, dtype=torch.float32, device=x.device)
    split_stride = 0 if split_k == 1 else part.stride(0)
    if gather:
        _shrink_gather_kernel[(num_tokens, row_tiles, split_k)](
            x, lora_a, part, token_slot, _ptr_or(slot_rank, token_slot), d_in, num_rows, rank, k_per_split,
            x.stride(0), lora_a.stride(0), lora_a.stride(1), split_stride, part.stride(-2),
            BLOCK_N=block_n, BLOCK_K=block_k, HAS_SLOT_RANK=slot_rank is not None,
            num_warps=SHRINK_GATHER_NUM_WARPS,
        )
    else:
        _shrink_segment_kernel[(grid_rows, row_tiles, split_k)](
            x, lora_a, part, seg_cu, seg_slot, _ptr_or(slot_rank, seg_slot), d_in, num_rows, rank, num_segments,
            k_per_split,
            x.stride(0), lora_a.stride(0), lora_a.stride(1), split_stride, part.stride(-2),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            SEG_PAD=_seg_pad(num_segments), DOT_PRECISION=_dot_precision(x.dtype),
            HAS_SLOT_RANK=slot_rank is not None, num_warps=SHRINK_NUM_WARPS, num_stages=SHRINK_NUM_STAGES,
        )
    if split_k > 1:
        _sum_splits_kernel[(num_tokens,)](
            part, v, num_tokens, num_rows, v.stride(0),
            BLOCK_N=triton.next_power_of_2(num_rows), SPLIT_K=split_k,
        )
    return v


# --------------------------------------------------------------------------- expand


@triton.jit
def _slice_of_tile(pid_n, T1, T2, T3, O1, O2, O3, O4):
    """Map a flat output-tile index to (slice, first tile of the slice, o_s, o_{s+1})."""
    s = (pid_n >= T1).to(tl.int32) + (pid_n >= T2).to(tl.int32) + (pid_n >= T3).to(tl.int32)
    tile0 = tl.where(s == 0, 0, tl.where(s == 1, T1, tl.where(s == 2, T2, T3)))
    o_lo = tl.where(s == 0, 0, tl.where(s == 1, O1, tl.where(s == 2, O2, O3)))
    o_hi = tl.where(s == 0, O1, tl.where(s == 1, O2, tl.where(s == 2, O3, O4)))
    return s, tile0, o_lo, o_hi


@triton.jit(do_not_specialize=["num_segments"])  # a new segment count is no new compile
def _expand_segment_kernel(
    y_ptr, v_ptr, b_ptr, scaling_ptr, seg_cu_ptr, seg_slot_ptr, slot_rank_ptr,
    rank, num_segments,
    T1, T2, T3, O1, O2, O3, O4,
    stride_ym, stride_vm, stride_vl, stride_bl, stride_bn, stride_sl,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RANK_PAD: tl.constexpr, SEG_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HAS_SLOT_RANK: tl.constexpr, RANK_STEP: tl.constexpr,
):
    # grid: (token tile of some segment, output tile of some slice)
    pid_n = tl.program_id(1)
    g, m_start, seg_end = _segment_tile(tl.program_id(0), seg_cu_ptr, num_segments, BLOCK_M, SEG_PAD)
    if g >= num_segments:
        return
    slot = tl.load(seg_slot_ptr + g)
    if slot < 0:
        return
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, RANK_PAD)
    mask_m = offs_m < seg_end
    mask_r = offs_r < rank
    if HAS_SLOT_RANK:
        live_rank = tl.load(slot_rank_ptr + slot)
        mask_r = offs_r < _rounded_rank(live_rank, RANK_STEP)
    s, tile0, o_lo, o_hi = _slice_of_tile(pid_n, T1, T2, T3, O1, O2, O3, O4)
    offs_n = o_lo + (pid_n - tile0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < o_hi
    v_ptrs = v_ptr + offs_m[:, None].to(tl.int64) * stride_vm + slot * stride_vl + s * rank + offs_r[None, :]
    v = tl.load(v_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0)  # [BM, RP]
    b_ptrs = b_ptr + slot.to(tl.int64) * stride_bl + offs_n[None, :] * stride_bn + offs_r[:, None]
    b = tl.load(b_ptrs, mask=mask_r[:, None] & mask_n[None, :], other=0.0)  # [RP, BN]
    acc = tl.dot(v, b, input_precision=DOT_PRECISION)
    scale = tl.load(scaling_ptr + slot * stride_sl + s)
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    mask_y = mask_m[:, None] & mask_n[None, :]
    y = tl.load(y_ptrs, mask=mask_y, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + scale * acc).to(y_ptr.dtype.element_ty), mask=mask_y)


@triton.jit
def _tile_lora_delta(acc0, acc1, offs_m, mask_m, offs_n, mask_n, v_ptr, b_ptr, scaling_ptr, token_slot_ptr,
                     col1, stride_v, stride_vl, stride_bl, stride_bn, stride_sl, rank,
                     RANK_PAD: tl.constexpr, TWO_SLICES: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     slot_rank_ptr, HAS_SLOT_RANK: tl.constexpr, SLICE1_STEP: tl.constexpr,
                     num_slots, SLOTS_PAD: tl.constexpr, RANK_STEP: tl.constexpr):
    """(acc0, acc1) [BLOCK_M, BLOCK_N] plus each row's own slot's LoRA delta: slice 0 over columns
    offs_n of lora_b, and with TWO_SLICES columns col1 + offs_n too, of the slice SLICE1_STEP after
    slice 0 (1: gate and up; 0: the two halves of one slice's heads, for the rotary kernel):
    acc_s += scaling[l, s] * v[row, slice s of slot l] @ lora_b[l, cols]^T, l = token_slot[row].
    For a slice other than the first, the caller passes v_ptr and scaling_ptr offset to it.

    The tile's rows may use any slots (-1: none). One small tl.dot per slot id between the tile's
    lowest and highest (and slice), over only that slot's rows (the others masked to zero): a decode
    batch sorted by adapter has one or a few slots per tile, and a slot's B tile is read once per
    tile, not once per row. Both slices' loads are issued in the same iteration. With HAS_SLOT_RANK,
    B's columns (and v's) past the slot's own rank `slot_rank[l]`, zero padding, are not read.
    With SLOTS_PAD > 0 the whole rank table (`num_slots` entries) is loaded with the tile's slots and
    each row's rank picked from registers (SLOT_RANKS_IN_REGISTERS_MAX); else each row's entry is read
    once the slot ids are in. A slot's rank is rounded up to RANK_STEP (`_rounded_rank`; zero padding
    is read past it) so that the masks of B and v keep 16-byte vectors.
    A slot id absent from the tile is skipped by a branch (a branchless loop that lets the compiler
    prefetch the next slot's tiles was measured slower on the H200 at 4-64 adapters)."""
    slots = tl.load(token_slot_ptr + offs_m, mask=mask_m, other=-1)
    if HAS_SLOT_RANK:
        if SLOTS_PAD > 0:
            offs_l = tl.arange(0, SLOTS_PAD)
            rank_table = tl.load(slot_rank_ptr + offs_l, mask=offs_l < num_slots, other=0)
            row_rank = tl.sum(tl.where(slots[:, None] == offs_l[None, :], rank_table[None, :], 0), axis=1)
        else:
            row_rank = tl.load(slot_rank_ptr + slots, mask=slots >= 0, other=0)
    lo = tl.min(tl.where(slots >= 0, slots, 1 << 30), axis=0)
    hi = tl.max(slots, axis=0)
    offs_r = tl.arange(0, RANK_PAD)
    for slot in range(lo, hi + 1):
        rows = slots == slot
        if HAS_SLOT_RANK:
            live_rank = tl.max(tl.where(rows, row_rank, 0), axis=0)   # 0: absent, or no weights here
        else:
            live_rank = tl.max(rows.to(tl.int32), axis=0)
        if live_rank > 0:
            if HAS_SLOT_RANK:
                mask_r = offs_r < _rounded_rank(live_rank, RANK_STEP)
            else:
                mask_r = offs_r < rank
            mask_b = mask_r[:, None] & mask_n[None, :]
            mask_v = rows[:, None] & mask_r[None, :]
            v_ptrs = v_ptr + offs_m[:, None].to(tl.int64) * stride_v + slot * stride_vl + offs_r[None, :]
            b_ptrs = b_ptr + slot * stride_bl + offs_n[None, :] * stride_bn + offs_r[:, None]   # [RANK_PAD, BLOCK_N]
            v0 = tl.load(v_ptrs, mask=mask_v, other=0.0)
            b0 = tl.load(b_ptrs, mask=mask_b, other=0.0)
            if TWO_SLICES:
                if SLICE1_STEP == 0:
                    v1 = v0
                else:
                    v1 = tl.load(v_ptrs + SLICE1_STEP * rank, mask=mask_v, other=0.0)
                b1 = tl.load(b_ptrs + col1 * stride_bn, mask=mask_b, other=0.0)
            acc0 += tl.load(scaling_ptr + slot * stride_sl) * tl.dot(v0, b0, input_precision=DOT_PRECISION)
            if TWO_SLICES:
                acc1 += (tl.load(scaling_ptr + slot * stride_sl + SLICE1_STEP)
                         * tl.dot(v1, b1, input_precision=DOT_PRECISION))
    return acc0, acc1


@triton.jit
def _expand_gather_kernel(
    y_ptr, v_ptr, b_ptr, scaling_ptr, token_slot_ptr, slot_rank_ptr,
    rank, num_slots,
    T1, T2, T3, O1, O2, O3, O4,
    stride_ym, stride_vm, stride_vl, stride_bl, stride_bn, stride_sl,
    BLOCK_N: tl.constexpr, RANK_PAD: tl.constexpr, HAS_SLOT_RANK: tl.constexpr, SLOTS_PAD: tl.constexpr,
    RANK_STEP: tl.constexpr,
):
    # grid: (token, output tile of some slice). y's tile, the slot id and the rank table are loaded
    # first, together: only v and B wait for the slot id.
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    s, tile0, o_lo, o_hi = _slice_of_tile(pid_n, T1, T2, T3, O1, O2, O3, O4)
    offs_n = o_lo + (pid_n - tile0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < o_hi
    y_ptrs = y_ptr + t.to(tl.int64) * stride_ym + offs_n
    y = tl.load(y_ptrs, mask=mask_n, other=0.0).to(tl.float32)
    slot = tl.load(token_slot_ptr + t)
    if HAS_SLOT_RANK and SLOTS_PAD > 0:
        offs_l = tl.arange(0, SLOTS_PAD)
        rank_table = tl.load(slot_rank_ptr + offs_l, mask=offs_l < num_slots, other=0)
    if slot < 0:
        return
    offs_r = tl.arange(0, RANK_PAD)
    if HAS_SLOT_RANK:
        if SLOTS_PAD > 0:
            live_rank = tl.sum(tl.where(offs_l == slot, rank_table, 0), axis=0)
        else:
            live_rank = tl.load(slot_rank_ptr + slot)
        mask_r = offs_r < _rounded_rank(live_rank, RANK_STEP)
    else:
        mask_r = offs_r < rank
    v = tl.load(v_ptr + t.to(tl.int64) * stride_vm + slot * stride_vl + s * rank + offs_r, mask=mask_r, other=0.0)
    b_ptrs = b_ptr + slot.to(tl.int64) * stride_bl + offs_n[:, None] * stride_bn + offs_r[None, :]
    b = tl.load(b_ptrs, mask=mask_n[:, None] & mask_r[None, :], other=0.0)  # [BN, RP]
    acc = tl.sum(b.to(tl.float32) * v.to(tl.float32)[None, :], axis=1)
    scale = tl.load(scaling_ptr + slot * stride_sl + s)
    tl.store(y_ptrs, (y + scale * acc).to(y_ptr.dtype.element_ty), mask=mask_n)


def _slice_tiles(slice_offsets: tuple[int, ...], block_n: int) -> tuple[int, list[int], list[int]]:
    """Flat tiling of the output columns, slice by slice: (total tiles, [T1..T3], [O1..O4])."""
    num_slices = len(slice_offsets) - 1
    assert 1 <= num_slices <= MAX_SLICES, f"expand supports 1..{MAX_SLICES} slices, got {num_slices}"
    d_out = slice_offsets[-1]
    starts = [0]
    for s in range(num_slices):
        starts.append(starts[-1] + triton.cdiv(slice_offsets[s + 1] - slice_offsets[s], block_n))
    total = starts[-1]
    tile_starts = [starts[s] if s < num_slices else total for s in range(1, MAX_SLICES)]
    bounds = [slice_offsets[s] if s <= num_slices else d_out for s in range(1, MAX_SLICES + 1)]
    return total, tile_starts, bounds


def expand_(
    y: torch.Tensor,
    v: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: torch.Tensor,
    slice_offsets: tuple[int, ...],
    seg_cu: torch.Tensor,
    seg_slot: torch.Tensor,
    token_slot: torch.Tensor,
    max_seg_len: int,
    v_slot_stride: int = 0,
    slot_rank: torch.Tensor | None = None,
) -> torch.Tensor:
    """In place: y[t, o_s:o_{s+1}] += scaling[l, s] * lora_b[l, o_s:o_{s+1}] @ v[t, l*V + s*R : l*V + (s+1)*R]
    with l = slot(t) and V = ``v_slot_stride``; returns y.

    V = 0: v [N, S*R] holds each token's own slot (``shrink``'s output). V = S*R: v [N, L*S*R] holds
    every slot's shrink (a base GEMM over the weight with the A table stacked under it).
    ``slot_rank`` (optional, int32 [L]): each slot's rank; B's zero columns past it, rounded up to
    `rank_step`, are not read.
    """
    num_tokens = y.shape[0]
    num_slices = len(slice_offsets) - 1
    rank = lora_b.shape[2]
    assert y.stride(1) == 1 and v.stride(1) == 1 and lora_b.stride(2) == 1 and scaling.stride(1) == 1
    width = num_slices * rank if v_slot_stride == 0 else lora_b.shape[0] * v_slot_stride
    assert v_slot_stride in (0, num_slices * rank)
    assert y.shape[1] == slice_offsets[-1] == lora_b.shape[1] and v.shape == (num_tokens, width)
    assert scaling.dtype == torch.float32 and scaling.shape == (lora_b.shape[0], num_slices)
    assert v.dtype == lora_b.dtype
    assert slot_rank is None or slot_rank.dtype == torch.int32
    if num_tokens == 0:
        return y
    rank_flag = dict(HAS_SLOT_RANK=slot_rank is not None)   # the kernels read slot_rank only with it
    rank_pad = _rank_pad(rank)
    if max_seg_len <= GATHER_MAX_SEG_LEN:
        total_tiles, tiles, bounds = _slice_tiles(tuple(slice_offsets), EXPAND_GATHER_BLOCK_N)
        _expand_gather_kernel[(num_tokens, total_tiles)](
            y, v, lora_b, scaling, token_slot, _ptr_or(slot_rank, token_slot), rank, lora_b.shape[0], *tiles, *bounds,
            y.stride(0), v.stride(0), v_slot_stride, lora_b.stride(0), lora_b.stride(1), scaling.stride(0),
            BLOCK_N=EXPAND_GATHER_BLOCK_N, RANK_PAD=rank_pad, SLOTS_PAD=slot_ranks_pad(lora_b.shape[0], slot_rank is not None),
            RANK_STEP=rank_step(rank), **rank_flag,
            num_warps=EXPAND_GATHER_NUM_WARPS_MANY_TOKENS if num_tokens >= GATHER_MANY_TOKENS else EXPAND_GATHER_NUM_WARPS,
        )
    else:
        short = num_tokens <= SHORT_BATCH_TOKENS
        block_m, block_n = (EXPAND_SHORT_BLOCK_M, EXPAND_SHORT_BLOCK_N) if short else (EXPAND_BLOCK_M, EXPAND_BLOCK_N)
        total_tiles, tiles, bounds = _slice_tiles(tuple(slice_offsets), block_n)
        num_segments = seg_slot.numel()
        grid = (_segment_grid_rows(num_tokens, num_segments, block_m), total_tiles)
        _expand_segment_kernel[grid](
            y, v, lora_b, scaling, seg_cu, seg_slot, _ptr_or(slot_rank, seg_slot), rank, num_segments, *tiles, *bounds,
            y.stride(0), v.stride(0), v_slot_stride, lora_b.stride(0), lora_b.stride(1), scaling.stride(0),
            BLOCK_M=block_m, BLOCK_N=block_n, RANK_PAD=rank_pad,
            SEG_PAD=_seg_pad(num_segments), DOT_PRECISION=_dot_precision(v.dtype), RANK_STEP=rank_step(rank),
            num_warps=EXPAND_NUM_WARPS, num_stages=EXPAND_NUM_STAGES, **rank_flag,
        )
    return y
