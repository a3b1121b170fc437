"""Adapters under tensor parallelism: rank 0's registry writes every rank's slots, and trained
adapters keep whole weights on rank 0.

Slots: each rank's slot table holds its shard (`VirtualLoraLinear.write_slice` cuts the full
tensors); rank 0 keeps the CPU copies, as on one device, and broadcasts an adapter's tensors when
it enters a slot. Training: autograd's leaves are every rank's shard views; rank 0's optimizer
steps whole tensors (the same shapes as on one device, so checkpoints and optimizer states do
not depend on the split). Gradients are gathered before a step (`collect_grads`; a
training-only step's returned gradients are gathered at once, see runner.py), and the stepped
weights go back into every shard (`publish_weights`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from ..lora.adapter import AdapterWeights, module_shapes
from ..lora.manager import AdapterManager
from ..models.llama import TARGET_MODULES
from .channel import Op
from .plan import floats
from .sharding import join_grad_shards, lora_split_dim, take_shard

MODULE_NAMES = tuple(TARGET_MODULES)   # module <-> index in plans


@dataclass
class SlotParams:
    """A trained slot's LoRA tensors on one rank, in the job's order (by layer and module, A then B)."""

    slot: int
    keys: list[tuple[int, str]]
    shards: list[torch.Tensor]                               # views of the slot table: autograd's leaves
    full: list[torch.Tensor] = field(default_factory=list)   # rank 0: the whole tensors the optimizer steps

    @classmethod
    def of(cls, slot: int, views: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]) -> SlotParams:
        keys = sorted(views)
        return cls(slot, keys, [t for k in keys for t in views[k]])

    @property
    def kinds(self) -> list[tuple[str, str]]:
        return [(module, kind) for _, module in self.keys for kind in "AB"]


def module_plan(slot: int, ranks: dict[tuple[int, str], int]) -> list[np.ndarray]:
    keys = sorted(ranks)
    return [np.asarray([slot]), np.asarray([k[0] for k in keys]),
            np.asarray([MODULE_NAMES.index(k[1]) for k in keys]), np.asarray([ranks[k] for k in keys])]


def module_ranks(parts: list[np.ndarray]) -> tuple[int, dict[tuple[int, str], int]]:
    slot, layers, modules, ranks = parts[:4]
    return int(slot[0]), {(int(l), MODULE_NAMES[int(m)]): int(r) for l, m, r in zip(layers, modules, ranks)}


def gather_full(tp, tensors: list[torch.Tensor], kinds: list[tuple[str, str]]) -> list[torch.Tensor] | None:
    """Rank 0: the whole tensors of which every rank holds `tensors` (its shards' gradients); None elsewhere."""
    every = tp.all_gather(torch.cat([t.reshape(-1) for t in tensors]))
    if not tp.is_leader:
        return None
    out, offset = [], 0
    for t, (module, kind) in zip(tensors, kinds):
        n = t.numel()
        out.append(join_grad_shards([every[r, offset:offset + n].view(t.shape) for r in range(tp.size)], module, kind))
        offset += n
    return out


def take_grads(shards: list[torch.Tensor]) -> list[torch.Tensor]:
    """The shards' accumulated gradients (zeros where none), which leave them."""
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in shards]
    for p in shards:
        p.grad = None
    return grads


def whole_shape(shard: torch.Tensor, module: str, kind: str, size: int) -> list[int]:
    shape, dim = list(shard.shape), lora_split_dim(module, kind)
    if dim is not None:
        shape[dim] *= size
    return shape


def whole_numel(shards: list[torch.Tensor], kinds: list[tuple[str, str]], size: int) -> int:
    return sum(math.prod(whole_shape(p, m, k, size)) for p, (m, k) in zip(shards, kinds))


def write_shards(tp, shards: list[torch.Tensor], flat: torch.Tensor, kinds: list[tuple[str, str]]) -> None:
    """Every rank: its part of the whole tensors laid end to end in `flat` into its shards."""
    offset = 0
    with torch.no_grad():
        for p, (module, kind) in zip(shards, kinds):
            shape = whole_shape(p, module, kind, tp.size)
            n = math.prod(shape)
            p.copy_(take_shard(flat[offset:offset + n].view(shape), lora_split_dim(module, kind), tp.rank, tp.size))
            offset += n


