"""Tensor parallelism: 2 and 4 gloo processes on the CPU give the single-process engine's logits,
generations, LoRA gradients and fine-tuned adapters (fp32)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_adapter, write_model_with_tokenizer, write_prompt_completion
from safetensors.torch import load_file

from loquetier import LLM, SamplingParams
from loquetier.engine.batch import LossSegment, ScheduledSeq, plan_mixed_batch
from loquetier.engine.sequence import Sequence
from loquetier.errors import ModelLoadError
from loquetier.lora.adapter import LoraSpec, load_peft_adapter
from loquetier.models.config import ModelArgs
from loquetier.parallel.plan import decode_from_parts, decode_parts, host_batch_from_parts, host_batch_parts, pack, unpack
from loquetier.parallel.sharding import shard_args
from loquetier.training.spec import TrainSpec
from loquetier.training.trainer import Trainer

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# 8 heads, 4 KV heads, intermediate 128, vocab 384: every split of the model divides by 4
SHAPE = dict(num_attention_heads=8, num_key_value_heads=4, head_dim=8)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], list(range(40, 61)), [3, 4, 5, 6]]
ADAPTERS = ["a", None, "b", "a"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    hf = write_model_with_tokenizer(root / "base", "llama", **SHAPE)
    write_adapter(hf, root / "a", 8, ALL, seed=1)
    write_adapter(hf, root / "b", 4, ["q_proj", "o_proj", "down_proj"], seed=2)
    write_prompt_completion(root / "data.jsonl", 8, seed=1)
    return root


def make_llm(root, tp, fold="auto"):
    llm = LLM(str(root / "base"), max_loras=4, max_lora_rank=8, num_kv_blocks=128, block_size=4,
              lora_fold_shrink=fold, tensor_parallel_size=tp)
    llm.load_adapter("a", root / "a")
    llm.load_adapter("b", root / "b")
    return llm


# the folded path (the row-parallel shrink rides in the output's all-reduce) at size 2, the
# unfolded one (shrink summed on its own) at size 4
FOLD = {2: "always", 4: "never"}


@pytest.fixture(scope="module", params=[2, 4])
def pair(request, root):
    """(engine split over `size` processes, the same engine in one process)."""
    size = request.param
    one, split = make_llm(root, 1, FOLD[size]), make_llm(root, size, FOLD[size])
    yield size, split, one
    split.close()


def step_logits(llm, steps=4, adapters=ADAPTERS):
    """Logits of a prefill step of every prompt (with adapters), then of decode steps."""
    eng = llm.engine
    for p, a in zip(PROMPTS, adapters):
        eng.add_request(p, SamplingParams(max_tokens=steps + 1, temperature=0), a)
    out = []
    for _ in range(steps):
        eng.step(keep_logits=True)
        out.append(eng.last_result.logits.clone())
    while eng.has_unfinished():
        eng.step()
    return out


def test_logits_and_generations_match_one_process(pair):
    size, split, one = pair
    for got, want in zip(step_logits(split), step_logits(one)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # greedy, asynchronous scheduling on, and one request with a penalty (a synchronous step)
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)] * 3 + \
        [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, repetition_penalty=1.3)]
    got = [o.token_ids for o in split.generate(PROMPTS, params, ADAPTERS)]
    assert got == [o.token_ids for o in one.generate(PROMPTS, params, ADAPTERS)]
    assert all(len(t) == 12 for t in got)
    assert split.engine.kv.allocator.num_free == split.engine.kv.num_blocks


def loss_segments(adapter):
    """Two training examples (weights as a job gives them, dropout seeds) and an evaluation one."""
    ids = [list(range(20, 33)), list(range(50, 58))]
    segs = [LossSegment(x, x[1:] + [-100], adapter, True, weight=w, dropout_seed=7 + i)
            for i, (x, w) in enumerate(zip(ids, [0.5, 0.25]))]
    return segs + [LossSegment(list(range(70, 76)), list(range(71, 76)) + [-100], adapter, False)]


def grads(state):
    state.gather_grads()
    out = [t.clone() for _, pair in sorted(state.module_views(state.grad).items()) for t in pair]
    state.zero_grad()
    return out


def train_grads(llm, name, dropout):
    """The trained adapter's gradients (PEFT-shaped, by layer and module) from a mixed step (with
    inference rows) and from a training-only step."""
    eng = llm.engine
    weights = load_peft_adapter(Path(eng.config.model).parent / "a", eng.args, 8)
    weights.spec.lora_dropout = dropout
    eng.add_adapter(name, weights)
    state = eng.adapters.make_trainable(name)
    for p, a in zip(PROMPTS[:2], ["b", None]):
        eng.add_request(p, SamplingParams(max_tokens=2, temperature=0), a)
    eng.step(loss_segments=loss_segments(name))
    sums = eng.last_result.loss_sums.clone()
    mixed = grads(state)
    while eng.has_unfinished():
        eng.step()
    slot = eng.adapters.activate({name})[name]
    eng.runner.execute_bucketed(plan_mixed_batch(loss_segments(name)[:2], [], {None: -1, name: slot},
                                              eng.kv.block_size, eng.adapters.dropout))
    only = grads(state)
    eng.adapters.freeze(name)
    eng.unload_adapter(name)
    return sums, mixed, only


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_lora_gradients_match_one_process(pair, dropout):
    size, split, one = pair
    name = f"t{dropout}"
    got_sums, got_mixed, got_only = train_grads(split, name, dropout)
    want_sums, want_mixed, want_only = train_grads(one, name, dropout)
    torch.testing.assert_close(got_sums, want_sums, rtol=1e-5, atol=1e-5)
    assert len(got_mixed) == len(want_mixed) == 2 * 7 * 2
    for got, want in zip(got_mixed + got_only, want_mixed + want_only):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert all(w.abs().max() > 0 for w in want_only + want_mixed)


@pytest.mark.parametrize("pair", [2], indirect=True)   # size 4's gradients are checked above
def test_finetune_job_saves_the_same_adapter(pair, tmp_path):
    """A job trained while serving (mixed steps and training-only steps, accumulation, clipping,
    checkpoints) saves the adapter the one-process engine saves, as an ordinary PEFT adapter."""
    size, split, one = pair

    def run(llm, out):
        trainer = Trainer(llm.engine)
        spec = TrainSpec(name="ft", train_file=str(Path(llm.engine.config.model).parent / "data.jsonl"),
                         output_dir=str(out), lora=LoraSpec(r=4, lora_alpha=8, target_modules="all-linear"),
                         epochs=2, micro_batch_size=2, grad_accum=2, learning_rate=5e-3, max_grad_norm=0.5,
                         checkpoint_interval=2, seed=3)
        job = trainer.submit(spec)
        for p, a in zip(PROMPTS, ADAPTERS):
            llm.engine.add_request(p, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), a)
        trainer.run()
        served = [o.token_ids for o in llm.generate(PROMPTS[:2], SamplingParams(max_tokens=6, temperature=0,
                                                                                ignore_eos=True), ["ft", "ft:step-2"])]
        llm.engine.participant = None
        for name in llm.engine.adapter_names():
            if name.startswith("ft"):
                llm.engine.unload_adapter(name)
        return job, served

    job_split, served_split = run(split, tmp_path / "split")
    job_one, served_one = run(one, tmp_path / "one")
    assert job_split.status.value == job_one.status.value == "succeeded" and job_split.step == 4
    assert [l for _, l in job_split.losses] == pytest.approx([l for _, l in job_one.losses], rel=1e-5)
    for ckpt in ("checkpoint-2", "checkpoint-4"):
        got, want = (load_file(str(tmp_path / d / ckpt / "adapter_model.safetensors")) for d in ("split", "one"))
        assert got.keys() == want.keys() and len(got) == 2 * 7 * 2
        for k in want:
            assert got[k].shape == want[k].shape
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=2e-4)   # as the test against PEFT: AdamW scales up rounding in tiny gradients
        # the optimizer state is laid out as on one device too (a job resumes at any split)
        got, want = (load_file(str(tmp_path / d / ckpt / "optimizer.safetensors")) for d in ("split", "one"))
        assert got.keys() == want.keys() and len(got) > 0
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-3, atol=1e-7)
    # the split engine serves its checkpoint as the one-process engine serves that checkpoint's file
    one.load_adapter("saved", tmp_path / "split" / "checkpoint-2")
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    assert served_split[1] == [o.token_ids for o in one.generate(PROMPTS[1:2], params, "saved")][0]
    one.unload_adapter("saved")


def test_step_plan_round_trip():
    """A step's `HostBatch` survives the trip to a worker: every field, and its device batch."""
    from loquetier.kernels.lora_dropout import SlotDropout
    seqs = [Sequence([5, 6, 7, 8], SamplingParams(), "x"), Sequence([1, 2], SamplingParams(), None)]
    for s in seqs:
        s.block_table = [3, 4]
    seqs[1].num_computed_tokens = 1
    dropout = SlotDropout(4, torch.device("cpu"))
    dropout.set(2, 0.1)
    host = plan_mixed_batch(loss_segments("x"), [ScheduledSeq(seqs[0], 0, 4), ScheduledSeq(seqs[1], 1, 1)],
                            {None: -1, "x": 2}, 4, dropout)
    back = host_batch_from_parts(unpack(pack(host_batch_parts(host))), dropout.table)
    for field in ("flat", "seg_cu", "seg_slot", "lora_seg_cu", "lora_seg_slot", "context_lens"):
        np.testing.assert_array_equal(getattr(back, field), getattr(host, field))
    for field in ("sizes", "num_rows", "num_train_segments", "num_loss_segments", "num_prefills", "num_decodes", "num_sampled",
                  "train_slots", "any_dropout", "bucketed", "has_placeholders", "graph_key"):
        assert getattr(back, field) == getattr(host, field), field
    assert host.any_dropout and host.train_slots == (2,)
    assert [s.train for s in back.loss_segments] == [s.train for s in host.loss_segments]
    assert [s.completes for s in back.scheduled] == [s.completes for s in host.scheduled]
    a, b = host.to_device(torch.device("cpu")), back.to_device(torch.device("cpu"))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.loss_weights, b.loss_weights)
    assert torch.equal(a.ctx.lora.dropout_keys, b.ctx.lora.dropout_keys)
    assert torch.equal(a.ctx.attn.slot_mapping, b.ctx.attn.slot_mapping)
    assert (a.ctx.attn.loss_cu, a.ctx.attn.prefill_cu, a.ctx.attn.decode_start) == \
        (b.ctx.attn.loss_cu, b.ctx.attn.prefill_cu, b.ctx.attn.decode_start)
    assert a.ctx.lora.seg_cu_host == b.ctx.lora.seg_cu_host and len(b.sample_seqs) == len(a.sample_seqs)
    # a decode-graph step (CUDA only, so checked here as data)
    rows = [np.arange(i, i + 3) for i in range(5)]
    arrays, with_lora = decode_from_parts(unpack(pack(decode_parts((*rows, np.arange(12).reshape(3, 4)), True))))
    assert with_lora and all(np.array_equal(x, y) for x, y in zip(arrays, (*rows, np.arange(12).reshape(3, 4))))


