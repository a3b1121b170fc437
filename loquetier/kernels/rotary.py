"""Rotary embedding op: the plain-PyTorch reference, the Triton path and its autograd node."""

from __future__ import annotations

import torch

from .backend import use_triton


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, H, D], k [N, KVH, D], cos/sin [max_positions, D] -> rotated (q, k), HF convention."""
    cos = cos[positions].unsqueeze(1)
    sin = sin[positions].unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class _RotaryFunction(torch.autograd.Function):
    """Triton forward and backward; positions and the cos/sin tables get no gradient."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, positions):
        from .rotary_triton import rotary_forward
        ctx.save_for_backward(cos, sin, positions)
        return rotary_forward(q, k, cos, sin, positions)

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        from .rotary_triton import rotary_backward
        cos, sin, positions = ctx.saved_tensors
        dq, dk = rotary_backward(dq_out, dk_out, cos, sin, positions)
        return dq, dk, None, None, None


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 positions: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated (q, k). backend "auto": Triton on CUDA, the reference on the CPU; "triton" forces the
    kernel (TRITON_INTERPRET=1 on the CPU), "torch" forces the reference."""
    # the kernel rounds in the tables' dtype; mixed dtypes would promote in the reference
    if not (use_triton(q, backend) and q.dtype == k.dtype == cos.dtype):
        return apply_rotary_ref(q, k, cos, sin, positions)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return _RotaryFunction.apply(q, k, cos, sin, positions)
    # inference (and CUDA graph capture): no autograd node to build
    from .rotary_triton import rotary_forward
    return rotary_forward(q, k, cos, sin, positions)


def apply_rotary_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           slot_mapping: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated (q, k), with the rotated keys and `v` written to their KV-cache slots (inference
    only: no autograd). The Triton path does it in one launch; the reference is `apply_rotary`
    then `write_kv`."""
    from .attention import write_kv
    if not (use_triton(q, backend) and q.dtype == k.dtype == v.dtype == cos.dtype == k_cache.dtype):
        q, k = apply_rotary_ref(q, k, cos, sin, positions)
        write_kv(k_cache, v_cache, k, v, slot_mapping)
        return q, k
    from .rotary_triton import rotary_forward_and_cache
    return rotary_forward_and_cache(q, k, v, cos, sin, positions, k_cache, v_cache, slot_mapping)


# The Triton path adds a folded qkv layer's LoRA delta inside the rotary kernel when the batch's
# segments reach this length; shorter (one-token segments: batches under the decode graphs' segment
# threshold, the per-token graphs for many adapters) keep the per-token expand, then the rotary kernel.
QKV_DELTA_FUSE_MIN_SEG_LEN = 2


def apply_rotary_lora_and_cache(qkv: torch.Tensor, delta, num_q_heads: int, num_k_heads: int, cos: torch.Tensor,
                                sin: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
                                v_cache: torch.Tensor, slot_mapping: torch.Tensor, backend: str = "auto"
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v) [N, heads, D] of a folded qkv layer's output `qkv` [N, (H + 2 KVH) D] once its pending
    LoRA `delta` is added, q and k rotated, the rotated keys and the values written to their cache
    slots (inference only). The Triton path does all of it in one launch (see
    QKV_DELTA_FUSE_MIN_SEG_LEN); the reference runs the expand, then `apply_rotary_and_cache`."""
    if (use_triton(qkv, backend) and qkv.dtype == cos.dtype == k_cache.dtype
            and delta.meta.max_seg_len >= QKV_DELTA_FUSE_MIN_SEG_LEN):
        from .rotary_triton import rotary_lora_forward_and_cache
        return rotary_lora_forward_and_cache(qkv, delta, num_q_heads, num_k_heads, cos, sin, positions,
                                             k_cache, v_cache, slot_mapping)
    q, k, v = split_qkv_heads(delta.apply_(qkv), num_q_heads, num_k_heads)
    q, k = apply_rotary_and_cache(q, k, v, cos, sin, positions, k_cache, v_cache, slot_mapping, backend)
    return q, k, v


def split_qkv_heads(qkv: torch.Tensor, num_q_heads: int, num_k_heads: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [N, H, D], k and v [N, KVH, D] of a qkv projection's output [N, (H + 2 KVH) D] (views)."""
    head_dim = qkv.shape[1] // (num_q_heads + 2 * num_k_heads)
    q, k, v = qkv.split((num_q_heads * head_dim, num_k_heads * head_dim, num_k_heads * head_dim), dim=-1)
    return (q.reshape(-1, num_q_heads, head_dim), k.reshape(-1, num_k_heads, head_dim),
            v.reshape(-1, num_k_heads, head_dim))
