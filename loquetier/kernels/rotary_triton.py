"""Triton rotary embedding: q and k of one batch rotated in one launch, the backward in one more.

HF `rotate_half` convention with x = [x1, x2] (halves of head_dim D) and cos/sin rows [c1, c2], [s1, s2]:
    forward   out1 = x1*c1 - x2*s1        out2 = x2*c2 + x1*s2
    backward  d1   = g1*c1 + g2*s2        d2   = g2*c2 - g1*s1     (the transposed rotation)
Each product is rounded to the tensor dtype before the sum, as PyTorch's elementwise reference
does, so bf16 results match it up to the order of one add.

Layouts:
    q [N, H, D], k [N, KVH, D]   any token/head strides, unit last stride (views of the fused qkv)
    cos, sin [max_positions, D]  unit last stride
    positions [N] int32 or int64
    outputs: new contiguous [N, H, D] and [N, KVH, D] in q's dtype
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fused_triton import _delta_args
from .smlm_triton import _dot_precision, _tile_lora_delta

# One program rotates HEADS_PER_PROGRAM heads of one token; the grid is tokens x head blocks of q
# followed by head blocks of k. Not yet tuned on the GPU.
HEADS_PER_PROGRAM = 8
NUM_WARPS = 4


@triton.jit
def _rotate_heads(x_ptr, out_ptr, n, head0, num_heads, stride_xn, stride_xh,
                  c1, c2, s1, s2, offs_h, offs_d, mask_d, cache_ptr, slot, stride_cs,
                  HALF: tl.constexpr, BACKWARD: tl.constexpr, WRITE_CACHE: tl.constexpr):
    heads = head0 + offs_h
    mask = (heads < num_heads)[:, None] & mask_d[None, :]
    x_ptrs = x_ptr + n.to(tl.int64) * stride_xn + heads[:, None] * stride_xh + offs_d[None, :]
    x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    # round each product to the dtype (a no-op for fp32), add in fp32, round once more
    a1 = (x1 * c1).to(dtype).to(tl.float32)
    a2 = (x2 * c2).to(dtype).to(tl.float32)
    if BACKWARD:
        b1 = (x2 * s2).to(dtype).to(tl.float32)
        b2 = (x1 * s1).to(dtype).to(tl.float32)
        y1, y2 = a1 + b1, a2 - b2
    else:
        b1 = (x2 * s1).to(dtype).to(tl.float32)
        b2 = (x1 * s2).to(dtype).to(tl.float32)
        y1, y2 = a1 - b1, a2 + b2
    out_ptrs = out_ptr + (n.to(tl.int64) * num_heads + heads[:, None]) * (2 * HALF) + offs_d[None, :]
    tl.store(out_ptrs, y1.to(dtype), mask=mask)
    tl.store(out_ptrs + HALF, y2.to(dtype), mask=mask)
    if WRITE_CACHE:   # the rotated keys also go to their KV-cache slot
        c_ptrs = cache_ptr + slot * stride_cs + heads[:, None] * (2 * HALF) + offs_d[None, :]
        tl.store(c_ptrs, y1.to(dtype), mask=mask)
        tl.store(c_ptrs + HALF, y2.to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr, positions_ptr,
                   v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
                   num_q_heads, num_k_heads, stride_qn, stride_qh, stride_kn, stride_kh, stride_table,
                   stride_vn, stride_vh, stride_cs,
                   HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_H: tl.constexpr,
                   BACKWARD: tl.constexpr, WRITE_CACHE: tl.constexpr):
    # grid: (token, head block); blocks [0, cdiv(H, BLOCK_H)) are q's, then k's, then (WRITE_CACHE)
    # v's, which are only copied into the cache
    n = tl.program_id(0)
    block = tl.program_id(1)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HALF_PAD)
    mask_d = offs_d < HALF
    slot = 0
    if WRITE_CACHE:
        slot = tl.load(slot_mapping_ptr + n).to(tl.int64)
    num_q_blocks = tl.cdiv(num_q_heads, BLOCK_H)
    num_k_blocks = tl.cdiv(num_k_heads, BLOCK_H)
    if block < num_q_blocks + num_k_blocks:
        row = tl.load(positions_ptr + n).to(tl.int64) * stride_table
        c1 = tl.load(cos_ptr + row + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        c2 = tl.load(cos_ptr + row + HALF + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        s1 = tl.load(sin_ptr + row + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        s2 = tl.load(sin_ptr + row + HALF + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        if block < num_q_blocks:
            _rotate_heads(q_ptr, q_out_ptr, n, block * BLOCK_H, num_q_heads, stride_qn, stride_qh,
                          c1, c2, s1, s2, offs_h, offs_d, mask_d, k_cache_ptr, slot, stride_cs,
                          HALF, BACKWARD, False)
        else:
            _rotate_heads(k_ptr, k_out_ptr, n, (block - num_q_blocks) * BLOCK_H, num_k_heads, stride_kn,
                          stride_kh, c1, c2, s1, s2, offs_h, offs_d, mask_d, k_cache_ptr, slot, stride_cs,
                          HALF, BACKWARD, WRITE_CACHE)
    else:
        heads = (block - num_q_blocks - num_k_blocks) * BLOCK_H + offs_h
        mask = (heads < num_k_heads)[:, None] & mask_d[None, :]
        v_ptrs = v_ptr + n.to(tl.int64) * stride_vn + heads[:, None] * stride_vh + offs_d[None, :]
        c_ptrs = v_cache_ptr + slot * stride_cs + heads[:, None] * (2 * HALF) + offs_d[None, :]
        tl.store(c_ptrs, tl.load(v_ptrs, mask=mask), mask=mask)
        tl.store(c_ptrs + HALF, tl.load(v_ptrs + HALF, mask=mask), mask=mask)


# With a folded qkv layer's pending LoRA delta (inference): tiles of LORA_TILE_M consecutive tokens by
# one head, so a slot's B columns of that head are read once per tile (a sorted decode batch has one
# or two slots a tile), as the fused add + RMSNorm and SiLU-and-mul kernels do. On the H200 at batch 64
# with 4 adapters (Llama-3-8B heads) it took 5.4 us a layer where the expand and the rotary kernel
# took 4.5 + 2.2 us (`benchmarks/profile_decode.py`). `benchmarks/tune_many_adapters.py` (4 adapters of
# rank 16) swept 16 or 32 tokens by 1-8 warps: 16 x 4 is within 0.15 us of the fastest at batches 1,
# 64 and 128 and 0.4 us at 256 (32 x 8 there, 8.0 against 8.4 us), and no setting moved the batch-64
# replay beyond the noise (1.045-1.053x). Issuing the angle and cache-slot loads before the delta's
# slot loop (so that their latency would overlap it) measured slower: 10.4 against 8.4 us at batch 256,
# 5.3 against 4.9 at batch 1, equal at 64.
LORA_TILE_M = 16
LORA_NUM_WARPS = 4
# What the LoRA kernel loads before the delta, so that those loads' latency overlaps the delta's:
# 0 nothing (positions, cache slots and angles after it), 1 the positions and cache slots, 2 the
# angles too (kept in the tables' dtype until they are used). On the H200 (`tune_many_adapters.py`,
# batch 64, ranks 8-64) 1 took 8.4 against 9.0 us a call with 16 adapters and 26.3 against 32.7
# with 64; with 4 adapters of rank 16 it was within 0.1 us of 0 at batch 256 where 2 lost 1.5 us,
# and the batch 64-256 replays did not tell the three apart (`profile_decode.py`).
LORA_EARLY_LOADS = 1


@triton.jit
def _rotary_lora_cache_kernel(qkv_ptr, q_out_ptr, k_out_ptr, v_out_ptr, cos_ptr, sin_ptr, positions_ptr,
                              k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
                              lv_ptr, lb_ptr, scaling_ptr, token_slot_ptr, slot_rank_ptr,
                              n, num_q_heads, num_k_heads, stride_qkv, stride_table, stride_cs,
                              stride_lv, stride_lvl, stride_lbl, stride_lbn, stride_sl, rank, num_slots,
                              HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                              RANK_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_SLOT_RANK: tl.constexpr,
                              SLOTS_PAD: tl.constexpr, RANK_STEP: tl.constexpr, EARLY_LOADS: tl.constexpr):
    # grid: (token tile, head); heads [0, H) are q's, [H, H + KVH) k's, then v's. Head h's columns
    # in qkv are [h*D, (h+1)*D) for all three, since qkv = [q | k | v] by heads of D = 2*HALF.
    head = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n
    offs_d = tl.arange(0, HALF_PAD)
    mask_d = offs_d < HALF
    mask = mask_m[:, None] & mask_d[None, :]
    rows = offs_m[:, None].to(tl.int64)
    dt = q_out_ptr.dtype.element_ty
    is_k = head >= num_q_heads
    is_v = head >= num_q_heads + num_k_heads
    s = is_k.to(tl.int32) + is_v.to(tl.int32)   # the LoRA slice: q, k or v
    cols = head * (2 * HALF) + offs_d
    x_ptrs = qkv_ptr + rows * stride_qkv + cols[None, :]
    x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    if EARLY_LOADS >= 1:
        slot = tl.load(slot_mapping_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
        table = tl.load(positions_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)[:, None] * stride_table
    if EARLY_LOADS >= 2:   # v's heads need no angles: their loads are masked off
        amask = (offs_m < tl.where(is_v, 0, n))[:, None] & mask_d[None, :]
        c1_raw = tl.load(cos_ptr + table + offs_d[None, :], mask=amask, other=0.0)
        c2_raw = tl.load(cos_ptr + table + HALF + offs_d[None, :], mask=amask, other=0.0)
        s1_raw = tl.load(sin_ptr + table + offs_d[None, :], mask=amask, other=0.0)
        s2_raw = tl.load(sin_ptr + table + HALF + offs_d[None, :], mask=amask, other=0.0)
    x1, x2 = _tile_lora_delta(x1, x2, offs_m, mask_m, cols, mask_d, lv_ptr + s * rank, lb_ptr, scaling_ptr + s,
                              token_slot_ptr, HALF, stride_lv, stride_lvl, stride_lbl, stride_lbn, stride_sl, rank,
                              RANK_PAD, True, DOT_PRECISION, slot_rank_ptr, HAS_SLOT_RANK, 0, num_slots, SLOTS_PAD,
                              RANK_STEP)
    # rounded where the stand-alone expand stores its result
    x1 = x1.to(dt).to(tl.float32)
    x2 = x2.to(dt).to(tl.float32)
    if EARLY_LOADS == 0:
        slot = tl.load(slot_mapping_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    if is_v:   # v goes to the cache and to `v` (whole prompts' attention reads it; decode reads the cache)
        h = head - num_q_heads - num_k_heads
        out_ptrs = v_out_ptr + (rows * num_k_heads + h) * (2 * HALF) + offs_d[None, :]
        c_ptrs = v_cache_ptr + slot[:, None] * stride_cs + h * (2 * HALF) + offs_d[None, :]
        tl.store(out_ptrs, x1.to(dt), mask=mask)
        tl.store(out_ptrs + HALF, x2.to(dt), mask=mask)
        tl.store(c_ptrs, x1.to(dt), mask=mask)
        tl.store(c_ptrs + HALF, x2.to(dt), mask=mask)
    else:
        if EARLY_LOADS >= 2:
            c1, c2, s1, s2 = c1_raw.to(tl.float32), c2_raw.to(tl.float32), s1_raw.to(tl.float32), s2_raw.to(tl.float32)
        else:
            if EARLY_LOADS == 0:
                table = tl.load(positions_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)[:, None] * stride_table
            c1 = tl.load(cos_ptr + table + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
            c2 = tl.load(cos_ptr + table + HALF + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
            s1 = tl.load(sin_ptr + table + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
            s2 = tl.load(sin_ptr + table + HALF + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        # as _rotate_heads: each product rounded to the dtype, added in fp32, rounded once more
        y1 = ((x1 * c1).to(dt).to(tl.float32) - (x2 * s1).to(dt).to(tl.float32)).to(dt)
        y2 = ((x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)).to(dt)
        if is_k:
            h = head - num_q_heads
            out_ptrs = k_out_ptr + (rows * num_k_heads + h) * (2 * HALF) + offs_d[None, :]
            c_ptrs = k_cache_ptr + slot[:, None] * stride_cs + h * (2 * HALF) + offs_d[None, :]
            tl.store(c_ptrs, y1, mask=mask)
            tl.store(c_ptrs + HALF, y2, mask=mask)
        else:
            out_ptrs = q_out_ptr + (rows * num_q_heads + head) * (2 * HALF) + offs_d[None, :]
        tl.store(out_ptrs, y1, mask=mask)
        tl.store(out_ptrs + HALF, y2, mask=mask)


def _check_cache_layout(k_cache: torch.Tensor, v_cache: torch.Tensor, num_k_heads: int, head_dim: int) -> None:
    # the cache's slots are rows of [num_kv_heads, head_dim], as write_kv's view assumes
    assert k_cache.shape[2:] == (num_k_heads, head_dim) and k_cache.stride() == v_cache.stride()
    assert k_cache.stride(3) == 1 and k_cache.stride(2) == head_dim and k_cache.stride(0) == k_cache.shape[1] * k_cache.stride(1)


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    # the qkv views already have it; anything else (rare) pays for one copy
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch(q, k, cos, sin, positions, backward: bool, cache=None):
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    assert head_dim % 2 == 0 and k.shape == (num_tokens, num_k_heads, head_dim)
    assert cos.shape[1] == head_dim and positions.shape == (num_tokens,)
    q, k, cos, sin = (_unit_last_stride(t) for t in (q, k, cos, sin))
    assert sin.stride(0) == cos.stride(0)  # one row stride for both tables
    q_out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((num_tokens, num_k_heads, head_dim), dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    block_h = min(HEADS_PER_PROGRAM, triton.next_power_of_2(max(num_q_heads, num_k_heads)))
    num_blocks = triton.cdiv(num_q_heads, block_h) + triton.cdiv(num_k_heads, block_h)
    if cache is None:
        v = k_cache = v_cache = slot_mapping = k   # unused
        stride_vn = stride_vh = stride_cs = 0
    else:
        v, k_cache, v_cache, slot_mapping = cache
        v = _unit_last_stride(v)
        assert v.shape == k.shape and k_cache.dtype == v_cache.dtype == v.dtype == q.dtype
        assert slot_mapping.shape == (num_tokens,)
        _check_cache_layout(k_cache, v_cache, num_k_heads, head_dim)
        stride_vn, stride_vh, stride_cs = v.stride(0), v.stride(1), k_cache.stride(1)
        num_blocks += triton.cdiv(num_k_heads, block_h)
    _rotary_kernel[(num_tokens, num_blocks)](
        q, k, q_out, k_out, cos, sin, positions, v, k_cache, v_cache, slot_mapping,
        num_q_heads, num_k_heads, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
        stride_vn, stride_vh, stride_cs,
        HALF=head_dim // 2, HALF_PAD=triton.next_power_of_2(head_dim // 2), BLOCK_H=block_h,
        BACKWARD=backward, WRITE_CACHE=cache is not None, num_warps=NUM_WARPS,
    )
    return q_out, k_out


def rotary_forward(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated (q, k) as new contiguous tensors; cos/sin rows picked by `positions`."""
    return _launch(q, k, cos, sin, positions, backward=False)


