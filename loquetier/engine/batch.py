"""Build one mixed token batch: training, evaluation, prefill and decode segments, flat, unpadded.

All integer metadata is assembled on the host with numpy and crosses to the device in one copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..kernels.smlm import LoraBatchMeta
from .context import AttentionMeta, BatchContext
from .sequence import Sequence

IGNORE_INDEX = -100


@dataclass
class LossSegment:
    """A training or evaluation example riding in this step. `targets[t]` is the token after t."""

    token_ids: list[int]
    targets: list[int]
    adapter: str
    train: bool
    owner: object = None   # whoever asked for it (a training job); gets the loss back
    generator: torch.Generator | None = None  # the owner's RNG for LoRA dropout

    @property
    def num_targets(self) -> int:
        """Tokens that carry loss (known on the host: no device read needed)."""
        return len(self.targets) - self.targets.count(IGNORE_INDEX)


@dataclass
class ScheduledSeq:
    """`length` of a sequence's pending tokens, from position `start`, computed this step."""

    seq: Sequence
    start: int
    length: int

    @property
    def completes(self) -> bool:
        """After this chunk every token is cached, so the next token is sampled."""
        return self.start + self.length == self.seq.num_tokens


@dataclass
class MixedBatch:
    input_ids: torch.Tensor            # int64 [N]
    ctx: BatchContext
    loss_segments: list[LossSegment]
    loss_targets: torch.Tensor | None  # int64 [num_loss_tokens]
    loss_seg_ids: torch.Tensor | None  # int64 [num_loss_tokens]: index into loss_segments
    sample_rows: torch.Tensor | None   # int64 [num_sampled]: rows whose next-token logits are sampled
    sample_seqs: list[Sequence] = field(default_factory=list)
    scheduled: list[ScheduledSeq] = field(default_factory=list)


