"""Scheduling under pressure: chunked prefill and KV-pool preemption keep outputs exact."""

import torch

from loquetier import LLM, SamplingParams
from loquetier.engine.block_pool import BlockPool


def test_block_pool_free_list():
    a = BlockPool(8)
    x = a.allocate(3)
    y = a.allocate(5)
    assert a.num_free == 0 and len(set(x + y)) == 8
    a.release(x)
    assert a.num_free == 3 and sorted(a.allocate(3)) == sorted(x)


def _prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in (40, 3, 25, 60, 8, 33, 17, 50)]


def test_chunked_prefill_and_preemption_keep_tokens(llama_dir):
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    roomy = LLM(str(llama_dir), block_size=4, num_kv_blocks=1024)
    expected = [o.token_ids for o in roomy.generate(_prompts(), params)]
    # tiny token budget: long prompts are prefilled in chunks next to running decodes
    chunked = LLM(str(llama_dir), block_size=4, num_kv_blocks=1024, max_num_batched_tokens=16)
    assert [o.token_ids for o in chunked.generate(_prompts(), params)] == expected
    # a KV pool far too small for all sequences at once: preemption + recompute
    tight = LLM(str(llama_dir), block_size=4, num_kv_blocks=24)
    outs = tight.generate(_prompts(), params)
    assert [o.token_ids for o in outs] == expected
    assert sum(o.metrics["num_preemptions"] for o in outs) > 0
    assert tight.engine.kv.allocator.num_free == 24


def test_abort_frees_blocks(llama_dir):
    llm = LLM(str(llama_dir), block_size=4, num_kv_blocks=64)
    eng = llm.engine
    rid = eng.add_request(list(range(3, 30)), SamplingParams(max_tokens=50, ignore_eos=True))
    eng.step()
    eng.step()
    assert eng.kv.allocator.num_free < 64
    eng.abort(rid)
    assert eng.kv.allocator.num_free == 64 and not eng.has_unfinished()


def test_request_whose_adapter_file_vanished_fails_alone(tmp_path):
    import shutil

    from helpers import write_adapter, write_checkpoint
    hf = write_checkpoint(tmp_path / "base", "llama")
    write_adapter(hf, tmp_path / "ad", 4, ["q_proj"])
    llm = LLM(str(tmp_path / "base"), block_size=4, num_kv_blocks=64)
    eng = llm.engine
    eng.load_adapter("ad", tmp_path / "ad")
    gone = eng.add_request([5, 6, 7], SamplingParams(max_tokens=3), "ad")
    good = eng.add_request([5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True), None)
    eng.adapters.remove("ad")        # dropped from memory (re-readable from its path)...
    shutil.rmtree(tmp_path / "ad")   # ...until the path disappears before the request is admitted
    outs = {}
    while eng.has_unfinished():
        for o in eng.step():
            outs[o.request_id] = o
    assert outs[gone].finish_reason == "abort" and "does not exist" in outs[gone].error
    assert len(outs[good].token_ids) == 3


def test_start_up_warm_up_steps_touch_only_the_scratch_block(llama_dir):
    """The CUDA engine runs dummy prefills at start-up (`ModelRunner.warm_up_steps`); their K/V land in
    the scratch block alone, so the cache of live sequences and every generation are unchanged."""
    llm = LLM(str(llama_dir), block_size=4, num_kv_blocks=64)
    eng = llm.engine
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    before = [o.token_ids for o in llm.generate(_prompts()[:3], params)]
    rid = eng.add_request(_prompts()[3], params)
    eng.step()
    pool = eng.kv.pool.clone()
    eng.runner.warm_up_steps(eng.kv.scratch_block, eng.kv.block_size)
    changed = (eng.kv.pool != pool).flatten(3).any(-1)          # [layers, 2, blocks]
    assert changed.any() and changed[:, :, eng.kv.scratch_block].all()
    changed[:, :, eng.kv.scratch_block] = False
    assert not changed.any() and eng.kv.allocator.num_free < 64
    eng.abort(rid)
    assert [o.token_ids for o in llm.generate(_prompts()[:3], params)] == before
