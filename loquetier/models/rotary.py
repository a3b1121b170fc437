"""Rotary position embedding (HF `rotate_half` convention), incl. Llama 3 and linear scaling."""

from __future__ import annotations

import math

import torch

from ..errors import ModelLoadError
from ..kernels.rotary import apply_rotary, apply_rotary_and_cache, apply_rotary_lora_and_cache


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ModelLoadError(f"rope_scaling type {kind!r} is not supported (default, linear, llama3 are)")


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables built once for every position up to `max_positions`."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos().to(dtype=dtype, device=device), persistent=False)
        self.register_buffer("sin", emb.sin().to(dtype=dtype, device=device), persistent=False)
        self.backend = "auto"  # "torch" or "triton" force a path (benchmarks, tests)

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
        """q [N, H, D], k [N, KVH, D] -> rotated, same shapes."""
        return apply_rotary(q, k, self.cos, self.sin, positions, self.backend)

    def lora_forward_and_cache(self, qkv, delta, num_q_heads, num_k_heads, positions, k_cache, v_cache, slot_mapping):
        """(q, k, v) of a folded qkv output plus its pending LoRA delta, q/k rotated, K/V cached."""
        return apply_rotary_lora_and_cache(qkv, delta, num_q_heads, num_k_heads, self.cos, self.sin, positions,
                                           k_cache, v_cache, slot_mapping, self.backend)

    def forward_and_cache(self, q, k, v, positions, k_cache, v_cache, slot_mapping):
        """`forward`, with the rotated keys and the values written to their KV-cache slots."""
        return apply_rotary_and_cache(q, k, v, self.cos, self.sin, positions, k_cache, v_cache, slot_mapping,
                                      self.backend)
