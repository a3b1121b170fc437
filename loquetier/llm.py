"""`LLM`: the offline Python API, shaped like vLLM's."""

from __future__ import annotations

from pathlib import Path

from .config import CacheConfig, EngineConfig, LoraConfig, SchedulerConfig
from .engine.engine import Engine, RequestOutput
from .errors import RequestError
from .models.sources import ModelSource, resolve_model_source
from .sampling_params import SamplingParams


class LLM:
    """Load a base model once; serve it and any number of LoRA adapters through `generate`.
    `model` is a checkpoint directory, a Hugging Face Hub id (`revision`: branch, tag or commit),
    a .gguf file (or a directory holding one), or `random:PRESET`."""

    def __init__(self, model: str | ModelSource, *, revision: str | None = None, max_loras: int = 8,
                 max_lora_rank: int = 64, max_cpu_loras: int = 64, dtype: str = "auto", device: str | None = None,
                 max_model_len: int | None = None, block_size: int = 16, num_kv_blocks: int | None = None,
                 kv_cache_memory: int | None = None, max_num_batched_tokens: int = 2048, max_num_seqs: int = 256,
                 seed: int = 0, attention_backend: str = "auto", lora_backend: str = "auto", lora_fold_shrink: str = "auto",
                 train_cuda_graphs: bool = True, mixed_cuda_graphs: bool = True, async_scheduling: bool = True,
                 enable_prefix_caching: bool = True, tensor_parallel_size: int = 1):
        """`tensor_parallel_size` N > 1 splits the model over N processes of this host (GPUs 0..N-1);
        this one is rank 0 and starts the others (`close()` stops them)."""
        self.source = model if isinstance(model, ModelSource) else resolve_model_source(model, revision)
        config = EngineConfig(
            model=self.source.spec, revision=revision, dtype=dtype, device=device, max_model_len=max_model_len,
            seed=seed, attention_backend=attention_backend, lora_backend=lora_backend,
            train_cuda_graphs=train_cuda_graphs, mixed_cuda_graphs=mixed_cuda_graphs, async_scheduling=async_scheduling,
            tensor_parallel_size=tensor_parallel_size,
            cache=CacheConfig(block_size=block_size, num_blocks=num_kv_blocks, memory_budget_bytes=kv_cache_memory,
                              enable_prefix_caching=enable_prefix_caching),
            lora=LoraConfig(max_loras=max_loras, max_lora_rank=max_lora_rank, max_cpu_loras=max_cpu_loras,
                            fold_shrink=lora_fold_shrink),
            scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs))
        self.tokenizer = self.source.load_tokenizer()
        self.engine = Engine(config, self.tokenizer, self.source)

    def close(self) -> None:
        """Stop the tensor-parallel workers (also done at exit)."""
        self.engine.close()

    def load_adapter(self, name: str, path: str | Path) -> None:
        self.engine.load_adapter(name, path)

    def unload_adapter(self, name: str) -> None:
        self.engine.unload_adapter(name)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached KV block (as vLLM's `LLM.reset_prefix_cache`), e.g. between benchmark
        runs of the same prompts; False, and nothing changed, while a request is unfinished."""
        return self.engine.reset_prefix_cache()

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer; pass prompts as lists of token ids")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def generate(self, prompts: str | list[int] | list[str | list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 adapters: str | None | list[str | None] = None) -> list[RequestOutput]:
        """Generate for every prompt with continuous batching; outputs come back in input order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        n = len(prompts)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()] * n
        names = adapters if isinstance(adapters, list) else [adapters] * n
        if len(params) != n or len(names) != n:
            raise RequestError("prompts, sampling_params and adapters must have the same length")
        ids: list[str] = []
        results: dict[str, RequestOutput] = {}
        try:
            for p, sp, a in zip(prompts, params, names):   # a bad prompt leaves none of the batch queued
                ids.append(self.engine.add_request(self.encode(p), sp, a))
            while len(results) < n:
                for out in self.engine.step():
                    if out.finished:
                        results[out.request_id] = out
        finally:
            for rid in ids:
                if rid not in results:
                    self.engine.abort(rid)
        return [results[rid] for rid in ids]
