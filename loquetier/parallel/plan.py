"""Step plans as one int64 array: what rank 0 sends the workers each step (no pickling).

A message is `pack(parts)`: the number of parts, their lengths, then the parts. A `HostBatch`
travels as its flat array (every integer array of the step, loss weights and dropout keys
included) plus the layout the model reads on the host; the workers rebuild it with stand-ins for
the loss segments and scheduled sequences, whose only use there is their count and flags.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..engine.batch import HostBatch, LossSegment


def pack(parts: list[np.ndarray]) -> np.ndarray:
    parts = [np.asarray(p, dtype=np.int64).reshape(-1) for p in parts]
    return np.concatenate([np.asarray([len(parts)] + [len(p) for p in parts], dtype=np.int64), *parts])


def unpack(buf: np.ndarray) -> list[np.ndarray]:
    n = int(buf[0])
    lengths = buf[1:1 + n]
    ends = np.cumsum(lengths) + 1 + n
    return [buf[e - k:e] for k, e in zip(lengths.tolist(), ends.tolist())]


def floats(values) -> np.ndarray:
    """float64 values carried bit for bit in an int64 part."""
    return np.asarray(values, dtype=np.float64).view(np.int64)


def as_floats(part: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(part).view(np.float64)


@dataclass
class PlannedRow:
    """A worker's stand-in for a `ScheduledSeq`: whether its next token is sampled."""

    completes: bool
    seq: None = None


def host_batch_parts(host: HostBatch) -> list[np.ndarray]:
    """A `HostBatch` as int64 parts (its device dropout table stays: each rank has its own)."""
    scalars = [host.num_rows, host.num_train_segments, host.num_loss_segments, host.num_prefills, host.num_decodes,
               host.num_sampled, int(host.any_dropout), int(host.bucketed), int(host.has_placeholders)]
    return [np.asarray(scalars), np.asarray(host.sizes), host.flat, host.seg_cu, host.seg_slot, host.lora_seg_cu,
            host.lora_seg_slot, host.context_lens, np.asarray([s.train for s in host.loss_segments]),
            np.asarray([s.completes for s in host.scheduled]), np.asarray(host.train_slots)]


def host_batch_from_parts(parts: list[np.ndarray], slot_dropout: torch.Tensor) -> HostBatch:
    """Rebuild the `HostBatch` on a worker (`slot_dropout`: its adapter manager's table)."""
    (scalars, sizes, flat, seg_cu, seg_slot, lora_cu, lora_slot, context_lens, train, completes,
     train_slots) = parts
    num_rows, n_train, n_loss, n_pre, n_dec, n_sampled, any_dropout, bucketed, placeholders = scalars.tolist()
    return HostBatch(
        flat=flat, sizes=sizes.tolist(), loss_segments=[LossSegment([], [], None, bool(t)) for t in train.tolist()],
        scheduled=[PlannedRow(bool(c)) for c in completes.tolist()], num_rows=num_rows,
        seg_cu=seg_cu, seg_slot=seg_slot, lora_seg_cu=lora_cu, lora_seg_slot=lora_slot,
        num_train_segments=n_train, num_loss_segments=n_loss, num_prefills=n_pre, num_decodes=n_dec,
        context_lens=context_lens, num_sampled=n_sampled, train_slots=tuple(train_slots.tolist()),
        any_dropout=bool(any_dropout), slot_dropout=slot_dropout, bucketed=bool(bucketed),
        has_placeholders=bool(placeholders))


def decode_parts(arrays, with_lora: bool) -> list[np.ndarray]:
    """A decode-graph step: (ids, positions, slot mapping, token slots, context lengths, tables)."""
    *rows, tables = arrays
    return [np.asarray([int(with_lora), tables.shape[1]]), *rows, tables]


def decode_from_parts(parts: list[np.ndarray]):
    (with_lora, width), *rows, tables = parts
    return (*rows, tables.reshape(-1, int(width))), bool(with_lora)
