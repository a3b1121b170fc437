"""A trained adapter split over ranks: each rank's shard state, and rank 0's whole one.

Every rank's SMLM backward writes its shard's gradients into its own `AdapterTrainState` (`local`),
laid out for its shard shapes. Rank 0's optimizer steps `master`, laid out as on one device (the
full shapes), so the optimizer state, checkpoints and the saved adapter do not depend on the split:

- `gather_grads`: every rank's `local.grad` to rank 0, joined into `master_grad` (shards side by
  side; A of a column-parallel layer summed: each rank saw only its output columns' share);
- `publish`: rank 0's stepped weights to every rank, which keeps its part (`local.master`) and
  writes it into its slot table;
- `zero_grad`: every rank's `local.grad`.

Rank 0 runs each of these when the job calls it and sends the workers the command to run the same
(they hold a `SplitTrainState` too, without `master`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..lora.adapter import AdapterWeights
from ..lora.trainable import AdapterTrainState, train_layout
from .channel import Op
from .sharding import join_grad_shards, lora_split_dim, take_shard


@dataclass
class _Base:
    out_features: int


class _FullShape:
    """A split virtual layer's shapes before the split (what `train_layout` and `module_views` read)."""

    def __init__(self, vl, size: int):
        row = vl.tp_row
        self.slice_names = vl.slice_names
        self.slice_offsets = vl.slice_offsets if row else tuple(o * size for o in vl.slice_offsets)
        self.in_features = vl.in_features * size if row else vl.in_features
        self.base = _Base(vl.base.out_features if row else vl.base.out_features * size)

    def slice_index(self, name: str) -> int:
        return self.slice_names.index(name)


class SplitTrainState(AdapterTrainState):
    """The training state of an adapter split over ranks (see the module docstring); the job uses
    it as an `AdapterTrainState` whose buffers are whole (on rank 0)."""

    def __init__(self, local: AdapterTrainState, layers, tp, weights: AdapterWeights | None = None):
        # no AdapterTrainState.__init__: the buffers here are laid out for the full shapes, and only
        # `local` is registered with the virtual layers
        self.local, self.tp = local, tp
        self.slot, self.ranks = local.slot, local.ranks
        shapes: dict[int, _FullShape] = {}
        full = [{m: shapes.setdefault(id(vl), _FullShape(vl, tp.size)) for m, vl in table.items()} for table in layers]
        self.blocks, self.size = train_layout(full, self.ranks)
        self.dtype = local.stage.dtype
        self.master = self.master_grad = self.grad = self.stage = None
        if tp.is_leader:
            # as on one device: the slot's weights (rounded to the compute dtype), then fp32 masters
            self.master = torch.zeros(self.size, dtype=torch.float32, device=local.stage.device)
            for key, (a, b) in self.module_views(self.master).items():
                a0, b0 = weights.modules[key]
                a.copy_(a0.to(self.dtype))
                b.copy_(b0.to(self.dtype))
            self.master_grad = self.grad = torch.zeros_like(self.master)
            self.master.grad = self.master_grad
            self.stage = self.master

    def _command(self, op: Op) -> None:
        if self.tp.is_leader:
            self.tp.channel.send(op, [np.asarray([self.slot])])

    def gather_grads(self) -> None:
        self._command(Op.GATHER_GRADS)
        every = self.tp.all_gather(self.local.grad)            # [size, local length]
        if not self.tp.is_leader:
            return
        views = [self.local.module_views(every[r]) for r in range(self.tp.size)]
        with torch.no_grad():
            for key, (a, b) in self.module_views(self.master_grad).items():
                module = key[1]
                a.copy_(join_grad_shards([v[key][0].float() for v in views], module, "A"))
                b.copy_(join_grad_shards([v[key][1].float() for v in views], module, "B"))

    @torch.no_grad()
    def publish(self) -> None:
        self._command(Op.PUBLISH)
        flat = self.master.to(self.dtype) if self.tp.is_leader else torch.empty(
            self.size, dtype=self.dtype, device=self.local.stage.device)
        self.tp.broadcast_(flat)
        local = self.local.module_views(self.local.master)
        for key, (a, b) in self.module_views(flat).items():
            module = key[1]
            local[key][0].copy_(take_shard(a, lora_split_dim(module, "A"), self.tp.rank, self.tp.size))
            local[key][1].copy_(take_shard(b, lora_split_dim(module, "B"), self.tp.rank, self.tp.size))
        self.local.publish()

    def zero_grad(self) -> None:
        self._command(Op.ZERO_GRADS)
        self.local.zero_grad()
        if self.master_grad is not None:
            self.master_grad.zero_()

    def release(self) -> None:
        self.local.release()

    def weights(self, spec) -> AdapterWeights:
        """Rank 0: the adapter as it is served now, on the CPU (`snapshot`)."""
        views = self.module_views(self.master)
        return AdapterWeights(spec, {k: (a.to(self.dtype).float().cpu().clone(), b.to(self.dtype).float().cpu().clone())
                                     for k, (a, b) in views.items()})
