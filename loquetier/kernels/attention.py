"""Attention over the paged KV cache (inference) and over variable-length segments (training).

Cache layout, one tensor per layer and kind: [num_blocks, block_size, num_kv_heads, head_dim].
Token at position p of a sequence lives in block `block_table[p // block_size]`, offset `p % block_size`.
Query head h reads kv head h // (num_heads // num_kv_heads) (grouped-query attention).
"""

from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .backend import use_triton

# SDPA without cuDNN attention: cuDNN builds a graph for every new shape, 40-55 ms on its first call
# (H100, benchmarks/probe_sdpa_first_call.py), and every new prompt length is a new shape
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter new keys/values [T, kvh, d] into their cache slots (flat index block*block_size+off)."""
    kvh, d = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def _causal_mask(q_pos: torch.Tensor, k_len: int, sliding_window: int | None) -> torch.Tensor:
    k_pos = torch.arange(k_len, device=q_pos.device)
    mask = k_pos[None, :] <= q_pos[:, None]
    if sliding_window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - sliding_window
    return mask


def _sdpa(q, k, v, mask, scale):
    """q [T, H, D], k/v [S, KVH, D], mask [T, S] bool -> [T, H, D]."""
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    # 4-D inputs: the fused (flash / memory-efficient) kernels do not take 3-D ones
    with sdpa_kernel(SDPA_BACKENDS):
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                             v.transpose(0, 1)[None], attn_mask=mask, scale=scale)
    return out[0].transpose(0, 1)


_packed_flash_failed = False


@functools.lru_cache(maxsize=1)
def _packed_flash():
    """PyTorch's packed-sequence flash attention and the keywords this version takes, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _packed_flash_attention(q, k, v, cu_q, cu_k, max_q, max_k, scale, window_left: int = -1):
    """One varlen flash call; with fewer queries than keys in a sequence, its queries are the last
    positions: flash-attention aligns its causal mask to the bottom-right corner (PyTorch's
    `CausalBias` sends its lower-right variant to flash as is_causal=True for this reason)."""
    fn, params = _packed_flash()
    kwargs = {"scale": scale} if "scale" in params else {}
    if "is_causal" in params:
        if window_left >= 0:
            raise RuntimeError("this PyTorch's varlen_attn takes no sliding window")
        kwargs["is_causal"] = True
    else:
        kwargs["window_size"] = (window_left, 0)   # (left, right): nothing to the right = causal
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = q.shape[1] != k.shape[1]
    elif q.shape[1] != k.shape[1]:
        n_rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    if "scale" not in params and scale != q.shape[-1] ** -0.5:
        q = q * (scale * q.shape[-1] ** 0.5)
    return fn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)


def varlen_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: list[int],
                            scale: float, sliding_window: int | None = None,
                            cu_t: torch.Tensor | None = None, max_len: int = 0) -> torch.Tensor:
    """Causal attention inside each segment [cu[i], cu[i+1]) with no cache (training/eval). Differentiable.

    On CUDA in bf16/fp16 with `cu_t` (the boundaries on the device), one packed flash-attention
    call covers every segment, forward and backward; otherwise one SDPA call per segment."""
    global _packed_flash_failed
    if (cu_t is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and not _packed_flash_failed
            and _packed_flash() is not None and (sliding_window is None or max_len <= sliding_window)):
        try:
            return _packed_flash_attention(q, k, v, cu_t, cu_t, max_len, max_len, scale)
        except RuntimeError as e:   # an unsupported GPU or layout: the per-segment path below is exact
            warnings.warn(f"packed flash attention unavailable ({e}); using one SDPA call per segment")
            _packed_flash_failed = True
    outs = []
    for i in range(len(cu) - 1):
        a, b = cu[i], cu[i + 1]
        if b == a:
            continue
        if sliding_window is None or b - a <= sliding_window:
            qt, kt, vt = q[a:b].transpose(0, 1), k[a:b], v[a:b]
            n_rep = q.shape[1] // k.shape[1]
            if n_rep > 1:
                kt, vt = kt.repeat_interleave(n_rep, dim=1), vt.repeat_interleave(n_rep, dim=1)
            with sdpa_kernel(SDPA_BACKENDS):
                o = F.scaled_dot_product_attention(qt[None], kt.transpose(0, 1)[None], vt.transpose(0, 1)[None],
                                                   is_causal=True, scale=scale)
            outs.append(o[0].transpose(0, 1))
        else:
            pos = torch.arange(b - a, device=q.device)
            outs.append(_sdpa(q[a:b], k[a:b], v[a:b], _causal_mask(pos, b - a, sliding_window), scale))
    return torch.cat(outs, 0) if outs else q.new_zeros(q.shape)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """One sequence's first `length` cached positions as [length, kvh, d]."""
    bs = cache.shape[1]
    n_blocks = (length + bs - 1) // bs
    return cache[block_table[:n_blocks]].flatten(0, 1)[:length]


