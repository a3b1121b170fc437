"""Sampling: seeds, filters, penalties, stops, logprobs (checked against direct math)."""

import pytest
import torch

from loquetier import LLM, SamplingParams
from loquetier.engine.sampler import Sampler
from loquetier.engine.sequence import Sequence
from loquetier.errors import RequestError


def seq(params, prompt=(1, 2, 3), output=()):
    s = Sequence(list(prompt), params)
    s.output_token_ids = list(output)
    return s


def test_greedy_and_logprobs():
    logits = torch.randn(3, 50)
    seqs = [seq(SamplingParams(temperature=0, logprobs=3)) for _ in range(3)]
    tokens, lps = Sampler()(logits, seqs)
    assert tokens == logits.argmax(-1).tolist()
    ref = torch.log_softmax(logits, -1)
    for i, lp in enumerate(lps):
        assert lp.token_id == tokens[i]
        assert abs(lp.logprob - ref[i, tokens[i]].item()) < 1e-5
        top = ref[i].topk(3)
        assert [t for t, _ in lp.top] == top.indices.tolist()


def test_plain_greedy_on_bf16_logits_matches_fp32_argmax_with_ties():
    # the plain greedy path takes the argmax without the fp32 cast; bf16 has many exact ties
    logits = (torch.randn(6, 300) * 4).round().to(torch.bfloat16)
    seqs = [seq(SamplingParams(temperature=0)) for _ in range(6)]
    tokens, lps = Sampler()(logits, seqs)
    assert tokens == logits.float().argmax(-1).tolist() and lps == [None] * 6
    mixed = seqs[:3] + [seq(SamplingParams(temperature=0, logprobs=1))]   # one row asks: the full path
    assert Sampler()(logits[:4], mixed)[0] == tokens[:4]


def test_same_seed_same_tokens_and_distribution():
    logits = torch.randn(1, 20)
    s1 = [seq(SamplingParams(temperature=1.0, seed=7)) for _ in range(1)]
    a = [Sampler()(logits, s1)[0][0] for _ in range(30)]
    s2 = [seq(SamplingParams(temperature=1.0, seed=7)) for _ in range(1)]
    b = [Sampler()(logits, s2)[0][0] for _ in range(30)]
    assert a == b and len(set(a)) > 1
    # unseeded sampling follows softmax(logits): check frequencies roughly
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    counts = torch.zeros(4)
    sampler = Sampler()
    seqs = [seq(SamplingParams(temperature=1.0)) for _ in range(4000)]
    toks, _ = sampler(logits.expand(4000, 4).contiguous(), seqs)
    counts = torch.bincount(torch.tensor(toks), minlength=4).float() / 4000
    assert torch.allclose(counts, logits.softmax(-1)[0], atol=0.03)


def test_top_k_top_p_min_p_restrict_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]]).expand(500, 6).contiguous()
    for params, allowed in [(SamplingParams(top_k=2), {0, 1}),
                            (SamplingParams(top_p=0.7), {0, 1}),
                            (SamplingParams(min_p=0.3), {0, 1})]:
        toks, _ = Sampler()(logits, [seq(params) for _ in range(500)])
        assert set(toks) == allowed, params


def test_penalties():
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5]])
    s = seq(SamplingParams(temperature=0, repetition_penalty=2.0), prompt=[1], output=[2])
    pen = Sampler._apply_penalties(logits.clone(), [s])
    assert torch.allclose(pen, torch.tensor([[1.0, 1.0, -2.0, 0.5]]))
    s = seq(SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25), prompt=[0], output=[1, 1, 3])
    pen = Sampler._apply_penalties(logits.clone(), [s])
    assert torch.allclose(pen, torch.tensor([[1.0, 2.0 - 0.5 - 0.5, -1.0, 0.5 - 0.5 - 0.25]]))


def test_bad_params_raise():
    for kw in [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(logprobs=50), dict(n=0)]:
        with pytest.raises(RequestError):
            SamplingParams(**kw)


