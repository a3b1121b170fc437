"""Triton paged decode attention with grouped-query heads, next to its plain-PyTorch reference.

One query token per sequence attends to the first ``context_lens[b]`` positions of its paged KV
cache; position p lives in block ``block_tables[b, p // block_size]`` at offset ``p % block_size``.
One program per (sequence, kv head, split) handles the whole query-head group of that kv head, so
each K/V tile is loaded once for the group. With few programs (small batch) the context is split
across programs (flash-decoding) and a second small kernel merges the partial softmaxes.

Layouts:
    q            [B, H, D]                          unit last stride
    k_cache      [num_blocks, block_size, KVH, D]   unit last stride (v_cache the same)
    block_tables [B, max_blocks] int32
    context_lens [B] int32
    out          [B, H, D] in q.dtype (zeros where context_lens[b] == 0)
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# Tuned on the H200, bf16, 32 query / 8 kv heads, head_dim 128, block_size 16, context 512
# (benchmarks/tune_decode_attention.py; benchmarks/results/2026-12-04_h200_tune_decode_attention.log):
# with the context whole, 64 positions a tile are the fastest setting at batch 64 and 256 (48 / 144 us).
# Split contexts (small batch) keep the H100 settings: the fastest setting at batch 1 and 8 was 1-4 us
# faster than these (timed alone, a launch each), differed between runs, and inside a decode graph the
# kernel and its merge take 4.6 + 1.7 us at batch 1.
BLOCK_N = 64         # cached positions per inner iteration (gathered across pages, any block_size)
BLOCK_N_SPLIT = 64   # the same when the context is split across programs
NUM_WARPS = 4
NUM_STAGES = 2
MAX_SPLITS = 16


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, part_out_ptr, part_lse_ptr,
    scale, block_size, window,
    stride_qb, stride_qh,
    stride_kb, stride_kp, stride_kh,
    stride_vb, stride_vp, stride_vh,
    stride_bt, stride_ob, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # grid: (sequence, kv head, split of the context)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1) * GROUP
    ctx = tl.load(context_lens_ptr + b)
    # sliding window (window > 0): only the last `window` positions are visible
    first = tl.where(window > 0, tl.maximum(ctx - window, 0), 0)
    chunk = tl.cdiv(tl.cdiv(ctx - first, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = first + split * chunk
    end = tl.minimum(start + chunk, ctx)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g
    q_ptrs = q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_g[:, None] & mask_d[None, :], other=0.0)  # [G, D]

    m_i = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((GROUP_PAD,), dtype=tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM_PAD), dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for pos0 in range(start, end, BLOCK_N):
        pos = pos0 + offs_n
        mask_p = pos < end
        page = tl.load(block_tables_ptr + b.to(tl.int64) * stride_bt + pos // block_size, mask=mask_p, other=0)
        page = page.to(tl.int64)
        off = pos % block_size
        mask_kv = mask_p[:, None] & mask_d[None, :]
        k_ptrs = k_ptr + page[:, None] * stride_kb + off[:, None] * stride_kp + kvh * stride_kh + offs_d[None, :]
        k = tl.load(k_ptrs, mask=mask_kv, other=0.0)  # [N, D]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # [G, N]
        s = tl.where(mask_p[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every iteration has a valid position
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_ptrs = v_ptr + page[:, None] * stride_vb + off[:, None] * stride_vp + kvh * stride_vh + offs_d[None, :]
        v = tl.load(v_ptrs, mask=mask_kv, other=0.0)  # [N, D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # empty context -> zeros
    mask_o = mask_g[:, None] & mask_d[None, :]
    if NUM_SPLITS == 1:
        o_ptrs = out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_o)
    else:
        # partials: out [B, H, NUM_SPLITS, HEAD_DIM_PAD] fp32, lse [B, H, NUM_SPLITS] fp32
        row = (b.to(tl.int64) * num_heads + heads) * NUM_SPLITS + split  # [G]
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM_PAD + offs_d[None, :], out, mask=mask_o)
        lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=mask_g)


@triton.jit
def _merge_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr,
    stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    # grid: (sequence, query head)
    b = tl.program_id(0)
    h = tl.program_id(1)
    row0 = (b.to(tl.int64) * tl.num_programs(1) + h) * NUM_SPLITS
    offs_s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    lse = tl.load(part_lse_ptr + row0 + offs_s)  # [S]
    m = tl.max(lse, axis=0)
    m = tl.where(m > float("-inf"), m, 0.0)  # all splits empty: every weight is 0 below
    w = tl.where(lse > float("-inf"), tl.exp(lse - m), 0.0)
    parts = tl.load(part_out_ptr + (row0 + offs_s)[:, None] * HEAD_DIM_PAD + offs_d[None, :])  # [S, D]
    denom = tl.sum(w, axis=0)
    out = tl.sum(parts * w[:, None], axis=0) / tl.where(denom > 0, denom, 1.0)
    o_ptrs = out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_num_splits(batch: int, num_kv_heads: int, device: torch.device) -> int:
    """Split the context only when (batch x kv heads) programs cannot fill the GPU; fixed per batch size."""
    if device.type != "cuda":
        return 1
    sms = _num_sms(device)
    programs = batch * num_kv_heads
    if programs >= sms:
        return 1
    return min(MAX_SPLITS, triton.next_power_of_2(triton.cdiv(sms, programs)))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    sliding_window: int | None = None,
    block_n: int | None = None,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
) -> torch.Tensor:
    """Decode attention over a paged KV cache with GQA: [B, H, D] -> [B, H, D] in q.dtype.

    ``num_splits`` (power of two) splits each context across programs; None picks it from the
    batch size. ``out`` (optional, [B, H, D], unit last stride) is written instead of a new tensor.
    ``block_n``, ``num_warps``, ``num_stages``: tile and launch settings (benchmarks/tune_decode_attention.py).
    """
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert num_heads % num_kv_heads == 0 and k_cache.shape == v_cache.shape and k_cache.shape[3] == head_dim
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1 and block_tables.stride(1) == 1
    assert block_tables.dtype == torch.int32 and context_lens.dtype == torch.int32
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.stride(2) == 1
    if batch == 0:
        return out
    if num_splits is None:
        num_splits = default_num_splits(batch, num_kv_heads, q.device)
    assert num_splits >= 1 and num_splits & (num_splits - 1) == 0, "num_splits must be a power of two"
    group = num_heads // num_kv_heads
    head_dim_pad = triton.next_power_of_2(head_dim)
    if block_n is None:
        block_n = BLOCK_N if num_splits == 1 else BLOCK_N_SPLIT
    if num_splits > 1:
        part_out = torch.empty(batch, num_heads, num_splits, head_dim_pad, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused
    _paged_decode_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_out, part_lse,
        scale, block_size, sliding_window or 0,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
        BLOCK_N=block_n, NUM_SPLITS=num_splits,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # 16-bit inputs ignore it
        num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        _merge_splits_kernel[(batch, num_heads)](
            part_out, part_lse, out, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, NUM_SPLITS=num_splits,
        )
    return out


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Plain PyTorch reference for ``paged_decode_attention`` (fp32 math, loops over sequences)."""
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.zeros(batch, num_heads, head_dim, dtype=torch.float32, device=q.device)
    for b in range(batch):
        n = int(context_lens[b])
        if n == 0:
            continue
        pos = torch.arange(n, device=q.device)
        pages = block_tables[b, pos // block_size].long()
        k = k_cache[pages, pos % block_size].float().repeat_interleave(group, dim=1)  # [n, H, D]
        v = v_cache[pages, pos % block_size].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        out[b] = torch.einsum("hn,nhd->hd", scores.softmax(dim=-1), v)
    return out.to(q.dtype)