def full_numel(args, ranks: dict[tuple[int, str], int]) -> int:
    return sum(r * sum(module_shapes(args, module)) for (_, module), r in ranks.items())


def write_slot(manager: AdapterManager, args, slot: int, ranks: dict[tuple[int, str], int],
               scales: np.ndarray, flat: torch.Tensor) -> None:
    """Every slice of an adapter, sent whole in `flat` (A then B per module, sorted), into a slot."""
    offset = 0
    for (layer, module), scale in zip(sorted(ranks), scales.tolist()):
        r = ranks[(layer, module)]
        d_in, d_out = module_shapes(args, module)
        a = flat[offset:offset + r * d_in].view(r, d_in)
        b = flat[offset + r * d_in:offset + r * (d_in + d_out)].view(d_out, r)
        manager.layers[layer][module].write_slice(slot, module, a, b, scale)
        offset += r * (d_in + d_out)


def freeze_slot(manager: AdapterManager, slot: int) -> None:
    for table in manager.layers:
        for layer in dict.fromkeys(table.values()):
            layer.freeze(slot)


class TPAdapterManager(AdapterManager):
    """Rank 0's adapter manager: every slot write, clear and training change is mirrored on the workers."""

    def __init__(self, model, config, tp):
        super().__init__(model, config)
        self.tp = tp
        self.trained: dict[str, SlotParams] = {}
        dtype_of = self.layers[0]["q_proj"].lora_a
        self.dtype, self.device = dtype_of.dtype, dtype_of.device

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

    def make_trainable(self, name: str) -> dict[tuple[int, str], tuple[nn.Parameter, nn.Parameter]]:
        """As on one device, but the Parameters returned are whole tensors on rank 0, not the slot."""
        views = super().make_trainable(name)
        rec = self.records[name]
        self.tp.channel.send(Op.MAKE_TRAINABLE, module_plan(rec.slot, {k: a.shape[0] for k, (a, _) in views.items()}))
        params = SlotParams.of(rec.slot, views)
        full = {key: tuple(nn.Parameter(t.to(self.device, self.dtype, copy=True), requires_grad=True)
                           for t in rec.weights.modules[key]) for key in params.keys}
        params.full = [t for key in params.keys for t in full[key]]
        self.trained[name] = params
        return full

    def snapshot(self, name: str) -> AdapterWeights:
        params = self.trained.get(name)
        if params is None:
            return super().snapshot(name)
        tensors = iter(t.detach().float().cpu().clone() for t in params.full)
        return AdapterWeights(self.get(name).weights.spec, {key: (next(tensors), next(tensors)) for key in params.keys})

    def freeze(self, name: str) -> None:
        if name in self.trained:
            self.tp.channel.send(Op.FREEZE, [np.asarray([self.trained[name].slot])])
        super().freeze(name)
        self.trained.pop(name, None)

    def collect_grads(self, name: str) -> None:
        params = self.trained.get(name)
        # backward writes the shards' .grad on every rank alike: none on rank 0, none anywhere
        if params is None or all(p.grad is None for p in params.shards):
            return
        self.tp.channel.send(Op.COLLECT_GRADS, [np.asarray([params.slot])])
        for p, g in zip(params.full, gather_full(self.tp, take_grads(params.shards), params.kinds)):
            p.grad = g if p.grad is None else p.grad.add_(g)

    def publish_weights(self, name: str) -> None:
        params = self.trained.get(name)
        if params is None:
            return
        self.tp.channel.send(Op.PUBLISH, [np.asarray([params.slot])])
        flat = self.tp.broadcast_(torch.cat([p.detach().reshape(-1) for p in params.full]))
        write_shards(self.tp, params.shards, flat, params.kinds)

    def shards_of(self, params) -> tuple[list[int], list[torch.Tensor], list[tuple[str, str]]]:
        """For the whole tensors of one or more trained adapters (each adapter's `make_trainable`
        parameters in order): their slots, this rank's shards and the tensors' kinds."""
        slots, shards, kinds, i = [], [], [], 0
        by_first = {id(p.full[0]): p for p in self.trained.values()}
        while i < len(params):
            p = by_first[id(params[i])]
            assert len(params) - i >= len(p.full) and all(a is b for a, b in zip(params[i:], p.full)), \
                "each trained adapter's parameters, whole and in order"
            slots.append(p.slot)
            shards += p.shards
            kinds += p.kinds
            i += len(p.full)
        return slots, shards, kinds

