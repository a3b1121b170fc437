"""Base-model logits equal transformers' for every supported family, in one flat batch."""

import copy

import pytest
import torch
from helpers import FAMILIES, forward_all, write_checkpoint

from loquetier import LLM, SamplingParams


@pytest.mark.parametrize("family", FAMILIES)
def test_base_logits_match_transformers(tmp_path, family):
    hf = write_checkpoint(tmp_path, family)
    llm = LLM(str(tmp_path), block_size=4, num_kv_blocks=128)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (1, 7, 19, 33)]
    ours = forward_all(llm.engine, prompts, [None] * len(prompts))
    for p, logits in zip(prompts, ours):
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0]
        assert (logits - ref).abs().max().item() <= 1e-4


def test_sharded_checkpoint_and_bf16(tmp_path):
    hf = write_checkpoint(tmp_path / "src", "llama")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    prompt = list(range(5, 25))
    ref = hf(torch.tensor([prompt])).logits[0]
    llm = LLM(str(tmp_path / "sharded"), num_kv_blocks=32)
    assert (forward_all(llm.engine, [prompt], [None])[0] - ref).abs().max().item() <= 1e-4
    for dtype, name in ((torch.bfloat16, "bfloat16"), (torch.float16, "float16")):
        low = LLM(str(tmp_path / "sharded"), num_kv_blocks=32, dtype=name)
        ours = forward_all(low.engine, [prompt], [None])[0].float()
        # our error against fp32 is no worse than transformers' own in the same dtype
        theirs = copy.deepcopy(hf).to(dtype)(torch.tensor([prompt])).logits[0].float()
        ours_err = ((ours - ref).norm() / ref.norm()).item()
        theirs_err = ((theirs - ref).norm() / ref.norm()).item()
        assert ours_err <= 1.5 * theirs_err + 1e-3, (name, ours_err, theirs_err)


def test_pickle_only_checkpoint_is_refused(tmp_path):
    from loquetier.errors import ModelLoadError
    hf = write_checkpoint(tmp_path, "llama")
    (tmp_path / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors"):
        LLM(str(tmp_path))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_generation_matches_transformers(tmp_path, family):
    hf = write_checkpoint(tmp_path, family)
    llm = LLM(str(tmp_path), block_size=4, num_kv_blocks=256)
    prompts = [[5, 6, 7], list(range(10, 40)), [100] * 9]
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    for p, o in zip(prompts, outs):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, min_new_tokens=12)[0, len(p):]
        assert o.token_ids == ref.tolist()


def test_mistral_sliding_window_matches_transformers(tmp_path):
    hf = write_checkpoint(tmp_path, "mistral", sliding_window=8)
    llm = LLM(str(tmp_path), block_size=4, num_kv_blocks=128)
    assert llm.engine.args.sliding_window == 8
    prompt = list(range(5, 30))   # longer than the window: masking matters
    ref = hf(torch.tensor([prompt])).logits[0]
    assert (forward_all(llm.engine, [prompt], [None])[0] - ref).abs().max().item() <= 1e-4
    out = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].token_ids
    assert out == hf.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12,
                              do_sample=False)[0, len(prompt):].tolist()
    # the Triton decode kernel (interpreted on a CPU) honours the window too
    tri = LLM(str(tmp_path), block_size=4, num_kv_blocks=128, attention_backend="triton")
    assert tri.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].token_ids == out