def build_mixed_batch(loss_segments: list[LossSegment], scheduled: list[ScheduledSeq],
                      slot_of: dict[str | None, int], block_size: int, train_dropout: dict[int, float],
                      device: torch.device, dropout_generators: dict | None = None) -> MixedBatch:
    """Lay out train, eval, prefill, decode (in that order) and build the step's `BatchContext`.

    `slot_of` maps adapter name (None = base) to its device slot (-1 = none).
    """
    train = [s for s in loss_segments if s.train]
    evals = [s for s in loss_segments if not s.train]
    loss_segments = train + evals
    prefills = [s for s in scheduled if s.length > 1]
    decodes = [s for s in scheduled if s.length == 1]
    scheduled = prefills + decodes

    ids_parts = [np.asarray(s.token_ids, dtype=np.int64) for s in loss_segments]
    pos_parts = [np.arange(len(s.token_ids), dtype=np.int64) for s in loss_segments]
    for s in scheduled:
        ids_parts.append(np.asarray(s.seq.token_ids(s.start, s.start + s.length), dtype=np.int64))
        pos_parts.append(np.arange(s.start, s.start + s.length, dtype=np.int64))
    seg_lens = np.asarray([len(s.token_ids) for s in loss_segments] + [s.length for s in scheduled], dtype=np.int64)
    seg_slot = np.asarray([slot_of[s.adapter] for s in loss_segments] + [slot_of[s.seq.adapter] for s in scheduled],
                          dtype=np.int64)
    seg_cu = np.zeros(len(seg_lens) + 1, dtype=np.int64)
    np.cumsum(seg_lens, out=seg_cu[1:])
    num_tokens = int(seg_cu[-1])
    num_loss = int(seg_cu[len(loss_segments)])
    num_train = int(seg_cu[len(train)])
    num_prefill_tokens = sum(s.length for s in prefills)
    decode_start = num_loss + num_prefill_tokens

    # inference tokens: their sequence (index into `scheduled`) and cache slot
    inf_lens = seg_lens[len(loss_segments):]
    max_blocks = max((len(s.seq.block_table) for s in scheduled), default=1)
    tables = np.zeros((len(scheduled), max(max_blocks, 1)), dtype=np.int64)
    for i, s in enumerate(scheduled):
        tables[i, :len(s.seq.block_table)] = s.seq.block_table
    inf_pos = np.concatenate(pos_parts[len(loss_segments):]) if scheduled else np.zeros(0, np.int64)
    inf_seq = np.repeat(np.arange(len(scheduled)), inf_lens)
    slot_mapping = tables[inf_seq, inf_pos // block_size] * block_size + inf_pos % block_size
    context_lens = np.asarray([s.start + s.length for s in scheduled], dtype=np.int64)
    completes = np.asarray([s.completes for s in scheduled], dtype=bool)
    sample_rows = (num_loss + np.cumsum(inf_lens) - 1)[completes] if scheduled else np.zeros(0, np.int64)
    loss_targets = np.concatenate([np.asarray(s.targets, dtype=np.int64) for s in loss_segments]) \
        if loss_segments else np.zeros(0, np.int64)
    loss_seg_ids = np.repeat(np.arange(len(loss_segments)), seg_lens[:len(loss_segments)])

    # one host->device copy for every integer array of the step
    input_ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int64)
    positions = np.concatenate(pos_parts) if pos_parts else np.zeros(0, np.int64)
    token_slot = np.repeat(seg_slot, seg_lens)
    parts = [input_ids, positions, seg_cu, seg_slot, token_slot, slot_mapping, tables.reshape(-1),
             context_lens, sample_rows, loss_targets, loss_seg_ids]
    flat = torch.from_numpy(np.concatenate(parts))
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    else:
        flat = flat.to(device)
    t = list(torch.split(flat, [len(p) for p in parts]))
    (input_ids_t, positions_t, seg_cu_t, seg_slot_t, token_slot_t, slot_mapping_t, tables_t,
     context_lens_t, sample_rows_t, loss_targets_t, loss_seg_ids_t) = t
    tables_t = tables_t.view(len(scheduled), -1).to(torch.int32) if scheduled else None

    lora = None
    if (seg_slot >= 0).any():
        lora = LoraBatchMeta(seg_cu=seg_cu_t.to(torch.int32), seg_slot=seg_slot_t.to(torch.int32),
                             token_slot=token_slot_t.to(torch.int32), seg_cu_host=seg_cu.tolist(),
                             seg_slot_host=seg_slot.tolist(), max_seg_len=int(seg_lens.max()),
                             num_train_tokens=num_train, num_train_segments=len(train),
                             train_dropout=train_dropout if num_train else {},
                             dropout_generators=dropout_generators or {})
    n_pre = len(prefills)
    attn = AttentionMeta(
        num_loss_tokens=num_loss,
        loss_cu=seg_cu[:len(loss_segments) + 1].tolist(),
        slot_mapping=slot_mapping_t if scheduled else None,
        prefill_cu=seg_cu[len(loss_segments):len(loss_segments) + n_pre + 1].tolist() if n_pre else [],
        prefill_context_lens=context_lens[:n_pre].tolist(),
        prefill_block_tables=tables_t[:n_pre] if n_pre else None,
        decode_start=decode_start,
        decode_block_tables=tables_t[n_pre:] if decodes else None,
        decode_context_lens=context_lens_t[n_pre:].to(torch.int32) if decodes else None,
        loss_cu_t=seg_cu_t[:len(loss_segments) + 1].to(torch.int32) if loss_segments else None,
        max_loss_len=int(seg_lens[:len(loss_segments)].max()) if loss_segments else 0,
    )
    ctx = BatchContext(positions=positions_t, lora=lora, attn=attn, num_tokens=num_tokens)
    return MixedBatch(
        input_ids=input_ids_t, ctx=ctx, loss_segments=loss_segments,
        loss_targets=loss_targets_t if loss_segments else None,
        loss_seg_ids=loss_seg_ids_t if loss_segments else None,
        sample_rows=sample_rows_t if len(sample_rows) else None,
        sample_seqs=[s.seq for s in scheduled if s.completes], scheduled=scheduled)
