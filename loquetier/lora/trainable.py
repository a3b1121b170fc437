"""AdapterTrainState: one adapter's training state in its device slot, as a few flat buffers.

An adapter is hundreds of small A/B matrices (7 modules x 2 x layers). Giving each its own
parameter and gradient makes every step loop over them (autograd leaves, accumulation, clipping,
the optimizer). Here they are laid out once, virtual layer by virtual layer, in flat buffers:

    master       fp32 [P]           the weights AdamW steps (one tensor: one fused kernel)
    master_grad  fp32 [P]           its gradient (clipped as one tensor)
    grad         compute dtype [P]  written by the SMLM backward of every layer (addmm into views)
    stage        compute dtype [P]  the current weights in the compute dtype, read by that backward
                                    and copied into the slot table after each optimizer step

In an fp32 engine `master` is `stage` and `master_grad` is `grad`. Layout of one virtual layer
with S slices and rank r (r = the largest rank among its slices): A [S*r, d_in] (slice s in rows
s*r..), then B [d_out, r]. A module's PEFT-shaped A [r_m, d_in] and B [d_out_m, r_m] are views.
Slices the adapter does not target stay zero (zero gradient, zero weight decay).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.smlm import TrainSlot
from .layer import VirtualLoraLinear


@dataclass
class _LayerBlock:
    vl: VirtualLoraLinear   # or its full shapes (a tensor-parallel layout, parallel/train_state.py)
    rank: int
    a: slice      # element ranges of the flat buffers
    b: slice


def train_layout(layers, ranks: dict[tuple[int, str], int]) -> tuple[list[tuple[int, _LayerBlock]], int]:
    """The flat buffers' layout (see above) for `layers` (virtual layers, or anything with their
    shape attributes) and the buffers' length."""
    blocks: list[tuple[int, _LayerBlock]] = []
    seen: dict[int, _LayerBlock] = {}
    offset = 0
    for (layer, module), _ in sorted(ranks.items()):
        vl = layers[layer][module]
        if id(vl) in seen:
            continue
        r = max(r_m for (l_m, m), r_m in ranks.items() if l_m == layer and layers[l_m][m] is vl)
        num_slices, d_out, d_in = len(vl.slice_names), vl.base.out_features, vl.in_features
        a = slice(offset, offset + num_slices * r * d_in)
        b = slice(a.stop, a.stop + d_out * r)
        offset = b.stop
        seen[id(vl)] = _LayerBlock(vl, r, a, b)
        blocks.append((layer, seen[id(vl)]))
    return blocks, offset


class AdapterTrainState:
    """The trainable adapter in `slot`: registers a `TrainSlot` with every virtual layer it
    targets; `publish()` writes the stepped weights into the slot table; `release()` undoes it."""

    def __init__(self, slot: int, layers: list[dict[str, VirtualLoraLinear]], ranks: dict[tuple[int, str], int]):
        self.slot = slot
        self.ranks = ranks                                   # (layer, module) -> r
        blocks, offset = train_layout(layers, ranks)
        self.blocks = blocks
        ref = layers[0][next(iter(layers[0]))].lora_a
        dtype, device = ref.dtype, ref.device
        self.stage = torch.zeros(offset, dtype=dtype, device=device)
        self.grad = torch.zeros(offset, dtype=dtype, device=device)
        for _, blk in blocks:   # start from the slot's current weights
            self._a(self.stage, blk).copy_(self._table_a(blk))
            self._b(self.stage, blk).copy_(self._table_b(blk))
        if dtype == torch.float32:
            self.master, self.master_grad = self.stage, self.grad
        else:
            self.master, self.master_grad = self.stage.float(), torch.zeros(offset, dtype=torch.float32, device=device)
        self.master.grad = self.master_grad
        # publish() copies these pairs with one multi-tensor op
        self._table_views = [t for _, blk in blocks for t in (self._table_a(blk), self._table_b(blk))]
        self._stage_views = [t for _, blk in blocks for t in (self._a(self.stage, blk), self._b(self.stage, blk))]
        for _, blk in blocks:
            num_slices, d_out, d_in = len(blk.vl.slice_names), blk.vl.base.out_features, blk.vl.in_features
            blk.vl.train_slots[slot] = TrainSlot(
                blk.rank, self.stage[blk.a].view(num_slices * blk.rank, d_in), self.stage[blk.b].view(d_out, blk.rank),
                self.grad[blk.a].view(num_slices * blk.rank, d_in), self.grad[blk.b].view(d_out, blk.rank))

    # ------------------------------------------------------------------ views
    def _a(self, flat: torch.Tensor, blk: _LayerBlock) -> torch.Tensor:
        """[S, r, d_in] view of the A block in `flat`."""
        return flat[blk.a].view(len(blk.vl.slice_names), blk.rank, blk.vl.in_features)

    def _b(self, flat: torch.Tensor, blk: _LayerBlock) -> torch.Tensor:
        return flat[blk.b].view(blk.vl.base.out_features, blk.rank)

    def _table_a(self, blk: _LayerBlock) -> torch.Tensor:
        vl = blk.vl
        return vl.lora_a[self.slot].view(len(vl.slice_names), vl.max_rank, vl.in_features)[:, :blk.rank]

    def _table_b(self, blk: _LayerBlock) -> torch.Tensor:
        return blk.vl.lora_b[self.slot][:, :blk.rank]

    def module_views(self, flat: torch.Tensor) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        """(layer, module) -> PEFT-shaped (A [r, d_in], B [d_out_m, r]) views of a flat buffer
        (`master`, `grad`, `stage` or an optimizer state of the same layout)."""
        out = {}
        for layer, blk in self.blocks:
            vl = blk.vl
            for module in vl.slice_names:
                if (layer, module) not in self.ranks:
                    continue
                s, r = vl.slice_index(module), self.ranks[(layer, module)]
                lo, hi = vl.slice_offsets[s], vl.slice_offsets[s + 1]
                out[(layer, module)] = (self._a(flat, blk)[s, :r], self._b(flat, blk)[lo:hi, :r])
        return out

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def publish(self) -> None:
        """After an optimizer step: the masters, rounded to the compute dtype, into the slot table."""
        if self.master is not self.stage:
            self.stage.copy_(self.master)
        torch._foreach_copy_(self._table_views, self._stage_views)

    def gather_grads(self) -> None:
        """Before an optimizer step: on one device `grad` is complete; split over ranks
        (`parallel.train_state`) the ranks' gradients are gathered here."""

    def zero_grad(self) -> None:
        self.grad.zero_()
        if self.master_grad is not self.grad:
            self.master_grad.zero_()

    def release(self) -> None:
        for _, blk in self.blocks:
            blk.vl.train_slots.pop(self.slot, None)
