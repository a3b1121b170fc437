"""`TensorParallel`: this process's rank in a tensor-parallel engine, its process group, and the
split-aware operations the model and its virtual LoRA layers call."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..models.config import ModelArgs
from . import ops
from .sharding import (
    COLUMN_MODULES,
    ROW_MODULES,
    checkpoint_split_dim,
    lora_split_dim,
    read_shard,
    shard_args,
    take_shard,
)


@dataclass
class TensorParallel:
    """Rank `rank` of `size`: device collectives go through `group` (NCCL on CUDA, gloo on CPU); the
    step plans through `channel` (rank 0 sends, the others receive)."""

    rank: int
    size: int
    group: dist.ProcessGroup
    channel: object                                  # LeaderChannel on rank 0, WorkerChannel elsewhere
    processes: list = field(default_factory=list)   # rank 0: the workers' process ids
    stop: object = None                              # rank 0: stops them (launcher.shutdown)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ shapes
    def shard_args(self, args: ModelArgs) -> ModelArgs:
        return shard_args(args, self.size)

    def split_layers(self, model) -> None:
        """Tell each virtual layer of a freshly built model how it is split."""
        for table in model.virtual_layers():
            for module, layer in table.items():
                layer.tp = self
                layer.tp_row = module in ROW_MODULES
                assert module in COLUMN_MODULES or layer.tp_row

    def read_checkpoint_shard(self, f, name: str) -> torch.Tensor:
        """This rank's part of a tensor of an open safetensors file (only its bytes are read)."""
        return read_shard(f, name, self.rank, self.size)

    def checkpoint_shard(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of a whole checkpoint tensor (a dequantized GGUF one)."""
        return take_shard(tensor, checkpoint_split_dim(name), self.rank, self.size)

    def lora_shard(self, module: str, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of a module's full A [r, d_in] and B [d_out, r]."""
        return (take_shard(a, lora_split_dim(module, "A"), self.rank, self.size),
                take_shard(b, lora_split_dim(module, "B"), self.rank, self.size))

    # ------------------------------------------------------------------ the engine's parts
    def cache_config(self, config, args: ModelArgs, dtype: torch.dtype, device: torch.device):
        """The KV cache config every rank uses: as many blocks as the smallest rank's budget holds
        (rank 0's block ids index every rank's pool)."""
        from ..engine.kv_cache import num_kv_blocks
        n = torch.tensor([num_kv_blocks(args, config, dtype, device)], dtype=torch.int64, device=device)
        return dataclasses.replace(config, num_blocks=int(self.all_reduce_(n, dist.ReduceOp.MIN).item()))

    def adapter_manager(self, model, config):
        """Rank 0: the registry that also writes the workers' slots; a worker: plain slot tables."""
        from ..lora.manager import AdapterManager
        from .adapters import TPAdapterManager
        return TPAdapterManager(model, config, self) if self.is_leader else AdapterManager(model, config)

    def runner(self, model, max_sampled_rows: int):
        from .runner import TPModelRunner
        return TPModelRunner(model, max_sampled_rows, self)

    # ------------------------------------------------------------------ collectives
    def all_reduce_(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        dist.all_reduce(t, op=op, group=self.group)
        return t

    def broadcast_(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's `t` into every rank's `t` (same shape and dtype everywhere)."""
        dist.broadcast(t, src=0, group=self.group)
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """[size, *t.shape]: every rank's `t`."""
        out = torch.empty(self.size * t.numel(), dtype=t.dtype, device=t.device)
        dist.all_gather_single(out, t.contiguous().view(-1), group=self.group)
        return out.view(self.size, *t.shape)

    def copy_to(self, x: torch.Tensor) -> torch.Tensor:
        """Input of a column-parallel layer (see ops: f)."""
        return ops.copy_to_parallel(x, self)

    def reduce_from(self, y: torch.Tensor) -> torch.Tensor:
        """Partial output of a row-parallel layer, summed (see ops: g)."""
        return ops.reduce_from_parallel(y, self)

    def vocab_logits(self, hidden: torch.Tensor, weight: torch.Tensor, whole: bool, gather: bool) -> torch.Tensor:
        """Logits of this rank's vocabulary rows (`weight` is the LM head's shard, or with `whole` a
        tied embedding every rank holds whole), gathered into [N, V] on every rank when `gather`."""
        if whole:
            weight = take_shard(weight, 0, self.rank, self.size)
        local = F.linear(self.copy_to(hidden), weight)
        return ops.gather_last_dim(local, self) if gather else local

    # ------------------------------------------------------------------ lifetime
    def shutdown(self) -> None:
        """Rank 0: stop the workers and leave the process group (idempotent)."""
        if self.stop is not None:
            self.stop()
