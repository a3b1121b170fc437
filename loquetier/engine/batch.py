"""Build one mixed token batch: training, evaluation, prefill and decode segments, flat, unpadded.

All integer metadata is assembled on the host with numpy and crosses to the device in one copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..kernels import lora_dropout
from ..kernels.attention import PackedContext
from ..kernels.lora_dropout import SlotDropout
from ..kernels.smlm import LoraBatchMeta
from ..sampling_params import SamplingParams
from .context import AttentionMeta, BatchContext
from .kv_cache import context_slots
from .sequence import Sequence

IGNORE_INDEX = -100


@dataclass
class LossSegment:
    """A training or evaluation example riding in this step. `targets[t]` is the token after t."""

    token_ids: np.ndarray          # int64 [n] (lists are converted)
    targets: np.ndarray            # int64 [n], IGNORE_INDEX where no loss
    adapter: str | None
    train: bool
    owner: object = None           # whoever asked for it (a training job); gets the loss back
    weight: float = 0.0            # its weight in the step's loss sum (training; 1 / the window's tokens)
    dropout_seed: int = 0          # 32-bit: with each token's position, keys its LoRA dropout masks
    num_targets: int = -1          # tokens that carry loss (known on the host: no device read needed)

    def __post_init__(self):
        self.token_ids = np.asarray(self.token_ids, dtype=np.int64)
        self.targets = np.asarray(self.targets, dtype=np.int64)
        if self.num_targets < 0:
            self.num_targets = int((self.targets != IGNORE_INDEX).sum())


# a bucketed step has at least (its token bucket / this) segments: one segment count per token
# bucket for examples of this length and longer, so that the count does not multiply the graph keys
SEGMENT_BUCKET_TOKENS = 64
# and its longest-segment bound is at least this (or its tokens): the bound only sizes attention
# grids, whose surplus blocks exit at once, and each distinct bound is another graph to capture
MIN_LOSS_LEN_BUCKET = 512


def token_bucket(n: int) -> int:
    """Padded token count of a bucketed training step: powers of two up to 1,024, then steps of
    512 up to 8,192, then of 2,048 (at most a third padding; packed micro-batches sit just under
    their budget, so a budget on a bucket boundary pads little)."""
    if n <= 1024:
        return max(64, 1 << (n - 1).bit_length())
    step = 512 if n <= 8192 else 2048
    return -(-n // step) * step


def floor_token_bucket(n: int) -> int:
    """The largest `token_bucket` size that is at most `n` (0 under the smallest): a training
    allowance cut to it makes packed steps land on few buckets, so few graphs serve them."""
    if n < 64:
        return 0
    if n < 1024:
        return 1 << (n.bit_length() - 1)
    return n // 512 * 512 if n < 8192 else n // 2048 * 2048


def count_bucket(n: int, least: int) -> int:
    """The next power of two >= n (at least `least`): segment counts and longest-segment lengths."""
    return max(least, 1 << max(0, n - 1).bit_length())


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
    loss_seg_ids: torch.Tensor | None  # int64 [num_loss_tokens]: index into the loss segments
    loss_weights: torch.Tensor | None  # fp32 [num_loss_segments]: weight of each in the step's loss
    sample_rows: torch.Tensor | None   # int64 [num_sampled]: rows whose next-token logits are sampled
    sample_seqs: list[Sequence] = field(default_factory=list)
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    has_placeholders: bool = False     # input ids name tokens the previous step sampled (Sequence)
    num_loss_segments: int = 0         # loss segments incl. bucket padding (the loss sums' length)


@dataclass
class HostBatch:
    """A mixed batch laid out on the host: every integer array of the step in one flat int64 array
    (`flat`, cut by `sizes`) plus the host-side layout the model reads. `to_device` makes the
    `MixedBatch` from a device copy of `flat`; a training graph replays with another batch of the
    same `graph_key` by copying only `flat`.

    A bucketed batch (training-only steps, see `plan_mixed_batch`) is padded to bucket sizes: a
    padding segment (no adapter, no loss) and empty segments, so that batches of many layouts
    share one key, and a captured graph replays whatever the example lengths."""

    flat: np.ndarray
    sizes: list[int]
    loss_segments: list[LossSegment]
    scheduled: list[ScheduledSeq]   # the real sequences (not padding rows)
    num_rows: int                   # inference rows' sequences, padding included
    seg_cu: np.ndarray              # one segment per loss example (+ padding) and per scheduled sequence
    seg_slot: np.ndarray
    lora_seg_cu: np.ndarray         # SMLM's segments: the same, adjacent inference rows of one slot merged
    lora_seg_slot: np.ndarray
    num_train_segments: int         # incl. padding segments
    num_loss_segments: int          # incl. padding segments
    num_prefills: int
    num_decodes: int
    context_lens: np.ndarray
    num_sampled: int
    train_slots: tuple[int, ...]
    any_dropout: bool
    slot_dropout: torch.Tensor | None   # the adapter manager's per-slot dropout table (device)
    bucketed: bool = False
    has_placeholders: bool = False

    @property
    def graph_key(self) -> tuple:
        """Equal keys give identical kernels, grids and host lists. A bucketed batch's key holds only
        its bucket sizes; otherwise the exact layout (attention may loop over segments on the host)."""
        common = (self.train_slots, self.any_dropout, self.num_train_segments, self.num_loss_segments)
        if self.bucketed:
            return ("bucketed", int(self.seg_cu[-1]), self.max_loss_len, self.num_decodes, *common)
        return ("exact", tuple(self.seg_cu.tolist()), tuple(self.seg_slot.tolist()), *common)

    @property
    def max_loss_len(self) -> int:
        """The longest loss segment, as the attention kernels are told: its bucket when bucketed."""
        n = self.num_loss_segments
        longest = int(np.diff(self.seg_cu[:n + 1]).max()) if n else 0
        return min(int(self.seg_cu[n]), count_bucket(longest, MIN_LOSS_LEN_BUCKET)) if self.bucketed else longest

    def to_device(self, device: torch.device, flat: torch.Tensor | None = None) -> MixedBatch:
        """The step's `MixedBatch` over `flat` (the device copy of `self.flat`; copied here if None).
        The int32 copies of the metadata are made here, so a graph capturing this call refreshes them."""
        if flat is None:
            flat = torch.from_numpy(self.flat)
            flat = flat.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else flat.to(device)
        (input_ids_t, positions_t, lora_cu_t, lora_slot_t, token_slot_t, slot_mapping_t, tables_t,
         context_lens_t, sample_rows_t, loss_targets_t, loss_seg_ids_t, prefill_cu_t, dropout_keys_t,
         loss_weight_bits_t, cont_slots_t, cont_cu_q_t, cont_cu_k_t) = torch.split(flat, self.sizes)
        scheduled, n_loss_segs = self.scheduled, self.num_loss_segments
        seg_cu, seg_lens = self.seg_cu, np.diff(self.seg_cu)
        lora_cu = self.lora_seg_cu
        num_loss = int(seg_cu[n_loss_segs])
        num_train = int(seg_cu[self.num_train_segments])
        n_pre = self.num_prefills
        tables_t = tables_t.view(self.num_rows, -1).to(torch.int32) if self.num_rows else None
        max_loss_len = self.max_loss_len
        # bucketed: a value of the key (the longest segment only picks the kernels' segment path)
        max_seg_len = max_loss_len if self.bucketed else max(max_loss_len, int(np.diff(lora_cu).max()))
        lora = None
        if (self.seg_slot >= 0).any():
            lora = LoraBatchMeta(seg_cu=lora_cu_t.to(torch.int32), seg_slot=lora_slot_t.to(torch.int32),
                                 token_slot=token_slot_t.to(torch.int32), seg_cu_host=lora_cu.tolist(),
                                 seg_slot_host=self.lora_seg_slot.tolist(),
                                 max_seg_len=max_seg_len,
                                 num_train_tokens=num_train, num_train_segments=self.num_train_segments,
                                 train_slots=self.train_slots if num_train else (),
                                 any_dropout=self.any_dropout and num_train > 0,
                                 dropout_keys=dropout_keys_t, slot_dropout=self.slot_dropout)
        attn = AttentionMeta(
            num_loss_tokens=num_loss,
            loss_cu=seg_cu[:n_loss_segs + 1].tolist(),
            slot_mapping=slot_mapping_t if self.num_rows else None,
            prefill_cu=seg_cu[n_loss_segs:n_loss_segs + n_pre + 1].tolist() if n_pre else [],
            prefill_context_lens=self.context_lens[:n_pre].tolist(),
            prefill_block_tables=tables_t[:n_pre] if n_pre else None,
            decode_start=num_loss + int(seg_lens[n_loss_segs:n_loss_segs + n_pre].sum()),
            decode_block_tables=tables_t[n_pre:] if self.num_decodes else None,
            decode_context_lens=context_lens_t[n_pre:].to(torch.int32) if self.num_decodes else None,
            # loss segments are never merged: their boundaries are the prefix of the SMLM ones
            loss_cu_t=lora_cu_t[:n_loss_segs + 1].to(torch.int32) if n_loss_segs else None,
            max_loss_len=max_loss_len,
            # a chunk is a whole prompt when its context is the chunk itself (nothing cached before)
            num_whole_prefills=int((self.context_lens[:n_pre] == seg_lens[n_loss_segs:n_loss_segs + n_pre]).sum()),
            prefill_cu_t=prefill_cu_t.to(torch.int32) if n_pre else None,
            max_prefill_len=int(seg_lens[n_loss_segs:n_loss_segs + n_pre].max()) if n_pre else 0,
            continuing=self._continuing(cont_slots_t, cont_cu_q_t, cont_cu_k_t),
        )
        ctx = BatchContext(positions=positions_t, lora=lora, attn=attn, num_tokens=int(seg_cu[-1]))
        # the loss weights travel as float32 bit patterns in the int64 array (one copy per step)
        loss_weights = loss_weight_bits_t.to(torch.int32).view(torch.float32) if n_loss_segs else None
        return MixedBatch(
            input_ids=input_ids_t, ctx=ctx, loss_segments=self.loss_segments,
            loss_targets=loss_targets_t if n_loss_segs else None,
            loss_seg_ids=loss_seg_ids_t if n_loss_segs else None, loss_weights=loss_weights,
            sample_rows=sample_rows_t if self.num_sampled else None,
            sample_seqs=[s.seq for s in scheduled if s.completes], scheduled=scheduled,
            has_placeholders=self.has_placeholders, num_loss_segments=n_loss_segs)

    def _continuing(self, slots: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor) -> PackedContext | None:
        """The prefill chunks that continue a cached context (after the whole prompts), packed."""
        n_pre = self.num_prefills
        first = n_pre - (len(cu_q) - 1)
        if first == n_pre:
            return None
        seg_lens = np.diff(self.seg_cu)[self.num_loss_segments:]
        return PackedContext(slots, cu_q.to(torch.int32), cu_k.to(torch.int32),
                             int(seg_lens[first:n_pre].max()), int(self.context_lens[first:n_pre].max()))


def build_mixed_batch(loss_segments: list[LossSegment], scheduled: list[ScheduledSeq],
                      slot_of: dict[str | None, int], block_size: int, device: torch.device,
                      dropout: SlotDropout | None = None) -> MixedBatch:
    """Lay out train, eval, prefill, decode (in that order) and build the step's `BatchContext`.

    `slot_of` maps adapter name (None = base) to its device slot (-1 = none).
    """
    return plan_mixed_batch(loss_segments, scheduled, slot_of, block_size, dropout).to_device(device)


@dataclass
class DecodePadding:
    """How a bucketed step pads its decode rows, so that a captured graph serves any batch of up to
    a bucket of them: padding rows read and write only the scratch KV block, carry no adapter, and
    every row's block table has `table_width` entries. The SMLM segments are padded to `max_runs`
    runs of inference rows (one per adapter slot, one of base rows, one of padding rows)."""

    buckets: tuple[int, ...]
    table_width: int
    scratch_block: int
    max_runs: int
    _rows: list[ScheduledSeq] = field(default_factory=list, repr=False)

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def rows(self, n: int) -> list[ScheduledSeq]:
        """`n` padding rows: one-token sequences at position 0 in the scratch block (made once)."""
        while len(self._rows) < n:
            seq = Sequence([0], SamplingParams(max_tokens=1))
            seq.block_table = [self.scratch_block]
            self._rows.append(ScheduledSeq(seq, 0, 1))
        return self._rows[:n]


def _bucket_padding(lengths: np.ndarray) -> tuple[int, int]:
    """(padding tokens, empty segments) that bring training segments of `lengths` to bucket sizes:
    the padding tokens form one segment, the rest of the segment bucket is empty segments."""
    n = int(lengths.sum())
    total = token_bucket(n)
    pad = total - n
    num_segments = len(lengths) + (pad > 0)
    return pad, count_bucket(max(num_segments, total // SEGMENT_BUCKET_TOKENS), 8) - num_segments


def plan_mixed_batch(loss_segments: list[LossSegment], scheduled: list[ScheduledSeq],
                     slot_of: dict[str | None, int], block_size: int, dropout: SlotDropout | None = None,
                     bucketed: bool = False, decode_padding: DecodePadding | None = None,
                     training_slots: tuple[int, ...] = ()) -> HostBatch:
    """The host half of `build_mixed_batch`: every array of the step, nothing on the device yet.

    `bucketed` (training segments, and with `decode_padding` decode rows beside them) pads the batch
    to bucket sizes (see HostBatch). `dropout` is the adapter manager's per-slot LoRA dropout.
    `training_slots`: every slot that trains at all; a bucketed step runs the backward of each of
    them (a slot without tokens this step adds zero gradients), so that which jobs happen to share
    a step does not multiply the graph keys."""
    train = [s for s in loss_segments if s.train]
    evals = [s for s in loss_segments if not s.train]
    assert not bucketed or not evals, "evaluation steps are not bucketed"
    assert not bucketed or not scheduled or (decode_padding is not None and all(s.length == 1 for s in scheduled)), \
        "a bucketed step's inference rows are decode rows with padding"
    train_lens = np.fromiter((len(s.token_ids) for s in train), dtype=np.int64, count=len(train))
    train_slots = {slot_of[s.adapter] for s in train}
    train_slots = tuple(sorted(train_slots | set(training_slots) if bucketed and train else train_slots))
    any_dropout = bool(train) and dropout is not None and bool((dropout.host[list(train_slots)] > 0).any())
    pad, n_empty = _bucket_padding(train_lens) if bucketed and train else (0, 0)
    if pad:
        train_lens = np.append(train_lens, pad)
    train_lens = np.concatenate([train_lens, np.zeros(n_empty, np.int64)])
    n_train_segs = len(train_lens)
    loss_segments = train + evals
    # whole prompts (nothing cached yet) before chunks that continue a cached prompt: the whole ones
    # then form a prefix that one packed attention call covers
    prefills = sorted((s for s in scheduled if s.length > 1), key=lambda s: s.start > 0)
    # decode rows sorted by adapter slot: each adapter's rows form one SMLM segment (shared weight tiles,
    # few segments whatever the batch size)
    decodes = sorted((s for s in scheduled if s.length == 1), key=lambda s: slot_of[s.seq.adapter])
    scheduled = prefills + decodes
    real = scheduled
    if bucketed and decodes:   # padding rows last: the real rows' logits are the first ones
        scheduled = scheduled + decode_padding.rows(decode_padding.bucket(len(decodes)) - len(decodes))

    pad_ids = [np.zeros(pad, np.int64)] if pad else []
    ids_parts = [s.token_ids for s in train] + pad_ids + [s.token_ids for s in evals]
    # padding tokens sit at position 0: they attend only within their own segment
    pos_parts = [np.arange(len(s.token_ids), dtype=np.int64) for s in train] + pad_ids + \
                [np.arange(len(s.token_ids), dtype=np.int64) for s in evals]
    for s in scheduled:
        ids_parts.append(np.asarray(s.seq.token_ids(s.start, s.start + s.length), dtype=np.int64))
        pos_parts.append(np.arange(s.start, s.start + s.length, dtype=np.int64))
    eval_lens = [len(s.token_ids) for s in evals]
    seg_lens = np.concatenate([train_lens, np.asarray(eval_lens + [s.length for s in scheduled], dtype=np.int64)])
    fill = [-1] * (n_train_segs - len(train))
    seg_slot = np.asarray([slot_of[s.adapter] for s in train] + fill + [slot_of[s.adapter] for s in evals]
                          + [slot_of[s.seq.adapter] for s in scheduled], dtype=np.int64)
    seg_cu = np.zeros(len(seg_lens) + 1, dtype=np.int64)
    np.cumsum(seg_lens, out=seg_cu[1:])
    n_loss_segs = n_train_segs + len(evals)
    num_loss = int(seg_cu[n_loss_segs])
    num_train = int(seg_cu[n_train_segs])

    # inference tokens: their sequence (index into `scheduled`) and cache slot
    inf_lens = seg_lens[n_loss_segs:]
    max_blocks = max((len(s.seq.block_table) for s in scheduled), default=1)
    if bucketed and decodes:
        max_blocks = decode_padding.table_width
    tables = np.zeros((len(scheduled), max(max_blocks, 1)), dtype=np.int64)
    for i, s in enumerate(scheduled):
        tables[i, :len(s.seq.block_table)] = s.seq.block_table
    inf_pos = np.concatenate(pos_parts[-len(scheduled):]) if scheduled else np.zeros(0, np.int64)
    inf_seq = np.repeat(np.arange(len(scheduled)), inf_lens)
    slot_mapping = tables[inf_seq, inf_pos // block_size] * block_size + inf_pos % block_size
    context_lens = np.asarray([s.start + s.length for s in scheduled], dtype=np.int64)
    completes = np.asarray([s.completes for s in scheduled], dtype=bool)
    sample_rows = (num_loss + np.cumsum(inf_lens) - 1)[completes] if scheduled else np.zeros(0, np.int64)
    pad_targets = [np.full(pad, IGNORE_INDEX, np.int64)] if pad else []
    loss_targets = np.concatenate([s.targets for s in train] + pad_targets + [s.targets for s in evals]) \
        if n_loss_segs else np.zeros(0, np.int64)
    loss_seg_ids = np.repeat(np.arange(n_loss_segs), seg_lens[:n_loss_segs])
    weights = np.zeros(n_loss_segs, np.float32)
    weights[:len(train)] = [s.weight for s in train]
    seeds = np.asarray([s.dropout_seed for s in train] + [0] * (n_train_segs - len(train)), dtype=np.int64)
    dropout_keys = lora_dropout.dropout_keys(seeds, train_lens) if any_dropout else np.zeros(num_train, np.int64)

    # SMLM segments: loss examples as they are; runs of inference rows with one slot merged, since
    # the attention metadata, not SMLM, tells sequences apart
    inf_slot = seg_slot[n_loss_segs:]
    run_start = np.flatnonzero(np.diff(inf_slot, prepend=np.int64(-2))) if len(inf_slot) else np.zeros(0, np.int64)
    lora_seg_cu = np.concatenate([seg_cu[:n_loss_segs], seg_cu[n_loss_segs + run_start], seg_cu[-1:]])
    lora_seg_slot = np.concatenate([seg_slot[:n_loss_segs], inf_slot[run_start]])
    if bucketed and decodes:   # a fixed number of runs: empty ones at the end
        n_empty = decode_padding.max_runs - len(run_start)
        lora_seg_cu = np.concatenate([lora_seg_cu, np.full(n_empty, seg_cu[-1], np.int64)])
        lora_seg_slot = np.concatenate([lora_seg_slot, np.full(n_empty, -1, np.int64)])

    # one host->device copy for every integer array of the step
    input_ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int64)
    positions = np.concatenate(pos_parts) if pos_parts else np.zeros(0, np.int64)
    token_slot = np.repeat(seg_slot, seg_lens)
    n_pre = len(prefills)
    prefill_cu = seg_cu[n_loss_segs:n_loss_segs + n_pre + 1] - seg_cu[n_loss_segs] if n_pre else np.zeros(0, np.int64)
    # chunks continuing a cached context: every context's cache slots, for one gather (PackedContext)
    n_whole = sum(1 for s in prefills if s.start == 0)
    cont_slots, cont_cu_k = context_slots(tables[n_whole:n_pre], context_lens[n_whole:n_pre], block_size)
    cont_cu_q = seg_cu[n_loss_segs + n_whole:n_loss_segs + n_pre + 1] - seg_cu[n_loss_segs + n_whole]
    parts = [input_ids, positions, lora_seg_cu, lora_seg_slot, token_slot, slot_mapping, tables.reshape(-1),
             context_lens, sample_rows, loss_targets, loss_seg_ids, prefill_cu, dropout_keys,
             weights.view(np.int32).astype(np.int64), cont_slots, cont_cu_q, cont_cu_k]
    return HostBatch(flat=np.concatenate(parts), sizes=[len(p) for p in parts], loss_segments=loss_segments,
                     scheduled=real, num_rows=len(scheduled), seg_cu=seg_cu, seg_slot=seg_slot, lora_seg_cu=lora_seg_cu,
                     lora_seg_slot=lora_seg_slot, num_train_segments=n_train_segs, num_loss_segments=n_loss_segs,
                     num_prefills=len(prefills), num_decodes=len(scheduled) - len(prefills), context_lens=context_lens,
                     num_sampled=len(sample_rows), train_slots=train_slots if num_train else (),
                     any_dropout=any_dropout, slot_dropout=dropout.table if dropout is not None else None,
                     bucketed=bucketed,
                     # a bucketed step always resolves placeholders: what it runs may not depend on them
                     has_placeholders=bool(scheduled) and (bucketed or bool((input_ids[num_loss:] < 0).any())))
