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
        # the cache's slots are rows of [num_kv_heads, head_dim], as write_kv's view assumes
        assert k_cache.shape[2:] == (num_k_heads, head_dim) and k_cache.stride() == v_cache.stride()
        assert k_cache.stride(3) == 1 and k_cache.stride(2) == head_dim and k_cache.stride(0) == k_cache.shape[1] * k_cache.stride(1)
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
