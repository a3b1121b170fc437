"""Paged KV cache: one preallocated pool of fixed-size blocks, handed out by a `BlockPool`."""

from __future__ import annotations

import numpy as np
import torch

from ..config import CacheConfig
from ..models.config import ModelArgs
from .block_pool import BlockPool


def num_kv_blocks(args: ModelArgs, config: CacheConfig, dtype: torch.dtype, device: torch.device) -> int:
    """The pool's size in blocks: `config.num_blocks`, or as many as the memory budget holds."""
    if config.num_blocks is not None:
        return config.num_blocks
    bytes_per_block = 2 * args.num_layers * config.block_size * args.kv_size * torch.tensor([], dtype=dtype).element_size()
    budget = config.memory_budget_bytes
    if budget is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = int(free * 0.9)
        else:
            budget = 256 << 20
    return max(1, budget // bytes_per_block)


class KVCache:
    """K/V tensors for every layer, [num_blocks, block_size, kv_heads, head_dim] each, from one pool."""

    def __init__(self, args: ModelArgs, config: CacheConfig, dtype: torch.dtype, device: torch.device):
        self.block_size = config.block_size
        num_blocks = self.num_blocks = num_kv_blocks(args, config, dtype, device)
        # one extra block that no sequence owns: padded rows of captured decode graphs write there
        self.scratch_block = num_blocks
        # one allocation for the whole pool; per-layer views into it
        self.pool = torch.zeros(args.num_layers, 2, num_blocks + 1, config.block_size, args.num_kv_heads,
                                args.head_dim, dtype=dtype, device=device)
        self.layers = [(self.pool[i, 0], self.pool[i, 1]) for i in range(args.num_layers)]
        self.allocator = BlockPool(num_blocks, config.enable_prefix_caching)

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    @property
    def usage(self) -> float:
        return 1.0 - self.allocator.num_free / self.num_blocks


def context_slots(block_tables: np.ndarray, context_lens: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat cache slots of positions [0, context_lens[i]) of every sequence i, one after the other,
    and their boundaries [n + 1]: one gather with them lays the sequences' K/V out contiguously."""
    cu = np.zeros(len(context_lens) + 1, dtype=np.int64)
    np.cumsum(context_lens, out=cu[1:])
    seq = np.repeat(np.arange(len(context_lens)), context_lens)
    pos = np.arange(cu[-1], dtype=np.int64) - cu[seq]
    return block_tables[seq, pos // block_size] * block_size + pos % block_size, cu
