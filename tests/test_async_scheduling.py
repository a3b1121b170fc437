"""Asynchronous scheduling: each inference step is launched before the host reads the previous
step's tokens (placeholders resolved on the device, stop checks one step late). Generations must be
exactly those of HF `generate` and of the engine with it off, whatever stops, aborts or preempts."""

import torch
from helpers import write_adapter, write_checkpoint, write_model_with_tokenizer
from transformers import AutoModelForCausalLM

from loquetier import LLM, SamplingParams


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (3 + (7 * i) % 29,), generator=g).tolist() for i in range(n)]


def test_stop_token_mid_batch_matches_transformers(tmp_path):
    """Requests stopping at different steps while others run on: each equals HF generate with that
    token as its EOS, although the engine computed a row past every stop."""
    write_checkpoint(tmp_path, "llama")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    # float32 like the reference (on CUDA `auto` would pick bf16, whose rounding changes greedy ties)
    llm = LLM(str(tmp_path), dtype="float32", block_size=4, num_kv_blocks=256)
    assert llm.engine.config.async_scheduling
    prompts = _prompts(6)
    decode_rows = []
    llm.engine.step_observers.append(lambda info: decode_rows.append(info["num_decode_tokens"]))
    free = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    # a length limit is known at launch: no row is computed past the last token
    assert sum(decode_rows) == 6 * 15
    stops = [o.token_ids[2 + i] for i, o in enumerate(free)]   # request i stops at or before step 3 + i
    outs = llm.generate(prompts, [SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[t], ignore_eos=True)
                                  for t in stops])
    for p, t, o in zip(prompts, stops, outs):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, eos_token_id=t,
                          pad_token_id=0)[0, len(p):].tolist()
        assert o.token_ids == ref and o.finish_reason == "stop"
    # the row computed past each stop is neither returned nor counted
    counted = {st.request_id: st.output_tokens for st in llm.engine.stats.finished}
    assert [counted[o.request_id] for o in outs] == [len(o.token_ids) for o in outs]
    assert llm.engine.kv.allocator.num_free == 256 and not llm.engine.has_unfinished()


def test_async_equals_sync_for_every_sampling_feature(tmp_path):
    """Seeds, logprobs, penalties (which fall back to synchronous steps), stop strings, adapters,
    chunked prefill and preemption: the same outputs with asynchronous scheduling on and off."""
    hf = write_model_with_tokenizer(tmp_path / "base", "llama")
    write_adapter(hf, tmp_path / "ad", 4, ["q_proj", "down_proj"])
    prompts = _prompts(8, seed=1)
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=9, temperature=1.0, seed=5, ignore_eos=True),
              SamplingParams(max_tokens=10, temperature=0, logprobs=3, ignore_eos=True),
              SamplingParams(max_tokens=11, temperature=0.8, top_k=20, top_p=0.9, seed=3, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=0, repetition_penalty=1.3, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=0, stop=["e"], ignore_eos=True),
              SamplingParams(max_tokens=7, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=0)]
    results = {}
    for mode in (True, False):
        for kv_blocks, budget in ((512, 2048), (14, 16)):   # roomy; then chunked prefill + preemption
            llm = LLM(str(tmp_path / "base"), block_size=4, num_kv_blocks=kv_blocks, max_num_batched_tokens=budget,
                      async_scheduling=mode)
            llm.load_adapter("ad", tmp_path / "ad")
            outs = llm.generate(prompts, params, adapters=[("ad", None)[i % 2] for i in range(8)])
            results[mode, kv_blocks] = [(o.token_ids, o.text, o.finish_reason,
                                         [(lp.token_id, round(lp.logprob, 5)) for lp in o.logprobs or []])
                                        for o in outs]
            assert llm.engine.kv.allocator.num_free == kv_blocks
            if kv_blocks == 14:
                assert sum(o.metrics["num_preemptions"] for o in outs) > 0
    assert results[True, 512] == results[False, 512]
    assert results[True, 14] == results[False, 14]
    assert any(r[2] == "stop" for r in results[True, 512])   # the stop string did cut a request


def test_outputs_trail_one_step_and_aborts_in_flight(llama_dir):
    llm = LLM(str(llama_dir), block_size=4, num_kv_blocks=64)
    eng = llm.engine
    keep = eng.add_request([5, 6, 7], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    gone = eng.add_request([8, 9], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert eng.step() == []                      # the prefill's tokens are still on their way
    first = eng.step()                           # ...and arrive while the first decode runs
    assert sorted(o.request_id for o in first) == sorted([keep, gone])
    assert all(len(o.token_ids) == 1 and min(o.token_ids) >= 0 for o in first)
    eng.abort(gone)                              # its decode row is in flight: dropped on arrival
    outs = {}
    while eng.has_unfinished():
        for o in eng.step():
            outs.setdefault(o.request_id, []).append(o)
    assert gone not in outs and outs[keep][-1].finished and len(outs[keep][-1].token_ids) == 6
    ref = LLM(str(llama_dir), block_size=4, num_kv_blocks=64, async_scheduling=False)
    assert outs[keep][-1].token_ids == ref.generate([[5, 6, 7]], SamplingParams(
        max_tokens=6, temperature=0, ignore_eos=True))[0].token_ids
    assert eng.kv.allocator.num_free == 64
