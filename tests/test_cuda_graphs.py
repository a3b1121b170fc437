"""The captured decode forward (adapter-sorted rows, fixed-size padded segments, scratch KV block),
run eagerly with the Triton kernels (interpreted on the CPU), equals the engine's eager decode step."""

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from helpers import needs_gpu, write_adapter, write_checkpoint  # noqa: E402

from loquetier import LLM, SamplingParams  # noqa: E402
from loquetier.engine.cuda_graphs import SEGMENT_MIN_BATCH, DecodeGraphs  # noqa: E402


@pytest.mark.parametrize("fold", ["never", "always"])
@pytest.mark.parametrize("batch,per_token", [(5, False), (SEGMENT_MIN_BATCH + 3, False), (SEGMENT_MIN_BATCH + 3, True)])
def test_decode_graph_forward_matches_eager_step(tmp_path, batch, per_token, fold, monkeypatch):
    hf = write_checkpoint(tmp_path / "base", "llama")
    for i, (r, targets) in enumerate([(4, ["q_proj", "v_proj"]), (8, ["o_proj", "down_proj", "gate_proj"])]):
        write_adapter(hf, tmp_path / f"a{i}", r, targets, seed=i)
    # float32 on a GPU too: the graph's kernels (rotary with the q/k/v delta, fused consumers) round
    # their bf16 products apart from the eager step's, so only float32 compares them at 1e-4
    llm = LLM(str(tmp_path / "base"), max_loras=4, max_lora_rank=8, block_size=4, num_kv_blocks=512,
              max_model_len=128, dtype="float32")
    llm.load_adapter("a0", tmp_path / "a0")
    llm.load_adapter("a1", tmp_path / "a1")
    eng = llm.engine
    g = torch.Generator().manual_seed(0)
    adapters = [("a1", None, "a0")[i % 3] for i in range(batch)]
    for i, a in enumerate(adapters):
        eng.add_request(torch.randint(3, 256, (3 + i % 7,), generator=g).tolist(),
                        SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), a)
    while any(not s.output_token_ids for s in eng.scheduler.running + list(eng.scheduler.waiting)):
        eng.step()
    sched = eng.scheduler.schedule()
    assert len(sched.scheduled) == batch and all(s.length == 1 for s in sched.scheduled)
    slot_of = {None: -1, **eng.adapters.activate({a for a in adapters if a})}
    graphs = DecodeGraphs(eng.model, eng.kv.scratch_block, eng.kv.block_size, -(-eng.max_model_len // eng.kv.block_size),
                          64, eng.device, max_segments=4 + 2, resolve_ids=eng.runner.resolve_ids)
    seqs, arrays = eng.runner.decode_metadata(sched.scheduled, slot_of, eng.kv.block_size)
    assert [slot_of[s.adapter] for s in seqs] == sorted(slot_of[s.adapter] for s in seqs)
    layers = [vl for table in eng.adapters.layers for vl in set(table.values())]
    eng.model.set_lora_fold_shrink(fold)
    for vl in layers:
        vl.backend = "triton"
    eng.model.rotary.backend = "triton"   # folded and segmented: q/k/v's delta added by the rotary kernel
    from loquetier.kernels import rotary_triton
    fused_rotary = []
    real = rotary_triton.rotary_lora_forward_and_cache
    monkeypatch.setattr(rotary_triton, "rotary_lora_forward_and_cache", lambda *a: fused_rotary.append(1) or real(*a))
    try:
        got = graphs.run_eager(*arrays, with_lora=True, per_token=per_token)
    finally:
        for vl in layers:
            vl.backend = "auto"
        eng.model.rotary.backend = "auto"
    # the engine's eager step for the same sequences (reference kernels, reference attention,
    # shrink not folded into the base GEMM)
    # batches of one-token segments (short buckets, per-token graphs) keep the separate expand
    assert bool(fused_rotary) == (fold == "always" and batch >= SEGMENT_MIN_BATCH and not per_token)
    eng.model.set_lora_fold_shrink("never")
    eng.step(keep_logits=True)
    ref = {id(s): row for s, row in zip(eng.last_sample_seqs, eng.last_result.logits)}
    for s, row in zip(seqs, got):
        torch.testing.assert_close(row, ref[id(s)], rtol=1e-4, atol=1e-4)


def test_per_token_graph_is_captured_where_runs_can_be_short_and_taken_for_short_runs():
    """With 64 slots, buckets from SEGMENT_MIN_BATCH up to 2 x 65 rows get a per-token LoRA graph; a
    replay takes it when the sorted rows' runs average under PER_TOKEN_MAX_MEAN_RUN rows."""
    from loquetier.engine import cuda_graphs as cg
    graphs = DecodeGraphs(None, 0, 4, 8, 256, torch.device("cpu"), max_segments=64 + 2)
    assert [b for b in graphs.buckets if graphs._has_per_token_graph(b)] == [b for b in cg.BUCKETS if 32 <= b <= 128]
    few = DecodeGraphs(None, 0, 4, 8, 256, torch.device("cpu"), max_segments=4 + 2)
    assert not any(few._has_per_token_graph(b) for b in few.buckets)
    graphs.graphs = {(64, True): "runs", (64, False): "base"}
    graphs.per_token_graphs = {64: "per-token"}
    one_row_each = np.arange(60)
    four_rows_each = np.repeat(np.arange(15), 4)
    assert graphs._graph_for(64, True, one_row_each) == "per-token"
    assert graphs._graph_for(64, True, four_rows_each) == "runs"
    assert graphs._graph_for(64, False, one_row_each) == "base"
    assert cg.PER_TOKEN_MAX_MEAN_RUN == 2


def _controlled_params():
    """Greedy requests with a forcing bias, a banning bias, a JSON schema, and none."""
    from loquetier import StructuredOutputsParams
    schema = {"type": "object", "additionalProperties": False, "required": ["ok", "n"],
              "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99}}}
    return [SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logit_bias={77: 100.0}),
            SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logit_bias={b: -100.0 for b in range(40)}),
            SamplingParams(max_tokens=40, temperature=0, structured_outputs=StructuredOutputsParams(json=schema)),
            SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)]