def test_engine_stops(llama_dir):
    llm = LLM(str(llama_dir), num_kv_blocks=64)
    base = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    assert len(base.token_ids) == 10 and base.finish_reason == "length"
    stop_tok = base.token_ids[3]
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop_tok],
                                                   ignore_eos=True))[0]
    assert out.token_ids == base.token_ids[:base.token_ids.index(stop_tok) + 1] and out.finish_reason == "stop"
    with pytest.raises(RequestError, match="maximum context length"):
        llm.generate([[5, 6], [1] * 500], SamplingParams(max_tokens=100))
    assert not llm.engine.has_unfinished()  # the valid request of the rejected batch is not left queued
    # seeded sampling through the engine reproduces
    p = SamplingParams(max_tokens=8, temperature=1.0, seed=123, ignore_eos=True)
    a = llm.generate([[5, 6, 7], [9, 9]], [p, p])
    b = llm.generate([[9, 9], [5, 6, 7]], [p, p])
    assert a[0].token_ids == b[1].token_ids and a[1].token_ids == b[0].token_ids


# ------------------------------------------------------------------------------------ logit_bias
def test_logit_bias_per_row_forces_bans_and_keeps_raw_logprobs():
    logits = torch.randn(4, 50)
    top2 = logits.topk(2, -1).indices
    forced = [17, 3, 0, 0]
    biases = [{17: 100.0}, {3: 100, 11: -5.5}, {int(top2[2, 0]): -100}, None]
    seqs = [seq(SamplingParams(temperature=0, logprobs=2, logit_bias=b)) for b in biases]
    tokens, lps = Sampler()(logits, seqs)
    # +100 forces its token, -100 bans the argmax (the runner-up wins), an unbiased row is untouched
    assert tokens == [forced[0], forced[1], int(top2[2, 1]), int(logits[3].argmax())]
    # logprobs are the model's (vLLM's raw_logprobs): the bias picks the token, not its logprob
    ref = torch.log_softmax(logits, -1)
    for i, lp in enumerate(lps):
        assert lp.logprob == pytest.approx(ref[i, tokens[i]].item(), abs=1e-5)
        assert [t for t, _ in lp.top] == ref[i].topk(2).indices.tolist()
    # sampled rows: a +100 bias makes every draw that token, whatever the seed
    toks, _ = Sampler()(logits[:1].expand(64, 50).contiguous(),
                        [seq(SamplingParams(temperature=1.0, seed=i, logit_bias={42: 100})) for i in range(64)])
    assert set(toks) == {42}


def test_logit_bias_validation():
    for bias in [{5: 101}, {5: -100.5}, {-1: 1.0}, {"5": 1.0}, {5: float("nan")}, {5: True}, {True: 1.0}, {2**64: 1.0}]:
        with pytest.raises(RequestError, match="logit_bias"):
            SamplingParams(logit_bias=bias)
    assert SamplingParams(logit_bias={}).logit_bias is None
    assert SamplingParams(logit_bias={5: 100, 6: -100}).bias_arrays[0].tolist() == [5, 6]


def test_logit_bias_generations_equal_transformers_sequence_bias(tmp_path):
    """One batch, each row its own bias (forcing, banning, mild, none), with asynchronous scheduling
    on and off: each equals HF greedy `generate` with that bias as its `sequence_bias`."""
    from helpers import write_checkpoint
    from transformers import AutoModelForCausalLM
    write_checkpoint(tmp_path, "llama")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    prompts = [[5, 6, 7], [9, 10, 11, 12], [40, 41], [7, 7, 7, 7, 7]]
    free = [hf.generate(torch.tensor([p]), max_new_tokens=1, do_sample=False, pad_token_id=0)[0, -1].item()
            for p in prompts]
    biases = [{77: 100.0}, {free[1]: -100.0}, {free[2]: -2.5, 33: 3.0, 34: 1.5}, None]
    refs = [hf.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, pad_token_id=0,
                        sequence_bias={(t,): v for t, v in (b or {}).items()} or None)[0, len(p):].tolist()
            for p, b in zip(prompts, biases)]
    assert refs[0] == [77] * 8 and refs[1][0] != free[1]
    for mode in (True, False):
        llm = LLM(str(tmp_path), num_kv_blocks=64, async_scheduling=mode)
        outs = llm.generate(prompts, [SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logit_bias=b)
                                      for b in biases])
        assert [o.token_ids for o in outs] == refs, mode
    with pytest.raises(RequestError, match="logit_bias: token id 256 is outside the vocabulary"):
        llm.generate([[5, 6]], SamplingParams(logit_bias={256: 1.0}))
    assert not llm.engine.has_unfinished()