def rotary_forward_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                             sin: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
                             v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`rotary_forward`, and the rotated keys and the values written to their cache slots in the
    same launch (inference: saves the two scatter kernels of `write_kv` per layer)."""
    return _launch(q, k, cos, sin, positions, backward=False, cache=(v, k_cache, v_cache, slot_mapping))


def rotary_backward(dq_out: torch.Tensor, dk_out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Grads of q and k: the output grads rotated back by the same angles."""
    return _launch(dq_out, dk_out, cos, sin, positions, backward=True)


def rotary_lora_forward_and_cache(qkv: torch.Tensor, delta, num_q_heads: int, num_k_heads: int, cos: torch.Tensor,
                                  sin: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
                                  v_cache: torch.Tensor, slot_mapping: torch.Tensor):
    """(q, k, v) [N, heads, D] of a folded qkv layer's output `qkv` [N, (H + 2 KVH) D] (a strided view
    is fine) plus its pending three-slice LoRA `delta`, q and k rotated, the rotated keys and the values
    written to their cache slots: the stand-alone expand, `rotary_forward_and_cache` and the values'
    copy in one launch. `qkv` is read, never written. Inference only."""
    num_tokens, width = qkv.shape
    head_dim = width // (num_q_heads + 2 * num_k_heads)
    assert qkv.stride(1) == 1 and head_dim % 2 == 0 and width == (num_q_heads + 2 * num_k_heads) * head_dim
    assert delta.slice_offsets == (0, num_q_heads * head_dim, (num_q_heads + num_k_heads) * head_dim, width)
    assert cos.shape[1] == head_dim and cos.stride(1) == sin.stride(1) == 1 and cos.stride(0) == sin.stride(0)
    assert positions.shape == slot_mapping.shape == (num_tokens,)
    _check_cache_layout(k_cache, v_cache, num_k_heads, head_dim)
    assert k_cache.dtype == v_cache.dtype == qkv.dtype == cos.dtype
    q = torch.empty(num_tokens, num_q_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(num_tokens, num_k_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    v = torch.empty(num_tokens, num_k_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if num_tokens == 0:
        return q, k, v
    (lv, lb, scaling, token_slot, slot_rank, s_lv, s_lvl, s_lbl, s_lbn, s_sl, rank, rank_pad, num_slots), flags = \
        _delta_args(delta, 3, qkv)
    half = head_dim // 2
    grid = (triton.cdiv(num_tokens, LORA_TILE_M), num_q_heads + 2 * num_k_heads)
    _rotary_lora_cache_kernel[grid](
        qkv, q, k, v, cos, sin, positions, k_cache, v_cache, slot_mapping,
        lv, lb, scaling, token_slot, slot_rank,
        num_tokens, num_q_heads, num_k_heads, qkv.stride(0), cos.stride(0), k_cache.stride(1),
        s_lv, s_lvl, s_lbl, s_lbn, s_sl, rank, num_slots,
        HALF=half, HALF_PAD=max(16, triton.next_power_of_2(half)), BLOCK_M=LORA_TILE_M, RANK_PAD=rank_pad,
        DOT_PRECISION=_dot_precision(qkv.dtype), EARLY_LOADS=LORA_EARLY_LOADS, num_warps=LORA_NUM_WARPS, **flags,
    )
    return q, k, v