def test_split_that_does_not_divide_the_model_is_refused():
    args = ModelArgs(family="llama", vocab_size=384, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=8, num_kv_heads=2, head_dim=8)
    assert shard_args(args, 2).num_kv_heads == 1 and shard_args(args, 2).intermediate_size == 64
    with pytest.raises(ModelLoadError, match="does not divide the model's key/value heads"):
        shard_args(args, 4)


def test_server_with_tensor_parallel_size_2(root, tmp_path):
    """`loquetier serve --tensor-parallel-size 2`: the official client gets the one-process answers."""
    from test_server_api import BASE, Server
    server = Server(root / "base", tmp_path / "data", tmp_path / "server.log", "--tensor-parallel-size", "2",
                    "--adapter", f"a={root / 'a'}")
    try:
        client = server.client(None)
        one = LLM(str(root / "base"), max_lora_rank=16, num_kv_blocks=256)
        one.load_adapter("a", root / "a")
        for model in (BASE, "a"):
            resp = client.completions.create(model=model, prompt=["Hello there", "12+7="], max_tokens=12, temperature=0)
            want = one.generate(["Hello there", "12+7="], SamplingParams(max_tokens=12, temperature=0),
                                None if model == BASE else model)
            assert [c.text for c in sorted(resp.choices, key=lambda c: c.index)] == [o.text for o in want]
        stream = client.completions.create(model="a", prompt="Once", max_tokens=8, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in stream if c.choices) == \
            one.generate("Once", SamplingParams(max_tokens=8, temperature=0), "a")[0].text
    finally:
        server.stop()
    assert "Traceback" not in server.tail(), server.tail()

