"""The captured decode forward (adapter-sorted rows, fixed-size padded segments, scratch KV block),
run eagerly with the Triton kernels (interpreted on the CPU), equals the engine's eager decode step."""

import pytest
import torch

pytest.importorskip("triton")

from helpers import write_adapter, write_checkpoint  # noqa: E402

from loquetier import LLM, SamplingParams  # noqa: E402
from loquetier.engine.cuda_graphs import SEGMENT_MIN_BATCH, DecodeGraphs  # noqa: E402


@pytest.mark.parametrize("fold", ["never", "always"])
@pytest.mark.parametrize("batch", [5, SEGMENT_MIN_BATCH + 3])
def test_decode_graph_forward_matches_eager_step(tmp_path, batch, fold):
    hf = write_checkpoint(tmp_path / "base", "llama")
    for i, (r, targets) in enumerate([(4, ["q_proj", "v_proj"]), (8, ["o_proj", "down_proj", "gate_proj"])]):
        write_adapter(hf, tmp_path / f"a{i}", r, targets, seed=i)
    llm = LLM(str(tmp_path / "base"), max_loras=4, max_lora_rank=8, block_size=4, num_kv_blocks=512,
              max_model_len=128)
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
    try:
        got = graphs.run_eager(*arrays, with_lora=True)
    finally:
        for vl in layers:
            vl.backend = "auto"
    # the engine's eager step for the same sequences (reference kernels, reference attention,
    # shrink not folded into the base GEMM)
    eng.model.set_lora_fold_shrink("never")
    eng.step(keep_logits=True)
    ref = {id(s): row for s, row in zip(eng.last_sample_seqs, eng.last_result.logits)}
    for s, row in zip(seqs, got):
        torch.testing.assert_close(row, ref[id(s)], rtol=1e-4, atol=1e-4)
