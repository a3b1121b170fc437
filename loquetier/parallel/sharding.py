"""What splits how under tensor parallelism: model shapes, checkpoint tensors, LoRA tensors."""

from __future__ import annotations

import dataclasses
import re

import torch

from ..errors import ModelLoadError
from ..models.config import ModelArgs

# column-parallel: split by output (A whole, B split by rows); row-parallel: split by input
# (A split by columns, B whole). q/k/v split by head, so attention runs on each rank's heads.
COLUMN_MODULES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_MODULES = ("o_proj", "down_proj")
_CHECKPOINT_DIM = {**{m: 0 for m in COLUMN_MODULES}, **{m: 1 for m in ROW_MODULES}}
_LAYER_TENSOR = re.compile(r"^model\.layers\.\d+\.(?:self_attn|mlp)\.(\w+)\.(weight|bias)$")


def shard_args(args: ModelArgs, size: int) -> ModelArgs:
    """One rank's share of the model: its heads, KV heads and MLP columns (everything else whole)."""
    for what, n in (("attention heads", args.num_heads), ("key/value heads", args.num_kv_heads),
                    ("intermediate size", args.intermediate_size), ("vocabulary size", args.vocab_size)):
        if n % size:
            raise ModelLoadError(f"tensor_parallel_size={size} does not divide the model's {what} ({n}); "
                                 f"pick a size that divides {args.num_kv_heads} key/value heads")
    return dataclasses.replace(args, num_heads=args.num_heads // size, num_kv_heads=args.num_kv_heads // size,
                               intermediate_size=args.intermediate_size // size)


def checkpoint_split_dim(name: str) -> int | None:
    """The dim along which a HF checkpoint tensor is split (None: every rank reads it whole)."""
    if name == "lm_head.weight":
        return 0   # vocab-parallel LM head
    m = _LAYER_TENSOR.match(name)
    if m is None or m.group(1) not in _CHECKPOINT_DIM:
        return None   # embedding, norms
    dim = _CHECKPOINT_DIM[m.group(1)]
    return 0 if m.group(2) == "bias" else dim   # only column layers have biases (q/k/v of Qwen2)


def read_shard(f, name: str, rank: int, size: int) -> torch.Tensor:
    """This rank's part of a tensor of an open safetensors file; reads only those bytes."""
    dim = checkpoint_split_dim(name)
    if dim is None:
        return f.get_tensor(name)
    part = f.get_slice(name)
    n = part.get_shape()[dim] // size
    lo, hi = rank * n, (rank + 1) * n
    return part[lo:hi] if dim == 0 else part[:, lo:hi]


def lora_split_dim(module: str, kind: str) -> int | None:
    """The dim along which a LoRA tensor (kind 'A' [r, d_in] or 'B' [d_out, r]) is split; None: whole."""
    if module in ROW_MODULES:
        return 1 if kind == "A" else None
    return 0 if kind == "B" else None


def take_shard(t: torch.Tensor, dim: int | None, rank: int, size: int) -> torch.Tensor:
    """Rank's part of a full tensor (a view); the tensor itself when it is not split."""
    if dim is None:
        return t
    n = t.shape[dim] // size
    return t.narrow(dim, rank * n, n)


def join_grad_shards(pieces: list[torch.Tensor], module: str, kind: str) -> torch.Tensor:
    """The full gradient of a LoRA tensor from every rank's gradient of its shard.

    Split tensors: their shards side by side. A of a column-parallel layer: each rank saw only its
    output columns' share of d(shrink), so its gradients are partial sums, added up here. B of a
    row-parallel layer: every rank computed the same whole gradient (from the summed shrink)."""
    dim = lora_split_dim(module, kind)
    if dim is not None:
        return torch.cat(pieces, dim)
    if module in COLUMN_MODULES:
        return torch.stack(pieces).sum(0)
    return pieces[0]
