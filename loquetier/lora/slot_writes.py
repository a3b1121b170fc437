"""Writing and clearing one adapter slot across every virtual layer in a few multi-tensor ops.

An all-linear adapter of a 32-layer model is 224 modules over 128 virtual layers. One write per
module and table (A, B, their zero padding, the scale, the slot's rank) would be over a thousand
small device ops for each adapter brought into a slot; here the copies of all of them are one
`torch._foreach_copy_`, the zeroing one `torch._foreach_zero_`, and the scales and ranks one copy
each. The manager calls these (policy); the layers only read their tables.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .layer import VirtualLoraLinear


def clear_slot(layers: list[VirtualLoraLinear], slot: int) -> None:
    """Zero `slot` in every layer of `layers` (its A, B, scales and rank) and forget its training state."""
    torch._foreach_zero_([t for vl in layers for t in (vl.lora_a[slot], vl.lora_b[slot], vl.scaling[slot],
                                                       vl.slot_rank[slot])])
    for vl in layers:
        vl.slice_ranks[slot] = [0] * len(vl.slice_names)
        vl.train_slots.pop(slot, None)


def write_slices(slot: int, writes: list[tuple[VirtualLoraLinear, str, torch.Tensor, torch.Tensor, float]]) -> None:
    """Each (layer, module, A [r, d_in], B [d_out, r], scale) into `slot` of its layer, zero-padded to the
    table's rank (split over ranks: the full tensors, of which this rank keeps its shard). Sources on the
    device (the manager moves an adapter in one copy) make none of this wait for the host."""
    if not writes:
        return
    dst, src, pad, scale_dst, scales, touched = [], [], [], [], [], {}
    for vl, name, a, b, scale in writes:
        if vl.tp is not None:
            a, b = vl.tp.lora_shard(name, a, b)
        s, r, rank = vl.slice_index(name), a.shape[0], vl.max_rank
        lo, hi = vl.slice_offsets[s], vl.slice_offsets[s + 1]
        dst += [vl.lora_a[slot, s * rank:s * rank + r], vl.lora_b[slot, lo:hi, :r]]
        src += [a, b]
        if r < rank:   # a lower rank than the table's: the rest of the slice reads as zeros
            pad += [vl.lora_a[slot, s * rank + r:(s + 1) * rank], vl.lora_b[slot, lo:hi, r:]]
        scale_dst.append(vl.scaling[slot, s])
        scales.append(scale)
        vl.slice_ranks[slot][s] = r
        touched[id(vl)] = vl
    device = dst[0].device
    torch._foreach_copy_(dst, src, non_blocking=True)
    if pad:
        torch._foreach_zero_(pad)
    torch._foreach_copy_(scale_dst, list(torch.tensor(scales, dtype=torch.float32).to(device).unbind()))
    layers = list(touched.values())
    ranks = torch.tensor([max(vl.slice_ranks[slot]) for vl in layers], dtype=torch.int32).to(device)
    torch._foreach_copy_([vl.slot_rank[slot] for vl in layers], list(ranks.unbind()))
