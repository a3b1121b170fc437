"""LoRA dropout with counter-based masks: the mask of an element is a hash of its token's key, the
layer's salt and its column, so no mask is drawn, stored or saved for the backward.

    keep[t, c] = u(t, c) >= p(t),  u = (mix32(mix32(key[t] ^ salt) ^ (c * C)) >> 8) / 2^24
    out[t, c]  = x[t, c] * keep[t, c] / (1 - p(t))    for rows t < n_rows; other rows copied

`key[t]` is fixed on the host per example and position (see `dropout_keys`), so a token's mask does
not depend on where packing put it, which other jobs shared the step, or whether the step was
replayed from a CUDA graph; a resumed job draws the same masks. `p(t)` is the dropout of the
token's adapter slot (`slot_p[token_slot[t]]`). The backward applies the same mask to the
gradient (the op is linear in x). Integer arithmetic is exact in both paths: the reference keeps
values in int64 below 2^63 (multipliers are below 2^31), the kernel in uint32.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .backend import use_triton

MASK32 = 0xFFFFFFFF
MIX_A, MIX_B = 0x7FEB352D, 0x5BD1E995   # odd multipliers below 2^31 (exact in int64)
COL_MUL = 0x27D4EB2F
POS_MUL = 0x165667B1


@dataclass
class SlotDropout:
    """Each adapter slot's dropout probability, on the host (to decide) and on the device (kernels)."""

    num_slots: int
    device: torch.device
    host: np.ndarray = field(init=False)
    table: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.host = np.zeros(self.num_slots, np.float32)
        self.table = torch.zeros(self.num_slots, dtype=torch.float32, device=self.device)

    def set(self, slot: int, p: float) -> None:
        self.host[slot] = p
        self.table[slot] = p


def mix32(h):
    """A 32-bit integer hash (xorshift-multiply rounds); works on ints, numpy int64 and torch int64."""
    h = h ^ (h >> 16)
    h = (h * MIX_A) & MASK32
    h = h ^ (h >> 15)
    h = (h * MIX_B) & MASK32
    return h ^ (h >> 16)


def dropout_keys(seeds: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Per-token keys for examples with 32-bit `seeds` and `lengths`: mix32(seed + position * C)."""
    pos = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return mix32((np.repeat(seeds.astype(np.int64), lengths) + pos * POS_MUL) & MASK32)


def layer_salt(layer_index: int) -> int:
    """A virtual layer's salt: distinct layers draw independent masks for the same token."""
    return int(mix32(layer_index * 0x9E37 + 1))


def lora_dropout_ref(x: torch.Tensor, n_rows: int, keys: torch.Tensor, token_slot: torch.Tensor,
                     slot_p: torch.Tensor, salt: int) -> torch.Tensor:
    """`x` with the first `n_rows` rows dropped out (see the module docstring); a new tensor."""
    out = x.clone()
    if n_rows == 0:
        return out
    p = slot_p[token_slot[:n_rows].long()].float()[:, None]                     # [n, 1]
    row = mix32(keys[:n_rows].long() ^ salt)[:, None]                           # [n, 1]
    cols = (torch.arange(x.shape[1], device=x.device, dtype=torch.int64) * COL_MUL) & MASK32
    u = (mix32(row ^ cols[None, :]) >> 8).float() * (1.0 / (1 << 24))          # [n, d]
    scale = torch.where(u >= p, 1.0 / (1.0 - p), torch.zeros_like(u))
    out[:n_rows] = (x[:n_rows].float() * scale).to(x.dtype)
    return out


def lora_dropout(x: torch.Tensor, n_rows: int, keys: torch.Tensor, token_slot: torch.Tensor,
                 slot_p: torch.Tensor, salt: int, backend: str = "auto") -> torch.Tensor:
    """Dispatch: one Triton launch on CUDA (or when forced), the reference elsewhere."""
    if use_triton(x, backend):
        from .lora_dropout_triton import lora_dropout as kernel
        return kernel(x, n_rows, keys, token_slot, slot_p, salt)
    return lora_dropout_ref(x, n_rows, keys, token_slot, slot_p, salt)
