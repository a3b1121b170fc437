"""`ServerConfig`: what `loquetier serve` is asked to be, as plain data (the CLI fills it in)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import CacheConfig, EngineConfig, LoraConfig, SchedulerConfig


@dataclass
class ServerConfig:
    """The model to serve, engine knobs, the HTTP surface and where durable state lives."""

    model: str                                 # checkpoint directory, Hub id or .gguf file
    revision: str | None = None                # Hub branch, tag or commit of a Hub id
    served_model_name: str | None = None      # default: `model` as given
    adapters: dict[str, str] = field(default_factory=dict)   # name -> PEFT dir, loaded at start-up
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None                 # when set, /v1/* needs `Authorization: Bearer <key>`
    data_dir: str = "loquetier-data"           # SQLite, uploaded files, job checkpoints
    lora_roots: list[str] = field(default_factory=list)  # where load_lora_adapter may read from
    enable_lora_loading: bool = False          # POST /v1/load_lora_adapter and /v1/unload_lora_adapter
    max_upload_bytes: int = 512 << 20
    shutdown_timeout: float = 20.0             # seconds a SIGTERM waits for in-flight requests
    # fine-tuning defaults (OpenAI's "auto" hyperparameters resolve to these)
    base_learning_rate: float = 2e-4           # learning_rate_multiplier 1.0 means this
    default_epochs: int = 3
    max_micro_batch_size: int = 8              # a larger batch_size is split into accumulation steps
    checkpoint_interval: int | None = None     # optimizer steps; None: at the end of every epoch
    # engine
    dtype: str = "auto"
    device: str | None = None
    max_model_len: int | None = None
    seed: int = 0
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory: int | None = None
    enable_prefix_caching: bool = True
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    max_waiting: int = 4096
    max_loras: int = 8
    max_lora_rank: int = 64
    max_cpu_loras: int = 64
    slo_ttft: float | None = None
    slo_tpot: float | None = None
    train_policy: str = "slo"
    attention_backend: str = "auto"
    lora_backend: str = "auto"
    tensor_parallel_size: int = 1              # GPUs (processes) the model is split over

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    @property
    def short_model_name(self) -> str:
        """The base model's name inside fine-tuned model ids (`ft:{short}:{suffix}:{id}`)."""
        name = Path(self.model_name.rstrip("/")).name or self.model_name
        return name.removesuffix(".gguf")

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=self.model, revision=self.revision, dtype=self.dtype, device=self.device,
            max_model_len=self.max_model_len,
            seed=self.seed, attention_backend=self.attention_backend, lora_backend=self.lora_backend,
            tensor_parallel_size=self.tensor_parallel_size,
            cache=CacheConfig(block_size=self.block_size, num_blocks=self.num_kv_blocks,
                              memory_budget_bytes=self.kv_cache_memory,
                              enable_prefix_caching=self.enable_prefix_caching),
            lora=LoraConfig(max_loras=self.max_loras, max_lora_rank=self.max_lora_rank,
                            max_cpu_loras=self.max_cpu_loras),
            scheduler=SchedulerConfig(max_num_batched_tokens=self.max_num_batched_tokens,
                                      max_num_seqs=self.max_num_seqs, max_waiting=self.max_waiting,
                                      slo_ttft=self.slo_ttft, slo_tpot=self.slo_tpot,
                                      train_policy=self.train_policy))
