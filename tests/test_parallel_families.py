"""Tensor parallelism for the other model families, and a split that does not fit (no engine of
test_parallel.py is alive here: one tensor-parallel engine per process)."""

import pytest
import torch
from helpers import write_adapter, write_model_with_tokenizer
from test_parallel import ALL, PROMPTS, SHAPE, step_logits

from loquetier import LLM, SamplingParams
from loquetier.errors import ModelLoadError


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_other_families_split_in_two(tmp_path, family):
    """Qwen2 (q/k/v biases split with their rows, tied embedding: the LM head is the embedding's
    vocabulary shard) and Qwen3 (per-head q/k norms)."""
    hf = write_model_with_tokenizer(tmp_path / "base", family, **SHAPE)
    write_adapter(hf, tmp_path / "a", 8, ALL, seed=1)
    adapters = ["a", None, "a", None]
    out = []
    for size in (2, 1):
        llm = LLM(str(tmp_path / "base"), max_loras=2, max_lora_rank=8, num_kv_blocks=64, block_size=4,
                  tensor_parallel_size=size)
        try:
            llm.load_adapter("a", tmp_path / "a")
            out.append((step_logits(llm, 2, adapters), [o.token_ids for o in llm.generate(
                PROMPTS, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), adapters)]))
        finally:
            llm.close()
    (split_logits, split_tokens), (one_logits, one_tokens) = out
    for got, want in zip(split_logits, one_logits):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert split_tokens == one_tokens


def test_size_that_does_not_divide_the_model_fails_before_starting_workers(tmp_path):
    write_model_with_tokenizer(tmp_path, "llama", **SHAPE)
    with pytest.raises(ModelLoadError, match="tensor_parallel_size=3 does not divide"):
        LLM(str(tmp_path), tensor_parallel_size=3)
    assert not torch.distributed.is_initialized()