def paged_prefill_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                block_tables: torch.Tensor, cu: list[int], context_lens: list[int],
                                scale: float, sliding_window: int | None = None,
                                k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None) -> torch.Tensor:
    """Prefill chunks: sequence i's queries q[cu[i]:cu[i+1]] are its last positions before
    context_lens[i]; they attend causally to everything cached for that sequence (chunked prefill).
    `k_new`/`v_new` (rows aligned with q) let whole prompts skip the cache gather."""
    out = torch.empty_like(q)
    for i in range(len(cu) - 1):
        a, b = cu[i], cu[i + 1]
        ctx_len = context_lens[i]
        if ctx_len == b - a and k_new is not None:
            # a whole prompt in this chunk: its keys are the batch's own, no cache gather needed
            out[a:b] = varlen_causal_attention(q[a:b], k_new[a:b], v_new[a:b], [0, b - a], scale, sliding_window)
            continue
        k = gather_kv(k_cache, block_tables[i], ctx_len)
        v = gather_kv(v_cache, block_tables[i], ctx_len)
        q_pos = torch.arange(ctx_len - (b - a), ctx_len, device=q.device)
        out[a:b] = _sdpa(q[a:b], k, v, _causal_mask(q_pos, ctx_len, sliding_window), scale).to(q.dtype)
    return out


@dataclass
class PackedContext:
    """Prefill chunks that continue a cached context, laid out for one packed attention call."""

    kv_slots: torch.Tensor   # int64 [sum of context lens]: flat cache slots of each chunk's context, in turn
    cu_q: torch.Tensor       # int32 [n + 1]: chunk boundaries in the queries
    cu_k: torch.Tensor       # int32 [n + 1]: context boundaries in the gathered K/V
    max_q: int
    max_k: int


def packed_context_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: PackedContext,
                             scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """The chunks' queries over their whole cached contexts (their own keys included): one gather of
    every context into a contiguous buffer, one varlen flash call with separate q and k boundaries."""
    kvh, d = k_cache.shape[2], k_cache.shape[3]
    k = k_cache.view(-1, kvh, d).index_select(0, ctx.kv_slots)
    v = v_cache.view(-1, kvh, d).index_select(0, ctx.kv_slots)
    # the reference keeps keys p > q - window: flash's window (left, 0) keeps p >= q - left
    window = -1 if sliding_window is None or ctx.max_k <= sliding_window else sliding_window - 1
    return _packed_flash_attention(q, k, v, ctx.cu_q, ctx.cu_k, ctx.max_q, ctx.max_k, scale, window)


def paged_prefill_attention(q, k_cache, v_cache, block_tables, cu, context_lens, scale, sliding_window=None,
                            k_new=None, v_new=None, packed: PackedContext | None = None) -> torch.Tensor:
    """Dispatch: the packed flash path on CUDA in bf16/fp16 when `packed` is given, the reference elsewhere."""
    global _packed_flash_failed
    if (packed is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and not _packed_flash_failed
            and _packed_flash() is not None):
        try:
            return packed_context_attention(q, k_cache, v_cache, packed, scale, sliding_window)
        except RuntimeError as e:   # an unsupported GPU or layout: the reference below is exact
            warnings.warn(f"packed flash attention unavailable ({e}); using one SDPA call per sequence")
            _packed_flash_failed = True
    return paged_prefill_attention_ref(q, k_cache, v_cache, block_tables, cu, context_lens, scale,
                                       sliding_window, k_new, v_new)


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                               sliding_window: int | None = None) -> torch.Tensor:
    """One query per sequence [B, H, D] over its cached context; batched gather, masked by length."""
    B, H, D = q.shape
    bs, kvh = k_cache.shape[1], k_cache.shape[2]
    max_len = block_tables.shape[1] * bs
    k = k_cache[block_tables].reshape(B, max_len, kvh, D)
    v = v_cache[block_tables].reshape(B, max_len, kvh, D)
    n_rep = H // kvh
    if n_rep > 1:
        k, v = k.repeat_interleave(n_rep, dim=2), v.repeat_interleave(n_rep, dim=2)
    pos = torch.arange(max_len, device=q.device)
    valid = pos[None, :] < context_lens[:, None]
    if sliding_window is not None:
        valid &= pos[None, :] >= (context_lens[:, None] - sliding_window)
    scores = torch.einsum("bhd,bshd->bhs", q.float(), k.float()) * scale
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = scores.softmax(-1)
    return torch.einsum("bhs,bshd->bhd", probs, v.float()).to(q.dtype)


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                           sliding_window=None, backend: str = "auto"):
    """Dispatch: the Triton kernel on CUDA (or when forced), the reference elsewhere."""
    if use_triton(q, backend):
        from .attention_triton import paged_decode_attention as kernel
        return kernel(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window=sliding_window)
    return paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window)
