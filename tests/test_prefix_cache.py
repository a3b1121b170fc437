"""Automatic prefix caching: outputs equal those without it (and HF/PEFT's), adapters never share
K/V computed with other weights, and cached blocks are evicted least recently used first."""

import numpy as np
import pytest
import torch
from helpers import needs_gpu, write_adapter, write_checkpoint, write_model_with_tokenizer

from loquetier import LLM, SamplingParams
from loquetier.engine.batch import ScheduledSeq
from loquetier.engine.block_pool import BlockPool
from loquetier.engine.kv_cache import context_slots
from loquetier.engine.prefix_cache import PrefixCache
from loquetier.engine.sequence import Sequence
from loquetier.kernels import attention as attn_ops

BS = 4
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=1)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix")
    hf = write_checkpoint(root / "base", "llama")
    peft = {name: write_adapter(hf, root / name, 4, TARGETS, seed=seed)
            for name, seed in (("a", 1), ("b", 2), ("a2", 3))}
    return root, hf, peft


def _tokens(n, seed):
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


SYSTEM = _tokens(37, 0)
# user turns after the shared system prompt; 0 and 3 make prompts of exactly 37 and 40 = 10 blocks
PROMPTS = [SYSTEM + _tokens(n, 100 + i) for i, n in enumerate((5, 0, 12, 3, 1, 20, 7, 9))]


def _llm(root, **kw):
    kw.setdefault("num_kv_blocks", 512)
    kw.setdefault("dtype", "float32")   # compared with float32 HF greedy outputs, also on a GPU
    return LLM(str(root / "base"), block_size=BS, max_loras=4, max_lora_rank=8, **kw)


def _generate(llm, prompts, adapters=None, params=GREEDY):
    outs = llm.generate(prompts, params, adapters)
    return [o.token_ids for o in outs], [[lp.logprob for lp in o.logprobs] for o in outs], outs


def _assert_same(got, expected):
    assert got[0] == expected[0]
    # the same math over a cached context and over the whole prompt: equal up to float rounding
    np.testing.assert_allclose(np.array(sum(got[1], [])), np.array(sum(expected[1], [])), atol=2e-5)


