"""A worker process of a tensor-parallel engine (forked by `spawner.py`): it builds its shard of the
engine, then runs what rank 0 sends until told to stop."""

from __future__ import annotations


import numpy as np
import torch
import torch.distributed as dist

from .adapters import full_numel, module_ranks, split_train_state, write_slot
from .channel import Op, WorkerChannel
from .plan import as_floats, decode_from_parts, host_batch_from_parts
from .train_state import SplitTrainState


class Worker:
    """Runs rank 0's plans on this rank's `Engine` (its model shard, KV cache, slots and runner)."""

    def __init__(self, engine):
        self.engine = engine
        self.tp = engine.tp
        self.runner = engine.runner
        self.adapters = engine.adapters
        self.device = engine.device
        self.trained: dict[int, SplitTrainState] = {}

    def serve(self) -> None:
        while True:
            op, parts = self.tp.channel.recv()
            if op == Op.SHUTDOWN:
                return
            self.handle(op, parts)

    def handle(self, op: Op, parts: list[np.ndarray]) -> None:
        if op in (Op.STEP, Op.BUCKETED):
            host = host_batch_from_parts(parts, self.adapters.dropout.table)
            if op == Op.BUCKETED:
                self.runner.execute_bucketed(host)
            else:
                self.runner.execute(host.to_device(self.device))
            if host.scheduled and any(s.completes for s in host.scheduled):   # rank 0 sampled: its tokens follow
                self.runner.receive_tokens(sum(s.completes for s in host.scheduled))
        elif op == Op.DECODE:
            arrays, with_lora = decode_from_parts(parts)
            self.runner.graphs.run(*arrays, with_lora)
            self.runner.receive_tokens(len(arrays[0]))
        elif op == Op.WRITE_SLOT:
            slot, ranks = module_ranks(parts)
            flat = torch.empty(full_numel(self.engine.args, ranks), dtype=self.engine.dtype, device=self.device)
            write_slot(self.adapters, self.engine.args, slot, ranks, as_floats(parts[4]), self.tp.broadcast_(flat))
        elif op == Op.CLEAR_SLOT:
            self.adapters._clear(int(parts[0][0]))
        elif op == Op.MAKE_TRAINABLE:
            slot, ranks = module_ranks(parts)
            self.trained[slot] = split_train_state(self.adapters, self.tp, slot, ranks)
            self.adapters.dropout.set(slot, float(as_floats(parts[4])[0]))
        elif op == Op.FREEZE:
            slot = int(parts[0][0])
            self.trained.pop(slot).release()
            self.adapters.dropout.set(slot, 0.0)
        elif op == Op.GATHER_GRADS:
            self.trained[int(parts[0][0])].gather_grads()
        elif op == Op.PUBLISH:
            self.trained[int(parts[0][0])].publish()
        elif op == Op.ZERO_GRADS:
            self.trained[int(parts[0][0])].zero_grad()
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
