"""A worker process of a tensor-parallel engine (forked by `spawner.py`): it builds its shard of the
engine, then runs what rank 0 sends until told to stop."""

from __future__ import annotations


import numpy as np
import torch
import torch.distributed as dist

from .adapters import (
    SlotParams,
    freeze_slot,
    full_numel,
    gather_full,
    module_ranks,
    take_grads,
    whole_numel,
    write_shards,
    write_slot,
)
from .channel import Op, WorkerChannel
from .plan import as_floats, decode_from_parts, host_batch_from_parts


class Worker:
    """Runs rank 0's plans on this rank's `Engine` (its model shard, KV cache, slots and runner)."""

    def __init__(self, engine):
        self.engine = engine
        self.tp = engine.tp
        self.runner = engine.runner
        self.adapters = engine.adapters
        self.device = engine.device
        self.trained: dict[int, SlotParams] = {}
        self.generators: dict[int, torch.Generator] = {}   # LoRA dropout: rank 0's states, per slot
        self.pending: torch.Tensor | None = None           # the last step's loss sums, for BACKWARD

    def serve(self) -> None:
        while True:
            op, parts = self.tp.channel.recv()
            if op == Op.SHUTDOWN:
                return
            self.handle(op, parts)

    def handle(self, op: Op, parts: list[np.ndarray]) -> None:
        if op == Op.STEP:
            host = host_batch_from_parts(parts, self.generators, self.device)
            result = self.runner.execute(host.to_device(self.device))
            train = result.loss_sums is not None and result.loss_sums.requires_grad
            self.pending = result.loss_sums if train else None
            if host.num_sampled:
                self.runner.receive_tokens(host.num_sampled)
        elif op == Op.DECODE:
            arrays, with_lora = decode_from_parts(parts)
            with torch.no_grad():
                self.runner.graphs.run(*arrays, with_lora)
            self.runner.receive_tokens(len(arrays[0]))
        elif op == Op.TRAIN:
            weights, slots, *host_parts = parts
            host = host_batch_from_parts(host_parts, self.generators, self.device)
            slot_params = [self.trained[s] for s in slots.tolist()]
            self.runner.train_shards(host, as_floats(weights).tolist(), [t for p in slot_params for t in p.shards],
                                     [k for p in slot_params for k in p.kinds], self.device)
        elif op == Op.BACKWARD:
            grad = self.tp.broadcast_(torch.empty(int(parts[0][0]), dtype=torch.float32, device=self.device))
            pending, self.pending = self.pending, None
            torch.autograd.backward(pending, grad)
        elif op == Op.WRITE_SLOT:
            slot, ranks = module_ranks(parts)
            flat = torch.empty(full_numel(self.engine.args, ranks), dtype=self.adapters.layers[0]["q_proj"].lora_a.dtype,
                               device=self.device)
            write_slot(self.adapters, self.engine.args, slot, ranks, as_floats(parts[4]), self.tp.broadcast_(flat))
        elif op == Op.CLEAR_SLOT:
            self.adapters._clear(int(parts[0][0]))
        elif op == Op.MAKE_TRAINABLE:
            slot, ranks = module_ranks(parts)
            self.trained[slot] = SlotParams.of(slot, self.adapters.trainable_views(slot, ranks))
        elif op == Op.FREEZE:
            slot = int(parts[0][0])
            freeze_slot(self.adapters, slot)
            self.trained.pop(slot, None)
        elif op == Op.COLLECT_GRADS:
            params = self.trained[int(parts[0][0])]
            gather_full(self.tp, take_grads(params.shards), params.kinds)
        elif op == Op.PUBLISH:
            params = self.trained[int(parts[0][0])]
            n = whole_numel(params.shards, params.kinds, self.tp.size)
            flat = self.tp.broadcast_(torch.empty(n, dtype=params.shards[0].dtype, device=self.device))
            write_shards(self.tp, params.shards, flat, params.kinds)
        elif op == Op.DROP_TRAIN_GRAPHS:
            self.runner.drop_train_graphs()
        else:
            raise AssertionError(f"unknown op {op}")


def run(spec: dict) -> None:
    """Rank `spec["rank"]`: join the group, build this rank's engine, serve rank 0 until it stops us."""
    from ..engine.engine import Engine
    from .launcher import config_from_dict, cpu_threads, init_group
    rank, size = spec["rank"], spec["size"]
    config = config_from_dict(spec["config"])
    channel = WorkerChannel(spec["address"], bytes.fromhex(spec["authkey"]))
    if config.torch_device.type == "cuda":
        config.device = f"cuda:{rank}"
    else:   # processes of one host share its cores
        torch.set_num_threads(cpu_threads(size))
    tp = init_group(rank, size, spec["store_port"], config.torch_device, channel)
    try:
        Worker(Engine(config, None, tp=tp)).serve()
    except EOFError:   # rank 0 went away
        pass
    finally:
        dist.destroy_process_group()
