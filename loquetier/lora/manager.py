"""AdapterManager: which adapter sits in which device slot, a CPU cache for the rest, LRU swapping.

The manager owns the slot tables of every `VirtualLoraLinear`; layers only read them. An adapter
being trained is pinned to its slot: its slot *is* its parameters (views the optimizer updates).
Every adapter carries a weights version, new whenever its weights may differ from any earlier ones
(it is added, or an optimizer step wrote its slot): the prefix cache keys K/V by it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from ..config import LoraConfig
from ..errors import (
    AdapterError,
    AdapterInUseError,
    AdapterNotFoundError,
    CapacityError,
)
from ..kernels.lora_dropout import SlotDropout
from ..models.llama import LlamaModel
from .adapter import AdapterWeights
from .slot_writes import clear_slot, write_slices
from .trainable import AdapterTrainState


@dataclass
class AdapterRecord:
    """One registered adapter. `weights` is its CPU copy (stale while it trains in its slot)."""

    name: str
    weights: AdapterWeights
    slot: int | None = None
    pins: int = 0
    last_used: int = 0
    parent: str | None = None
    source: Path | None = None   # where it can be re-read from; such adapters may be dropped when full
    version: int = 0             # identity of its current weights, unique in this manager (0 = base model)
    train_state: AdapterTrainState | None = None   # while it trains

    @property
    def trainable(self) -> bool:
        return self.train_state is not None


class AdapterManager:
    """Registry of adapters: attach/detach, device slots with an LRU CPU cache, train/freeze."""

    def __init__(self, model: LlamaModel, config: LoraConfig):
        self.config = config
        self.layers = model.virtual_layers()  # per layer: module name -> VirtualLoraLinear
        self.records: dict[str, AdapterRecord] = {}
        self.slot_owner: list[str | None] = [None] * config.max_loras
        self._clock = itertools.count(1)
        self._versions = itertools.count(1)
        # LoRA dropout of each slot's training tokens (0 unless it trains)
        self.device = self.layers[0][next(iter(self.layers[0]))].lora_a.device
        self.dropout = SlotDropout(config.max_loras, self.device)

    # ------------------------------------------------------------------ registry
    def __contains__(self, name: str) -> bool:
        return name in self.records

    def names(self) -> list[str]:
        return list(self.records)

    def get(self, name: str) -> AdapterRecord:
        if name not in self.records:
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded; loaded: {sorted(self.records)}")
        return self.records[name]

    def add(self, name: str, weights: AdapterWeights, parent: str | None = None,
            source: Path | None = None) -> None:
        if not name or not isinstance(name, str):
            raise AdapterError("adapter name must be a non-empty string")
        if name in self.records:
            raise AdapterError(f"an adapter named {name!r} is already loaded; unload it first or pick another name")
        if weights.max_rank > self.config.max_lora_rank:
            raise AdapterError(f"adapter rank {weights.max_rank} exceeds max_lora_rank={self.config.max_lora_rank}")
        if len(self.records) >= self.config.max_loras + self.config.max_cpu_loras:
            self._drop_reloadable()
        if len(self.records) >= self.config.max_loras + self.config.max_cpu_loras:
            raise CapacityError(f"{len(self.records)} adapters are loaded, the limit is max_loras + max_cpu_loras "
                                f"= {self.config.max_loras + self.config.max_cpu_loras}; unload one first")
        self.records[name] = AdapterRecord(name, weights.packed(), parent=parent, source=source,
                                           last_used=next(self._clock), version=next(self._versions))

    def weights_version(self, name: str | None) -> int | None:
        """Identity of the adapter's current weights (0 for the base model, None if not loaded)."""
        if name is None:
            return 0
        rec = self.records.get(name)
        return None if rec is None else rec.version

    def weights_changed(self, name: str) -> None:
        """Call after writing new weights into a trainable adapter's slot (an optimizer step)."""
        self.get(name).version = next(self._versions)

    def _drop_reloadable(self) -> None:
        """Forget the least recently used idle adapter that can be re-read from disk on demand."""
        idle = [r for r in self.records.values() if r.source is not None and not r.pins and not r.trainable]
        if idle:
            self.remove(min(idle, key=lambda r: r.last_used).name)

    def remove(self, name: str) -> None:
        rec = self.get(name)
        if rec.pins or rec.trainable:
            raise AdapterInUseError(f"adapter {name!r} is in use (training or running requests); try again later")
        if rec.slot is not None:
            self._clear(rec.slot)
        del self.records[name]

    # ------------------------------------------------------------------ slots
    def num_free_slots(self, wanted: set[str]) -> int:
        """How many of `wanted` could be on the device at once given pinned adapters."""
        pinned = {r.name for r in self.records.values() if r.pins or r.trainable}
        return self.config.max_loras - len(pinned | set(wanted))

    def fits(self, names: set[str]) -> bool:
        """Can all of `names` be in slots at the same time (beside pinned adapters)?"""
        return self.num_free_slots(names) >= 0

    def activate(self, names: set[str]) -> dict[str, int]:
        """Put every named adapter in a device slot (swapping LRU ones out); return name -> slot."""
        stamp = next(self._clock)
        for name in names:
            self.get(name).last_used = stamp
        out = {}
        for name in names:
            rec = self.records[name]
            if rec.slot is None:
                self._swap_in(rec, protect=names)
            out[name] = rec.slot
        return out

    def _swap_in(self, rec: AdapterRecord, protect: set[str]) -> None:
        free = [i for i, owner in enumerate(self.slot_owner) if owner is None]
        if not free:
            victims = [self.records[o] for o in self.slot_owner
                       if o is not None and o not in protect and not self.records[o].pins
                       and not self.records[o].trainable]
            if not victims:
                raise CapacityError(f"all {self.config.max_loras} adapter slots are busy; raise max_loras")
            victim = min(victims, key=lambda r: r.last_used)
            free = [victim.slot]
            self._clear(victim.slot)
        slot = free[0]
        moved = rec.weights.tensors_on(self.device)
        write_slices(slot, [(self.layers[layer][module], module, a, b, rec.weights.scale(layer, module))
                            for (layer, module), a, b in zip(rec.weights.modules, moved[0::2], moved[1::2])])
        self.slot_owner[slot] = rec.name
        rec.slot = slot

    def _clear(self, slot: int) -> None:
        owner = self.slot_owner[slot]
        clear_slot([vl for table in self.layers for vl in dict.fromkeys(table.values())], slot)
        self.slot_owner[slot] = None
        if owner is not None and owner in self.records:
            self.records[owner].slot = None

    def pin(self, name: str) -> None:
        self.get(name).pins += 1

    def unpin(self, name: str) -> None:
        rec = self.records.get(name)
        if rec is not None and rec.pins > 0:
            rec.pins -= 1

    # ------------------------------------------------------------------ training
    def training_slots(self) -> tuple[int, ...]:
        """The device slots of the adapters being trained (each is pinned to its slot)."""
        return tuple(sorted(r.slot for r in self.records.values() if r.trainable))

    def make_trainable(self, name: str) -> AdapterTrainState:
        """Pin the adapter to a slot and give it a training state (flat master weights and
        gradient buffers that every virtual layer's SMLM backward writes into)."""
        rec = self.get(name)
        if rec.trainable:
            raise AdapterInUseError(f"adapter {name!r} is already being trained")
        self.activate({name})
        ranks = {key: a.shape[0] for key, (a, _) in rec.weights.modules.items()}
        rec.train_state = AdapterTrainState(rec.slot, self.layers, ranks)
        self.dropout.set(rec.slot, float(rec.weights.spec.lora_dropout))
        return rec.train_state

    def snapshot(self, name: str) -> AdapterWeights:
        """The adapter's current weights as a CPU copy (reads the slot while it trains)."""
        rec = self.get(name)
        if not rec.trainable:
            return AdapterWeights(rec.weights.spec, {k: (a.clone(), b.clone()) for k, (a, b) in rec.weights.modules.items()})
        modules = {}
        for (layer, module), (a0, _) in rec.weights.modules.items():
            a, b = self.layers[layer][module].read_slice(rec.slot, module, a0.shape[0])
            modules[(layer, module)] = (a.detach().float().cpu().clone(), b.detach().float().cpu().clone())
        return AdapterWeights(rec.weights.spec, modules)

    def freeze(self, name: str) -> None:
        """Stop training: copy the slot back to the CPU copy and drop the parameter views."""
        rec = self.get(name)
        if not rec.trainable:
            return
        rec.weights = self.snapshot(name).packed()
        rec.train_state.release()
        rec.train_state = None
        self.dropout.set(rec.slot, 0.0)