def _check_controlled(outs):
    import json
    assert outs[0].token_ids == [77] * 10
    assert min(outs[1].token_ids) >= 40
    assert outs[2].finish_reason == "stop" and set(json.loads(outs[2].text)) == {"ok", "n"}


def test_bias_and_grammar_on_the_decode_graph_path(tmp_path):
    """Decode graphs return logits and the sampler runs outside them: with the captured forward run
    eagerly (the CPU stand-in for a replay), logit_bias and grammars give the eager engine's outputs,
    with asynchronous scheduling on."""
    from helpers import write_model_with_tokenizer
    write_model_with_tokenizer(tmp_path, "llama")
    prompts, params = ["Hello", "The answer", "A pet:", "Hi"], _controlled_params()
    eager = LLM(str(tmp_path), block_size=4, num_kv_blocks=256).generate(prompts, params)
    llm = LLM(str(tmp_path), block_size=4, num_kv_blocks=256)
    eng = llm.engine
    graphs = DecodeGraphs(eng.model, eng.kv.scratch_block, eng.kv.block_size, -(-eng.max_model_len // eng.kv.block_size),
                          8, eng.device, max_segments=eng.config.lora.max_loras + 2, resolve_ids=eng.runner.resolve_ids)
    replays = []
    graphs.run = lambda *a, **kw: replays.append(len(a[0])) or graphs.run_eager(*a, **kw)
    eng.runner.graphs = graphs
    outs = llm.generate(prompts, params)
    assert replays and max(replays) == 4
    assert [o.token_ids for o in outs] == [o.token_ids for o in eager]
    _check_controlled(outs)


@needs_gpu
def test_bias_and_grammar_with_captured_graphs_on_gpu(tmp_path):
    from helpers import write_model_with_tokenizer
    write_model_with_tokenizer(tmp_path, "llama")
    llm = LLM(str(tmp_path), block_size=4, num_kv_blocks=256, device="cuda")
    graphs = llm.engine.runner.graphs
    assert graphs is not None
    replays = []
    real_run = graphs.run
    graphs.run = lambda *a, **kw: replays.append(len(a[0])) or real_run(*a, **kw)
    outs = llm.generate(["Hello", "The answer", "A pet:", "Hi"], _controlled_params())
    assert replays and max(replays) == 4
    _check_controlled(outs)


def test_collector_is_paused_during_capture_and_restored():
    """Captures run with the cyclic collector off (a collection inside one could free CUDA
    resources and invalidate it); afterwards it is back as it was, also after an error, and a
    collector the caller had turned off stays off."""
    import gc

    from loquetier.engine.graph_capture import collector_paused
    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError):
        with collector_paused():
            raise RuntimeError("capture failed")
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