def _hf_greedy(model, prompt, n):
    return model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False)[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def uncached(setup):
    root, _, _ = setup
    return _generate(_llm(root, enable_prefix_caching=False), PROMPTS)


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_shared_system_prompt_matches_uncached_and_hf(setup, uncached, async_scheduling):
    root, hf, _ = setup
    llm = _llm(root, async_scheduling=async_scheduling)
    first = _generate(llm, [PROMPTS[0], PROMPTS[3]])
    got = _generate(llm, PROMPTS)
    _assert_same(got, uncached)
    assert first[0] == [uncached[0][0], uncached[0][3]]
    # every prompt found the system prompt's 9 full blocks; a prompt seen before, all of its blocks
    # but the one holding its last token (always computed: its logits are sampled)
    cached = [o.metrics["num_cached_tokens"] for o in got[2]]
    assert all(c >= 36 for c in cached) and cached[1] == 36 and cached[0] == 40 and cached[3] == 36
    stats = llm.engine.stats.prefix_cache
    assert stats.hits == sum(cached) and stats.queries == 42 + 40 + sum(len(p) for p in PROMPTS)
    # cached blocks count as free: the pool is whole again
    kv = llm.engine.kv
    assert kv.allocator.num_free == kv.num_blocks and kv.allocator.num_cached > 0 and kv.usage == 0.0
    for i in (0, 3):
        assert got[0][i] == _hf_greedy(hf, PROMPTS[i], GREEDY.max_tokens)


def test_next_turn_reuses_the_generated_tokens(setup):
    """A follow-up turn (prompt + answer + new text) hits the blocks its answer filled while decoding."""
    root, _, _ = setup
    llm = _llm(root)
    turn1 = _generate(llm, PROMPTS[:1])
    turn2 = PROMPTS[0] + turn1[0][0] + _tokens(6, 7)
    got = _generate(llm, [turn2])
    # the answer's last token was sampled but never fed back, so its K/V are not in the cache
    assert got[2][0].metrics["num_cached_tokens"] == (len(PROMPTS[0]) + GREEDY.max_tokens - 1) // BS * BS
    _assert_same(got, _generate(_llm(root, enable_prefix_caching=False), [turn2]))


def test_chunked_prefill_and_preemption_with_caching(setup, uncached):
    root, _, _ = setup
    chunked = _llm(root, max_num_batched_tokens=8)
    _assert_same(_generate(chunked, PROMPTS), uncached)
    assert chunked.engine.stats.prefix_cache.hits > 0
    # a pool far too small for all sequences at once: preempted ones are recomputed, from the cache
    tight = _llm(root, num_kv_blocks=28)
    got = _generate(tight, PROMPTS)
    _assert_same(got, uncached)
    assert sum(o.metrics["num_preemptions"] for o in got[2]) > 0 and tight.engine.stats.prefix_cache.hits > 0
    assert tight.engine.kv.allocator.num_free == 28


def test_two_adapters_share_a_prompt_but_not_the_cache(setup):
    root, hf, peft = setup
    llm = _llm(root)
    for name in ("a", "b"):
        llm.load_adapter(name, root / name)
    stats = llm.engine.stats.prefix_cache
    prompt = PROMPTS[2]
    got_a = _generate(llm, [prompt], ["a"])
    for adapter in ("b", None):   # the same tokens under other weights: nothing to reuse
        hits = stats.hits
        got = _generate(llm, [prompt], [adapter])
        assert stats.hits == hits
        assert got[0][0] == _hf_greedy(hf if adapter is None else peft[adapter], prompt, GREEDY.max_tokens)
    again = _generate(llm, [prompt], ["a"])
    assert again[2][0].metrics["num_cached_tokens"] == (len(prompt) - 1) // BS * BS
    _assert_same(again, got_a)
    assert got_a[0][0] == _hf_greedy(peft["a"], prompt, GREEDY.max_tokens)


def test_adapter_reloaded_with_other_weights_gets_no_stale_hit(setup):
    root, _, peft = setup
    llm = _llm(root)
    stats = llm.engine.stats.prefix_cache
    prompt = PROMPTS[5]
    llm.load_adapter("x", root / "a")
    _generate(llm, [prompt], ["x"])
    llm.unload_adapter("x")
    llm.load_adapter("x", root / "a2")   # the same name, other weights
    hits = stats.hits
    got = _generate(llm, [prompt], ["x"])
    assert stats.hits == hits
    assert got[0][0] == _hf_greedy(peft["a2"], prompt, GREEDY.max_tokens)


def test_adapter_in_training_gets_no_stale_hit(tmp_path):
    from helpers import write_prompt_completion

    from loquetier.lora.adapter import LoraSpec
    from loquetier.training.spec import TrainSpec
    from loquetier.training.trainer import Trainer
    write_model_with_tokenizer(tmp_path / "base", "llama")
    write_prompt_completion(tmp_path / "data.jsonl", 8, seed=1)
    llm = LLM(str(tmp_path / "base"), block_size=BS, max_loras=4, max_lora_rank=8, num_kv_blocks=256)
    reference = LLM(str(tmp_path / "base"), block_size=BS, max_loras=4, max_lora_rank=8, num_kv_blocks=256,
                    enable_prefix_caching=False)
    trainer = Trainer(llm.engine)
    job = trainer.submit(TrainSpec(name="t", train_file=str(tmp_path / "data.jsonl"), output_dir=str(tmp_path / "out"),
                                   lora=LoraSpec(r=4, lora_alpha=8, target_modules=TARGETS), max_steps=3,
                                   micro_batch_size=4, learning_rate=0.05, warmup_steps=0, seed=3))
    trainer.pause(job.id)
    stats = llm.engine.stats.prefix_cache
    prompt, live = PROMPTS[2], f"{job.spec.name}@train"
    _generate(llm, [prompt], [live])
    before = _generate(llm, [prompt], [live])
    assert before[2][0].metrics["num_cached_tokens"] > 0   # unchanged weights: a hit
    trainer.resume(job.id)
    while job.step < 1:
        llm.engine.step()
    trainer.pause(job.id)
    hits = stats.hits
    after = _generate(llm, [prompt], [live])
    assert stats.hits == hits
    # the outside reference: the same weights, in an engine without a cache
    reference.engine.add_adapter("now", llm.engine.adapters.snapshot(live))
    expected = _generate(reference, [prompt], ["now"])
    _assert_same(after, expected)
    assert np.abs(np.array(after[1][0]) - np.array(before[1][0])).max() > 1e-3   # the step changed the answer


def test_reset_prefix_cache_forgets_cached_blocks_only_when_idle(setup, uncached):
    """`LLM.reset_prefix_cache` (vLLM's name): after it the same prompts hit nothing and give the
    same outputs; while a request is waiting it refuses and the cache stays whole."""
    root, _, _ = setup
    llm = _llm(root)
    kv = llm.engine.kv
    _generate(llm, PROMPTS[:2])
    cached = kv.allocator.num_cached
    assert cached > 0
    rid = llm.engine.add_request(PROMPTS[2], GREEDY)
    assert llm.reset_prefix_cache() is False and kv.allocator.num_cached == cached
    llm.engine.abort(rid)
    assert llm.reset_prefix_cache() is True
    assert kv.allocator.num_cached == 0 and kv.allocator.num_free == kv.num_blocks
    before = llm.engine.stats.prefix_cache.copy()
    got = _generate(llm, PROMPTS)
    assert got[2][0].metrics["num_cached_tokens"] == 0 and got[2][1].metrics["num_cached_tokens"] == 0
    window = llm.engine.stats.prefix_cache.since(before)   # the shared system prompt still hits within the batch
    assert window.queries == sum(len(p) for p in PROMPTS)
    assert window.hits == sum(o.metrics["num_cached_tokens"] for o in got[2])
    _assert_same(got, uncached)
    assert kv.allocator.enable_caching and kv.allocator.num_cached > 0   # caching stays on


def test_eviction_under_pool_pressure_is_lru(setup):
    root, _, _ = setup
    llm = _llm(root, num_kv_blocks=40)
    kv, stats = llm.engine.kv, llm.engine.stats.prefix_cache
    prompts = [_tokens(30, 200 + i) for i in range(6)]   # each leaves 9 full blocks cached: 54 > 40
    expected = _generate(_llm(root, enable_prefix_caching=False), prompts)

    def check(i):
        hits = stats.hits
        _assert_same(_generate(llm, [prompts[i]]), (expected[0][i:i + 1], expected[1][i:i + 1]))
        assert kv.allocator.num_free == kv.num_blocks and kv.allocator.num_cached <= kv.num_blocks
        return stats.hits - hits

    assert [check(i) for i in range(len(prompts))] == [0] * len(prompts)
    assert check(5) == (30 - 1) // BS * BS   # the most recently used prompt is still cached
    assert check(0) == 0                     # the least recently used one was evicted to make room


def test_block_pool_reference_counts_and_lru():
    pool = BlockPool(8)
    a = pool.allocate(3)
    for i, block in enumerate(a):
        pool.cache(block, bytes([i]))
    pool.touch(a[:2])                       # a second user of the first two
    pool.release(a)
    assert pool.num_free == 6 and pool.lookup([bytes([0]), bytes([1]), bytes([2])]) == a
    pool.release(a[:2])
    assert pool.num_free == 8 and pool.num_cached == 3
    fresh = pool.allocate(5)                # never-used blocks go first: nothing evicted
    assert set(fresh).isdisjoint(a) and pool.num_cached == 3
    b = pool.allocate(3)                    # evicts a[2] (unused longest), then a[1], a[0]
    assert b == a[::-1] and pool.num_cached == 0
    for i, block in enumerate(b):
        pool.cache(block, bytes([10 + i]))
    pool.release(b)                         # a sequence's tail is evicted before its head
    assert pool.allocate(1) == [b[2]] and pool.lookup([bytes([10]), bytes([11]), bytes([12])]) == b[:2]
    pool.touch(b[:1])
    assert pool.num_free == 1 and pool.num_evictable(b[:2]) == 1
    pool.release(b[:1], keep_cached=False)  # stale content: no longer findable
    assert pool.lookup([bytes([10])]) == [] and pool.num_free == 2
    pool.cache(fresh[0], bytes([11]))       # the same content elsewhere already: stays private
    assert pool.lookup([bytes([11])]) == [b[1]]


def test_blocks_holding_placeholders_are_not_hashed():
    """With asynchronous scheduling a sequence's newest tokens are placeholders (< 0) for a step."""
    pool = BlockPool(8)
    cache = PrefixCache(pool, BS, lambda adapter: 0)
    seq = Sequence(list(range(10, 16)), GREEDY)
    assert cache.match(seq) == []
    cache.admit(seq, [])
    seq.block_table = pool.allocate(2)
    seq.output_token_ids = [5, -1]           # position 7 fed from the device, its id not read yet
    seq.num_computed_tokens = 8
    cache.commit(seq)
    assert seq.num_cached_blocks == 1 and len(seq.block_hashes) == 1 and pool.num_cached == 1
    seq.output_token_ids[1] = 6              # settled: now the second block can be hashed
    cache.commit(seq)
    assert seq.num_cached_blocks == 2 and pool.num_cached == 2


def test_weights_version_changes_with_the_weights(setup):
    root, _, _ = setup
    eng = _llm(root).engine
    eng.load_adapter("a", root / "a")
    v = eng.adapters.weights_version("a")
    assert eng.adapters.weights_version(None) == 0 and v > 0
    eng.adapters.weights_changed("a")
    assert eng.adapters.weights_version("a") > v
    eng.unload_adapter("a")
    assert eng.adapters.weights_version("a") is None
    eng.load_adapter("a", root / "a")
    assert eng.adapters.weights_version("a") > v + 1


def test_one_token_chunk_in_a_decode_step_reads_its_own_token(setup):
    """A prompt's one-token chunk rides a decode-only step (a captured graph on CUDA): its input is
    the token at its position, not its sequence's last token."""
    root, _, _ = setup
    eng = _llm(root).engine
    seq = Sequence(_tokens(9, 1), GREEDY)
    seq.block_table = [0, 1, 2]
    _, (ids, pos, *_rest) = eng.runner.decode_metadata([ScheduledSeq(seq, 4, 1)], {None: -1}, BS)
    assert ids.tolist() == [seq.prompt_token_ids[4]] and pos.tolist() == [4]


def test_context_slots_gather_each_sequences_cache_in_order():
    torch.manual_seed(0)
    cache = torch.randn(10, BS, 2, 8)
    tables = np.array([[3, 7, 1, 0], [9, 2, 0, 0], [5, 4, 6, 8]])
    lens = np.array([11, 5, 13])
    slots, cu = context_slots(tables, lens, BS)
    gathered = cache.view(-1, 2, 8)[torch.from_numpy(slots)]
    assert cu.tolist() == [0, 11, 16, 29]
    for i in range(3):
        expected = attn_ops.gather_kv(cache, torch.from_numpy(tables[i]), int(lens[i]))
        assert torch.equal(gathered[cu[i]:cu[i + 1]], expected)


@needs_gpu
@pytest.mark.parametrize("heads,kv_heads,window", [(32, 8, None), (8, 8, None), (32, 8, 48)])
def test_packed_context_attention_matches_reference(heads, kv_heads, window):
    """Chunks continuing a cached context: one gather + one varlen flash call against one SDPA
    call per sequence over its gathered cache (bottom-right aligned causal mask)."""
    torch.manual_seed(0)
    d, bs, num_blocks = 128, 16, 96
    k_cache = torch.randn(num_blocks, bs, kv_heads, d, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    chunks, contexts = [1, 40, 7, 130, 64], [17, 400, 7 + 16, 300, 64 + 256]   # queries are the last positions
    blocks = torch.randperm(num_blocks).tolist()
    width = max(-(-c // bs) for c in contexts)
    tables = np.zeros((len(chunks), width), dtype=np.int64)
    for i, c in enumerate(contexts):
        n = -(-c // bs)
        tables[i, :n], blocks = blocks[:n], blocks[n:]
    q = torch.randn(sum(chunks), heads, d, device="cuda", dtype=torch.bfloat16)
    cu_q = np.concatenate([[0], np.cumsum(chunks)])
    slots, cu_k = context_slots(tables, np.array(contexts), bs)
    packed = attn_ops.PackedContext(torch.from_numpy(slots).cuda(), torch.from_numpy(cu_q).int().cuda(),
                                    torch.from_numpy(cu_k).int().cuda(), max(chunks), max(contexts))
    scale = d ** -0.5
    assert attn_ops._packed_flash() is not None, "this PyTorch has no torch.nn.attention.varlen"
    out = attn_ops.paged_prefill_attention(q, k_cache, v_cache, None, cu_q.tolist(), contexts, scale, window,
                                           packed=packed)
    assert not attn_ops._packed_flash_failed
    ref = attn_ops.paged_prefill_attention_ref(q, k_cache, v_cache, torch.from_numpy(tables).cuda(), cu_q.tolist(),
                                               contexts, scale, window)
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2
    assert (out.float() - ref.float()).abs().max().item() < 5e-2
