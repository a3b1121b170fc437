"""Adapters under tensor parallelism: rank 0's registry writes every rank's slots.

Each rank's slot table holds its shard (`slot_writes.write_slices` cuts the full tensors).
Rank 0 keeps the CPU copies, as on one device, and broadcasts an adapter's tensors when it enters
a slot; a trained adapter gets a `SplitTrainState` on every rank (train_state.py).
"""

from __future__ import annotations

import numpy as np
import torch

from ..lora.adapter import AdapterWeights, module_shapes
from ..lora.manager import AdapterManager
from ..lora.slot_writes import write_slices
from ..lora.trainable import AdapterTrainState
from ..models.config import LORA_TARGETS
from .channel import Op
from .plan import floats
from .train_state import SplitTrainState

MODULE_NAMES = tuple(LORA_TARGETS)   # module <-> index in plans


def module_plan(slot: int, ranks: dict[tuple[int, str], int]) -> list[np.ndarray]:
    keys = sorted(ranks)
    return [np.asarray([slot]), np.asarray([k[0] for k in keys]),
            np.asarray([MODULE_NAMES.index(k[1]) for k in keys]), np.asarray([ranks[k] for k in keys])]


def module_ranks(parts: list[np.ndarray]) -> tuple[int, dict[tuple[int, str], int]]:
    slot, layers, modules, ranks = parts[:4]
    return int(slot[0]), {(int(l), MODULE_NAMES[int(m)]): int(r) for l, m, r in zip(layers, modules, ranks)}


def full_numel(args, ranks: dict[tuple[int, str], int]) -> int:
    return sum(r * sum(module_shapes(args, module)) for (_, module), r in ranks.items())


def write_slot(manager: AdapterManager, args, slot: int, ranks: dict[tuple[int, str], int],
               scales: np.ndarray, flat: torch.Tensor) -> None:
    """Every slice of an adapter, sent whole in `flat` (A then B per module, sorted), into a slot."""
    offset, writes = 0, []
    for (layer, module), scale in zip(sorted(ranks), scales.tolist()):
        r = ranks[(layer, module)]
        d_in, d_out = module_shapes(args, module)
        a = flat[offset:offset + r * d_in].view(r, d_in)
        b = flat[offset + r * d_in:offset + r * (d_in + d_out)].view(d_out, r)
        writes.append((manager.layers[layer][module], module, a, b, scale))
        offset += r * (d_in + d_out)
    write_slices(slot, writes)


def split_train_state(manager: AdapterManager, tp, slot: int, ranks: dict[tuple[int, str], int],
                      weights: AdapterWeights | None = None) -> SplitTrainState:
    return SplitTrainState(AdapterTrainState(slot, manager.layers, ranks), manager.layers, tp, weights)


class TPAdapterManager(AdapterManager):
    """Rank 0's adapter manager: every slot write, clear and training change is mirrored on the workers."""

    def __init__(self, model, config, tp):
        super().__init__(model, config)
        self.tp = tp
        table = self.layers[0]["q_proj"].lora_a
        self.dtype, self.device = table.dtype, table.device

    def _swap_in(self, rec, protect) -> None:
        super()._swap_in(rec, protect)
        ranks = {key: a.shape[0] for key, (a, _) in rec.weights.modules.items()}
        scales = [rec.weights.scale(*key) for key in sorted(ranks)]
        self.tp.channel.send(Op.WRITE_SLOT, [*module_plan(rec.slot, ranks), floats(scales)])
        flat = torch.cat([t.reshape(-1) for key in sorted(ranks) for t in rec.weights.modules[key]])
        self.tp.broadcast_(flat.to(self.device, self.dtype))

    def _clear(self, slot: int) -> None:
        super()._clear(slot)
        self.tp.channel.send(Op.CLEAR_SLOT, [np.asarray([slot])])

    def make_trainable(self, name: str) -> SplitTrainState:
        """As on one device; the state's buffers are whole on rank 0, each rank trains its shard."""
        local = super().make_trainable(name)
        rec = self.records[name]
        p = float(rec.weights.spec.lora_dropout)
        self.tp.channel.send(Op.MAKE_TRAINABLE, [*module_plan(rec.slot, local.ranks), floats([p])])
        rec.train_state = SplitTrainState(local, self.layers, self.tp, rec.weights)
        return rec.train_state

    def snapshot(self, name: str) -> AdapterWeights:
        rec = self.get(name)
        if not rec.trainable:
            return super().snapshot(name)
        return rec.train_state.weights(rec.weights.spec)

    def freeze(self, name: str) -> None:
        rec = self.get(name)
        if rec.trainable:
            self.tp.channel.send(Op.FREEZE, [np.asarray([rec.slot])])
        super().freeze(name)
