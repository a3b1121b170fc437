"""Start a tensor-parallel engine's workers (rank 0 is the calling process) and stop them.

Workers are forked by a helper interpreter (`spawner.py`; the caller's main module is never
re-imported); the engine config reaches them as JSON. Ranks meet in a TCPStore that rank 0 opens
on a free local port, and workers connect to rank 0's control channel.
NVLink multicast (NVLS) stays off: plain NCCL collectives, no symmetric-memory ops.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import logging
import os
import secrets
import signal
import threading
import time

import torch
import torch.distributed as dist

from ..config import CacheConfig, EngineConfig, LoraConfig, SchedulerConfig
from .channel import LeaderChannel, Op
from .group import TensorParallel
from .sharding import shard_args
from .spawner import alive, spawner, wait_exit

NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
log = logging.getLogger("loquetier")


def config_from_dict(d: dict) -> EngineConfig:
    return EngineConfig(**{**d, "cache": CacheConfig(**d["cache"]), "lora": LoraConfig(**d["lora"]),
                           "scheduler": SchedulerConfig(**d["scheduler"])})


def cpu_threads(size: int) -> int:
    return max(1, (os.cpu_count() or 1) // size)


def init_group(rank: int, size: int, store_port: int, device: torch.device, channel, store=None) -> TensorParallel:
    """Join the ranks' process group (NCCL on CUDA, gloo on the CPU)."""
    os.environ.update(NCCL_ENV)
    if device.type == "cuda":
        torch.cuda.set_device(rank)
    if store is None:
        store = dist.TCPStore("127.0.0.1", store_port, size, is_master=False)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank, world_size=size)
    return TensorParallel(rank, size, dist.group.WORLD, channel)


def launch(config: EngineConfig, source) -> TensorParallel:
    """Start ranks 1..N-1 and make this process rank 0 (of an engine of `source`, a resolved
    `ModelSource`); returns its `TensorParallel`."""
    size = config.tensor_parallel_size
    device = config.torch_device
    shard_args(source.args, size)   # before any process starts: a model that does not divide fails here
    if device.type == "cuda" and torch.cuda.device_count() < size:
        raise ValueError(f"tensor_parallel_size={size} needs {size} GPUs; {torch.cuda.device_count()} are visible")
    if dist.is_initialized():
        raise RuntimeError("this process already belongs to a torch.distributed group; one tensor-parallel "
                           "engine per process (close the other one first)")
    os.environ.update(NCCL_ENV)
    threads = torch.get_num_threads()
    if device.type != "cuda":   # the processes share this host's cores (workers do the same)
        torch.set_num_threads(cpu_threads(size))
    authkey = secrets.token_bytes(16)
    channel = LeaderChannel(authkey)
    store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, wait_for_workers=False)
    # the workers load what rank 0 resolved (a Hub id's local snapshot): no second resolution
    cfg = {**dataclasses.asdict(config), "model": str(source.path or source.spec), "revision": None}
    procs = []
    try:
        for rank in range(1, size):
            procs.append(spawner().start({"rank": rank, "size": size, "store_port": store.port,
                                          "address": channel.address, "authkey": authkey.hex(), "config": cfg}))
        _accept(channel, procs)
        tp = init_group(0, size, store.port, device, channel, store)
    except BaseException:
        for pid in procs:
            _kill(pid)
        torch.set_num_threads(threads)
        raise
    tp.processes = procs
    tp.stop = functools.partial(shutdown, tp, threads)
    atexit.register(tp.stop)
    return tp


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _accept(channel: LeaderChannel, procs: list[int]) -> None:
    """Wait for every worker's connection; fail at once if one exits before connecting."""
    done = threading.Event()
    errors: list[BaseException] = []

    def accept():
        try:
            channel.accept(len(procs))
        except BaseException as e:   # the listener closed under it
            errors.append(e)
        done.set()

    threading.Thread(target=accept, daemon=True).start()
    while not done.wait(0.1):
        if not all(alive(pid) for pid in procs):
            channel.listener.close()
            raise RuntimeError("a tensor-parallel worker exited while starting (its error is above)")
    if errors:
        raise errors[0]


def shutdown(tp: TensorParallel, threads: int | None = None) -> None:
    """Tell the workers to stop, wait for them, leave the process group (and give this process its
    CPU threads back)."""
    if not tp.processes:
        return
    procs, tp.processes = tp.processes, []
    try:
        tp.channel.send(Op.SHUTDOWN)
    except OSError:
        pass   # a worker already gone
    deadline = time.monotonic() + 30
    for pid in procs:
        if not wait_exit(pid, max(0.1, deadline - time.monotonic())):
            log.warning("tensor-parallel worker %d did not stop; killing it", pid)
            _kill(pid)
    tp.channel.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    if threads is not None:
        torch.set_num_threads(threads)
