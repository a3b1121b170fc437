"""`BatchContext`: the per-step metadata of one mixed token batch, read by the model's layers.

Token order in the flat batch: training segments, evaluation segments, prefill chunks, decode
tokens. Training and evaluation tokens attend within their segment and never touch the KV cache;
prefill and decode tokens are written to the paged cache and attend over it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.attention import PackedContext
from ..kernels.smlm import LoraBatchMeta


@dataclass
class AttentionMeta:
    """Attention layout of a step (host lists are for reference loops; tensors are on device)."""

    num_loss_tokens: int                 # train + eval tokens: the prefix [0, num_loss_tokens)
    loss_cu: list[int]                   # segment boundaries inside that prefix
    slot_mapping: torch.Tensor | None    # int64 [num_inference_tokens] flat cache slot of each token
    prefill_cu: list[int]                # absolute offsets of prefill chunks in the flat batch
    prefill_context_lens: list[int]      # cached length of each prefill sequence after this chunk
    prefill_block_tables: torch.Tensor | None  # int32 [P, max_blocks]
    decode_start: int                    # first decode token; decode tokens run to the end
    decode_block_tables: torch.Tensor | None   # int32 [D, max_blocks]
    decode_context_lens: torch.Tensor | None   # int32 [D]
    loss_cu_t: torch.Tensor | None = None      # int32 [L+1] on device: loss_cu for packed kernels
    max_loss_len: int = 0                      # longest train/eval segment
    # the first prefill chunks are whole prompts (nothing cached before them): causal attention within
    # each, one packed kernel call for all of them (prefill_cu_t: chunk boundaries from 0, on device)
    num_whole_prefills: int = 0
    prefill_cu_t: torch.Tensor | None = None   # int32 [P+1]
    max_prefill_len: int = 0
    # the prefill chunks after those continue a cached context (a later chunk, or a prompt whose prefix
    # was cached): their contexts' cache slots, for one gather and one packed kernel call on CUDA
    continuing: PackedContext | None = None


@dataclass
class BatchContext:
    """Everything the model forward needs besides `input_ids`."""

    positions: torch.Tensor              # int64 [N]
    lora: LoraBatchMeta | None
    attn: AttentionMeta
    num_tokens: int
