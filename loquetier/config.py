"""Dataclass configs. Plain data: what the engine is asked to be, decided once at start-up."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
DTYPE_CHOICES = ("auto", *_DTYPES)

log = logging.getLogger("loquetier")


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """Map a user-facing dtype name (not "auto": see `resolve_dtype`) to a torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPE_CHOICES)}")
    return _DTYPES[name]


def resolve_dtype(name: str | torch.dtype, checkpoint_dtype: torch.dtype | None, device: torch.device) -> torch.dtype:
    """vLLM's "auto": the checkpoint's own dtype on a GPU, except that float32 checkpoints run in
    bfloat16 there (half the memory; said in a log line); float32 on a CPU. Other names are taken as given."""
    if name != "auto":
        return parse_dtype(name)
    stored = checkpoint_dtype or torch.float32   # no dtype in the config: transformers' default, float32
    if device.type == "cpu":
        return torch.float32
    if stored == torch.float32:
        log.warning("dtype auto: the checkpoint is float32; running it in bfloat16 on %s "
                    "(pass --dtype float32 to keep float32)", device.type)
        return torch.bfloat16
    return stored


@dataclass
class CacheConfig:
    """Paged KV cache: fixed-size blocks from one pool sized by a memory budget (or an explicit count)."""

    block_size: int = 16
    num_blocks: int | None = None          # explicit pool size; wins over the memory budget
    memory_budget_bytes: int | None = None  # default: 256 MiB on CPU, 90% of free memory on GPU
    # full blocks stay findable by a hash of their tokens, the tokens before them and the adapter
    # weights, so a later prompt with that prefix reuses them (engine/prefix_cache.py)
    enable_prefix_caching: bool = True


@dataclass
class LoraConfig:
    """Adapter slots: `max_loras` live on the device, up to `max_cpu_loras` more wait in a CPU cache."""

    max_loras: int = 8
    max_lora_rank: int = 64
    max_cpu_loras: int = 64
    # inference forwards fold the SMLM shrink into the base GEMM (see lora/layer.py):
    # "auto" (when the stacked A table is small next to the base weight) | "always" | "never"
    fold_shrink: str = "auto"


@dataclass
class SchedulerConfig:
    """Per-step token budget and admission limits (policy knobs)."""

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    max_waiting: int = 4096
    # SLOs in seconds; None disables the SLO-aware cap on training tokens.
    slo_ttft: float | None = None
    slo_tpot: float | None = None
    # "slo" (cost-model driven) or "fixed" (the paper's N inference steps per training step).
    train_policy: str = "slo"
    infer_steps_per_train_step: int = 5


@dataclass
class EngineConfig:
    """Everything the engine needs to start."""

    model: str                 # checkpoint directory, Hugging Face Hub id, .gguf file, or random:PRESET
    revision: str | None = None  # Hub branch, tag or commit of a Hub id (default: main)
    dtype: str = "auto"          # see resolve_dtype; or float32 | bfloat16 | float16
    device: str | None = None  # default: cuda if available else cpu
    max_model_len: int | None = None  # default: the model's max_position_embeddings (capped at 8192)
    seed: int = 0
    attention_backend: str = "auto"  # "torch" (reference) | "triton" | "auto"
    lora_backend: str = "auto"       # "torch" (reference) | "triton" | "auto"
    cuda_graphs: bool = True         # decode-only steps replay captured graphs (CUDA only)
    train_cuda_graphs: bool = True   # training-only steps whose layout repeats replay a graph (CUDA only)
    # steps of training rows beside decode rows replay bucketed graphs too (with train_cuda_graphs;
    # bf16/fp16 on CUDA); then training tokens beside decode rows are cut to a token bucket, and steps
    # with prefill rows carry none (they run eagerly)
    mixed_cuda_graphs: bool = True
    max_graph_batch: int = 256
    # launch each inference-only step before reading the previous step's tokens on the host, so host
    # work overlaps the GPU (vLLM's async scheduling); outputs and stop checks trail by one step
    async_scheduling: bool = True
    # split the model over this many processes of one host (one GPU each; `loquetier.parallel`)
    tensor_parallel_size: int = 1
    cache: CacheConfig = field(default_factory=CacheConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    @property
    def torch_device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
