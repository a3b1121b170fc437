"""Fine-tuning inside the engine, against a plain transformers + PEFT + AdamW loop."""

import copy
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    forward_all,
    write_adapter,
    write_model_with_tokenizer,
    write_prompt_completion,
)
from safetensors.torch import load_file

from loquetier import LLM, SamplingParams
from loquetier.engine.batch import IGNORE_INDEX
from loquetier.lora.adapter import LoraSpec, new_adapter
from loquetier.training.job import lr_lambda
from loquetier.training.spec import TrainSpec
from loquetier.training.trainer import Trainer

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    hf = write_model_with_tokenizer(root / "base", "llama")
    write_adapter(hf, root / "other", 4, ["q_proj", "o_proj"], seed=5)
    write_prompt_completion(root / "data.jsonl", 10, seed=1)
    write_prompt_completion(root / "data2.jsonl", 7, seed=2)
    return root, hf


def spec_for(root, out, name="ft", data="data.jsonl", **kw):
    base = dict(name=name, train_file=str(root / data), output_dir=str(out),
                lora=LoraSpec(r=4, lora_alpha=8, target_modules=TARGETS), epochs=2, micro_batch_size=2,
                grad_accum=2, learning_rate=5e-3, warmup_steps=1, lr_schedule="cosine", weight_decay=0.01,
                max_grad_norm=0.5, seed=3)
    base.update(kw)
    return TrainSpec(**base)


def reference_training(hf, spec: TrainSpec, examples, max_rank=16, windows=None):
    """The same run with PEFT + torch.optim.AdamW, written the way a PEFT user would. `windows`
    (per epoch, each optimizer step's example indices) replaces the shuffled micro-batch windows."""
    from peft import LoraConfig, get_peft_model

    from loquetier.models.config import ModelArgs
    model = get_peft_model(copy.deepcopy(hf), LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.lora_alpha,
                                                         target_modules=TARGETS, lora_dropout=0.0))
    init = new_adapter(spec.lora, ModelArgs.from_hf_config(hf.config.to_dict()), max_rank, spec.seed)
    named = dict(model.named_parameters())
    params = []
    for (layer, module), (a, b) in sorted(init.modules.items()):
        group = "self_attn" if module in ("q_proj", "v_proj") else "mlp"
        pa = named[f"base_model.model.model.layers.{layer}.{group}.{module}.lora_A.default.weight"]
        pb = named[f"base_model.model.model.layers.{layer}.{group}.{module}.lora_B.default.weight"]
        with torch.no_grad():
            pa.copy_(a)
            pb.copy_(b)
        params += [pa, pb]
    opt = torch.optim.AdamW(params, lr=spec.learning_rate, betas=spec.betas, eps=spec.eps,
                            weight_decay=spec.weight_decay)
    if windows is None:
        window = spec.micro_batch_size * spec.grad_accum
        orders = [torch.randperm(len(examples), generator=torch.Generator().manual_seed(spec.seed + e)).tolist()
                  for e in range(spec.epochs)]
        windows = [[order[w:w + window] for w in range(0, len(order), window)] for order in orders]
    total = sum(len(w) for w in windows)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(spec, total))
    losses = []
    for epoch_windows in windows:
        for chosen in epoch_windows:
            n_tokens = sum(sum(l != IGNORE_INDEX for l in examples[i].labels[1:]) for i in chosen)
            step_loss = 0.0
            for i in chosen:  # micro-batches only regroup the same per-token sum
                ex = examples[i]
                logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0, :-1]
                loss = torch.nn.functional.cross_entropy(logits, torch.tensor(ex.labels[1:]), reduction="sum",
                                                         ignore_index=IGNORE_INDEX) / n_tokens
                loss.backward()
                step_loss += loss.item()
            torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad()
            losses.append(step_loss)
    return model, losses


def lora_tensors(path):
    return {k: v for k, v in load_file(str(Path(path) / "adapter_model.safetensors")).items()}


def peft_state_matches(peft_model, adapter_dir, tol):
    ours = lora_tensors(adapter_dir)
    checked = 0
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            key = name.replace(".default", "")
            torch.testing.assert_close(ours[key], p.detach(), rtol=tol, atol=tol)
            checked += 1
    assert checked == len(ours) > 0


def test_job_matches_peft_while_serving(model_dir, tmp_path):
    root, hf = model_dir
    llm = LLM(str(root / "base"), max_loras=4, max_lora_rank=16, num_kv_blocks=256, block_size=4)
    llm.load_adapter("other", root / "other")
    serving = [("other", [5, 6, 7, 8]), (None, [9, 10, 11]), ("other", list(range(20, 40)))]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    expected = [o.token_ids for o in llm.generate([p for _, p in serving], params, [a for a, _ in serving])]

    trainer = Trainer(llm.engine)
    spec = spec_for(root, tmp_path / "out")
    job = trainer.submit(spec)
    for a, p in serving:  # inference requests share the same steps as training
        llm.engine.add_request(p, params, a)
    got = {}
    steps_with_both = 0
    while trainer.has_work() or llm.engine.has_unfinished():
        had_inference = bool(llm.engine.scheduler.running or llm.engine.scheduler.waiting)
        before = job.trained_tokens
        for out in llm.engine.step():
            if out.finished:
                got[out.request_id] = out.token_ids
        steps_with_both += had_inference and job.trained_tokens > before
    assert steps_with_both > 0
    assert [got[k] for k in sorted(got, key=lambda r: int(r.split("-")[1]))] == expected
    assert job.status.value == "succeeded" and job.step == 6

    ref_model, ref_losses = reference_training(hf, spec, trainer.load_data(spec)[0])
    # fp32; the base GEMMs run over a different number of rows than PEFT's, so allow rounding drift
    assert [round(l, 4) for _, l in job.losses] == pytest.approx([round(l, 4) for l in ref_losses], rel=1e-4, abs=2e-4)
    peft_state_matches(ref_model, tmp_path / "out" / "checkpoint-6", tol=2e-4)
    # the fine-tuned adapter is served under its name right away
    prompt = list(range(30, 50))
    ours = forward_all(llm.engine, [prompt], ["ft"])[0]
    ref = ref_model(input_ids=torch.tensor([prompt])).logits[0]
    assert (ours - ref).abs().max().item() < 1e-3


def test_packed_job_matches_unpacked_peft(model_dir, tmp_path):
    """Token-budget micro-batches: the examples of each window are packed first-fit (no padding,
    no attention across examples) and, beside traffic, split over several steps; the losses and
    the adapter equal an unpacked PEFT + AdamW loop over the same windows, one example at a time."""
    root, hf = model_dir
    llm = LLM(str(root / "base"), max_loras=4, max_lora_rank=16, num_kv_blocks=256, block_size=4,
              max_num_batched_tokens=32)
    llm.load_adapter("other", root / "other")
    trainer = Trainer(llm.engine)
    spec = spec_for(root, tmp_path / "out", data="data2.jsonl", micro_batch_tokens=40, grad_accum=2, epochs=3)
    job = trainer.submit(spec)
    lengths = job.train_data.lengths
    for epoch in range(spec.epochs):
        plan = job.epoch_plan(epoch)
        assert sorted(i for mb in plan for i in mb.tolist()) == list(range(len(lengths)))
        assert all(lengths[mb].sum() <= 40 or len(mb) == 1 for mb in plan)
    windows = [[[i for mb in w for i in mb.tolist()] for w in job.windows(e)] for e in range(spec.epochs)]
    assert job.total_steps == sum(len(w) for w in windows)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    for i in range(6):   # traffic throughout: training rides beside it in what the budget leaves
        llm.engine.add_request(list(range(5 + i, 25 + i)), params, "other" if i % 2 else None)
    trainer.run()
    assert job.status.value == "succeeded"
    ref_model, ref_losses = reference_training(hf, spec, trainer.load_data(spec)[0], windows=windows)
    assert [l for _, l in job.losses] == pytest.approx(ref_losses, rel=2e-4, abs=2e-4)
    peft_state_matches(ref_model, tmp_path / "out" / f"checkpoint-{job.total_steps}", tol=2e-4)


def test_bucketed_training_step_equals_unpadded(model_dir):
    """A training step padded to bucket sizes (what CUDA graphs replay) gives the same losses and
    gradients as the same examples unpadded: padding tokens carry no adapter, loss or weight."""
    from loquetier.engine.batch import LossSegment, plan_mixed_batch
    root, _ = model_dir
    llm = LLM(str(root / "base"), max_loras=4, max_lora_rank=16, num_kv_blocks=64)
    eng = llm.engine
    eng.add_adapter("t", new_adapter(LoraSpec(r=4, lora_alpha=8, lora_dropout=0.2, target_modules="all-linear",
                                              init_lora_weights="gaussian"), eng.args, 16, 0))
    state = eng.adapters.make_trainable("t")
    # a second job that has no tokens in this step: a bucketed step runs its backward too (so that the
    # graph key does not depend on which jobs share a step), which must add nothing to its gradients
    eng.add_adapter("u", new_adapter(LoraSpec(r=8, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear",
                                              init_lora_weights="gaussian"), eng.args, 16, 1))
    other = eng.adapters.make_trainable("u")
    g = torch.Generator().manual_seed(0)
    segs = [LossSegment(ids, ids[1:] + [IGNORE_INDEX], "t", True, weight=0.1 * (i + 1), dropout_seed=i)
            for i, ids in enumerate(torch.randint(3, 250, (n,), generator=g).tolist() for n in (13, 40, 7))]
    slot_of = {None: -1, "t": eng.adapters.get("t").slot, "u": eng.adapters.get("u").slot}
    results, keys = [], []
    for bucketed, training_slots in ((False, ()), (True, ()), (True, eng.adapters.training_slots())):
        host = plan_mixed_batch(segs, [], slot_of, eng.kv.block_size, eng.adapters.dropout, bucketed=bucketed,
                                training_slots=training_slots)
        state.zero_grad()
        other.zero_grad()
        res = eng.runner.execute(host.to_device(eng.device))
        results.append((res.loss_sums[:3].clone(), state.grad.clone()))
        keys.append(host.graph_key)
        assert not other.grad.any()
    assert host.seg_cu[-1] == 64 and host.num_loss_segments == 8
    assert host.train_slots == tuple(sorted(slot_of[n] for n in "tu")) and keys[2] != keys[1]
    for res in results[1:]:
        torch.testing.assert_close(res[0], results[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(res[1], results[0][1], rtol=1e-5, atol=1e-6)
    assert results[0][1].abs().sum() > 0


def test_two_concurrent_jobs_match_solo_runs(model_dir, tmp_path):
    root, _ = model_dir

    def run(specs):
        llm = LLM(str(root / "base"), max_loras=4, max_lora_rank=16, num_kv_blocks=64)
        trainer = Trainer(llm.engine)
        jobs = [trainer.submit(s) for s in specs]
        trainer.run()
        return [j.losses for j in jobs]

    a = spec_for(root, tmp_path / "a", "ja")
    b = spec_for(root, tmp_path / "b", "jb", data="data2.jsonl", seed=9, learning_rate=1e-2, grad_accum=1)
    both = run([a, b])
    solo_a = run([spec_for(root, tmp_path / "a1", "ja")])[0]
    solo_b = run([spec_for(root, tmp_path / "b1", "jb", data="data2.jsonl", seed=9, learning_rate=1e-2,
                           grad_accum=1)])[0]
    assert [s for s, _ in both[0]] == [s for s, _ in solo_a]
    assert [l for _, l in both[0]] == pytest.approx([l for _, l in solo_a], rel=1e-5)
    assert [l for _, l in both[1]] == pytest.approx([l for _, l in solo_b], rel=1e-5)
    for x, y in [("a", "a1"), ("b", "b1")]:
        t1, t2 = lora_tensors(tmp_path / x / "checkpoint-6" if x == "a" else _last(tmp_path / x)), \
            lora_tensors(tmp_path / y / "checkpoint-6" if y == "a1" else _last(tmp_path / y))
        for k in t1:
            torch.testing.assert_close(t1[k], t2[k], rtol=1e-5, atol=1e-6)


def _last(d):
    from loquetier.training.checkpoint import latest_checkpoint
    return latest_checkpoint(Path(d))


def test_checkpoint_served_by_name_equals_peft_load(model_dir, tmp_path):
    root, hf = model_dir
    from peft import PeftModel
    llm = LLM(str(root / "base"), max_loras=4, max_lora_rank=16, num_kv_blocks=64)
    trainer = Trainer(llm.engine)
    job = trainer.submit(spec_for(root, tmp_path / "out", checkpoint_interval=2))
    trainer.run(max_steps=8)  # 4 micro-batches = 2 optimizer steps -> checkpoint-2
    assert "ft:step-2" in llm.engine.adapters and job.status.value == "running"
    ref = PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "out" / "checkpoint-2").eval()
    prompt = list(range(40, 60))
    ours = forward_all(llm.engine, [prompt], ["ft:step-2"])[0]
    assert (ours - ref(input_ids=torch.tensor([prompt])).logits[0]).abs().max().item() <= 1e-4
    trainer.cancel(job.id)
    assert job.status.value == "cancelled" and "ft@train" not in llm.engine.adapters
    assert all(owner != "ft@train" for owner in llm.engine.adapters.slot_owner)


def test_pause_resume_and_eval(model_dir, tmp_path):
    root, _ = model_dir
    llm = LLM(str(root / "base"), max_loras=4, max_lora_rank=16, num_kv_blocks=64)
    trainer = Trainer(llm.engine)
    job = trainer.submit(spec_for(root, tmp_path / "out", eval_split=0.3, eval_interval=1))
    trainer.run(max_steps=2)
    trainer.pause(job.id)
    step = job.step
    for _ in range(5):
        llm.engine.step()
    assert job.step == step and not trainer.has_work()
    trainer.resume(job.id)
    trainer.run()
    assert job.status.value == "succeeded"
    assert len(job.eval_losses) == job.total_steps and all(math.isfinite(l) for _, l in job.eval_losses)


SCRIPT = """
import sys
from loquetier import LLM
from loquetier.lora.adapter import LoraSpec
from loquetier.training.spec import TrainSpec
from loquetier.training.trainer import Trainer
root, out = sys.argv[1], sys.argv[2]
llm = LLM(root + "/base", max_loras=2, max_lora_rank=8, max_cpu_loras=4, num_kv_blocks=16)
trainer = Trainer(llm.engine)
spec = TrainSpec(name="k", train_file=root + "/data.jsonl", output_dir=out, epochs=8, micro_batch_size=1,
                 grad_accum=1, learning_rate=1e-3, checkpoint_interval=3, seed=4,
                 lora=LoraSpec(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear"))
job = trainer.submit(spec)
trainer.run()
print("done", job.step, job.status.value, job.error)
"""


def test_kill_and_resume_is_bit_identical(model_dir, tmp_path):
    root, _ = model_dir
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # uninterrupted run
    subprocess.run([sys.executable, str(script), str(root), str(tmp_path / "full")], check=True, env=env,
                   capture_output=True, timeout=600)
    # killed run: SIGKILL once a few checkpoints exist, then restart
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(root), str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (out / "checkpoint-9").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoint-80").exists(), "the job finished before it could be killed"
    res = subprocess.run([sys.executable, str(script), str(root), str(out)], check=True, env=env,
                         capture_output=True, text=True, timeout=600)
    assert "done 80 succeeded" in res.stdout, res.stdout + res.stderr[-2000:]
    a, b = lora_tensors(tmp_path / "full" / "checkpoint-80"), lora_tensors(out / "checkpoint-80")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    import json
    la = json.loads((tmp_path / "full" / "checkpoint-80" / "trainer_state.json").read_text())["losses"]
    lb = json.loads((out / "checkpoint-80" / "trainer_state.json").read_text())["losses"]
    assert la == lb


def test_bf16_engine_steps_fp32_master_weights(model_dir, tmp_path):
    """Updates far below bf16's resolution still accumulate (in the fp32 masters), and they follow
    the same run in an fp32 engine; the bf16 slot table holds the rounded masters."""
    root, _ = model_dir

    def run(dtype, out):
        llm = LLM(str(root / "base"), max_loras=2, max_lora_rank=16, num_kv_blocks=64, dtype=dtype)
        trainer = Trainer(llm.engine)
        job = trainer.submit(spec_for(root, out, learning_rate=1e-6, max_grad_norm=0.0, weight_decay=0.0))
        start = job.state.master.detach().clone()
        trainer.run(max_steps=8)   # 4 optimizer steps; the job (and its slot) are still live
        assert job.step == 4
        return job.state.master.detach() - start, job

    flat32, _ = run("float32", tmp_path / "f32")
    flat16, job16 = run("bfloat16", tmp_path / "bf16")
    assert job16.state.master.dtype == torch.float32
    assert job16.state.stage.dtype == torch.bfloat16 and job16.state.master is not job16.state.stage
    assert flat32.abs().max() < 1e-4                 # far below bf16 steps for weights of this size
    assert flat16.abs().max() > 0
    assert ((flat16 - flat32).norm() / flat32.norm()).item() < 0.1


def test_shutdown_checkpoint_mid_window_resumes_bit_identical(model_dir, tmp_path):
    """A graceful shutdown saves the last finished optimizer step while a window is half accumulated:
    the resumed run re-runs that window and ends with the uninterrupted run's weights and losses
    (with LoRA dropout, whose masks are keyed by step and example)."""
    root, _ = model_dir
    llm = LLM(str(root / "base"), max_loras=4, max_lora_rank=16, num_kv_blocks=64)
    trainer = Trainer(llm.engine)
    lora = LoraSpec(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS)
    full = trainer.submit(spec_for(root, tmp_path / "full", "full", lora=lora))
    trainer.run()
    cut = trainer.submit(spec_for(root, tmp_path / "cut", "cut", lora=lora))
    for _ in range(10):   # windows of 2, 2 and 1 micro-batches per epoch: stop inside step 2's window
        if cut.step == 1 and cut.pending:
            break
        llm.engine.step()
    assert cut.step == 1 and len(cut.pending) == 1
    assert cut.save_resume_point().name == "checkpoint-1" and cut.save_resume_point() is None
    trainer.cancel(cut.id)                                # the process exits here
    resumed = trainer.submit(spec_for(root, tmp_path / "cut", "cut", lora=lora))
    assert resumed.step == 1
    trainer.run()
    assert resumed.status.value == "succeeded" and resumed.losses == full.losses
    a, b = lora_tensors(tmp_path / "full" / "checkpoint-6"), lora_tensors(tmp_path / "cut" / "checkpoint-6")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bucketed_mixed_step_equals_unpadded(model_dir):
    """Training rows beside decode rows, padded to bucket sizes (decode padding rows in the scratch
    KV block, what mixed-step graphs replay): the same losses, gradients and decode logits as the
    same step unpadded."""
    from loquetier.engine.batch import DecodePadding, LossSegment, ScheduledSeq, plan_mixed_batch
    root, _ = model_dir
    llm = LLM(str(root / "base"), max_loras=4, max_lora_rank=16, num_kv_blocks=64, async_scheduling=False)
    eng = llm.engine
    llm.load_adapter("other", root / "other")
    eng.add_adapter("t", new_adapter(LoraSpec(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear",
                                              init_lora_weights="gaussian"), eng.args, 16, 0))
    state = eng.adapters.make_trainable("t")
    for i, adapter in enumerate(["other", None, "t"]):
        eng.add_request(list(range(5 + i, 17 + 2 * i)), SamplingParams(max_tokens=8, temperature=0), adapter)
    while any(not s.output_token_ids for s in eng.scheduler.running) or eng.scheduler.waiting:
        eng.step()
    decodes = [ScheduledSeq(s, s.num_tokens - 1, 1) for s in eng.scheduler.running]
    g = torch.Generator().manual_seed(1)
    segs = [LossSegment(ids, ids[1:] + [IGNORE_INDEX], "t", True, weight=0.05, dropout_seed=i)
            for i, ids in enumerate(torch.randint(3, 250, (n,), generator=g).tolist() for n in (11, 30))]
    slot_of = {None: -1, **eng.adapters.activate({"t", "other"})}
    padding = DecodePadding((1, 2, 4, 8), -(-eng.max_model_len // eng.kv.block_size), eng.kv.scratch_block, 6)
    results = []
    for bucketed in (False, True):
        host = plan_mixed_batch(segs, decodes, slot_of, eng.kv.block_size, eng.adapters.dropout,
                                bucketed=bucketed, decode_padding=padding)
        state.zero_grad()
        batch = host.to_device(eng.device)
        res = eng.runner.execute(batch, keep_logits=True)
        results.append((res.loss_sums[:2].clone(), state.grad.clone(), res.logits[:len(decodes)].clone(),
                        res.sampled.tokens.clone()))
    assert host.num_rows == 4 and host.num_decodes == 4 and len(host.scheduled) == 3
    assert host.lora_seg_slot.tolist()[-6:].count(-1) >= 2    # the padding run and empty runs
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_checkpoints_are_written_while_the_engine_steps(model_dir, tmp_path, monkeypatch):
    """The engine thread does not wait for a checkpoint's files: steps go on and the adapter is
    served while they are written; the "checkpoint" event (what the server records) comes once
    they are on disk, and a write that fails fails the job, not the engine."""
    import threading

    from loquetier.training import checkpoint as ckpt
    root, _ = model_dir
    gate, real = threading.Event(), ckpt.save_checkpoint

    def slow_save(*args):
        assert gate.wait(30)
        return real(*args)
    monkeypatch.setattr(ckpt, "save_checkpoint", slow_save)
    llm = LLM(str(root / "base"), max_loras=4, max_lora_rank=16, num_kv_blocks=64)
    trainer = Trainer(llm.engine)
    job = trainer.submit(spec_for(root, tmp_path / "out", checkpoint_interval=1, epochs=3))
    while not job.checkpoints:
        llm.engine.step()
    step = job.step
    for _ in range(4):   # the writer is blocked: steps still run, and the checkpoint serves already
        llm.engine.step()
    assert job.step > step and f"ft:step-{step}" in llm.engine.adapters
    assert not [e for e in job.events if e.kind == "checkpoint"]
    assert not (tmp_path / "out" / f"checkpoint-{step}").exists()
    gate.set()
    job.wait_for_checkpoints()
    saved = [e.data["step"] for e in job.events if e.kind == "checkpoint"]
    assert saved == [s for s, _, _ in job.checkpoints] and saved[0] == step
    assert all((tmp_path / "out" / f"checkpoint-{s}" / "adapter_model.safetensors").is_file() for s in saved)

    def failing_save(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ckpt, "save_checkpoint", failing_save)
    while job.active:
        llm.engine.step()
    assert job.status.value == "failed" and "No space left on device" in job.error
    out = llm.generate([list(range(40, 50))], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True),
                       adapters=f"ft:step-{step}")[0]
    assert len(out.token_ids) == 3


def test_two_slots_of_different_ranks_in_one_step_equal_separate_steps(model_dir):
    """The backward of several trained slots runs in shared GEMMs (masked per row, padded to the
    largest rank): each slot's gradients equal those of a step holding only its own examples."""
    from loquetier.engine.batch import LossSegment, plan_mixed_batch
    root, _ = model_dir
    eng = LLM(str(root / "base"), max_loras=4, max_lora_rank=16, num_kv_blocks=64).engine
    states = {}
    for i, (name, r) in enumerate((("t", 4), ("u", 16))):
        eng.add_adapter(name, new_adapter(LoraSpec(r=r, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear",
                                                   init_lora_weights="gaussian"), eng.args, 16, i))
        states[name] = eng.adapters.make_trainable(name)
    g = torch.Generator().manual_seed(1)
    segs = [LossSegment(ids, ids[1:] + [IGNORE_INDEX], "tu"[i % 2], True, weight=0.05, dropout_seed=i)
            for i, ids in enumerate(torch.randint(3, 250, (n,), generator=g).tolist() for n in (13, 40, 7, 22, 9))]
    slot_of = {None: -1, **{n: eng.adapters.get(n).slot for n in "tu"}}

    def grads(segments):
        for st in states.values():
            st.zero_grad()
        eng.runner.execute(plan_mixed_batch(segments, [], slot_of, eng.kv.block_size, eng.adapters.dropout)
                           .to_device(eng.device))
        return {n: st.grad.clone() for n, st in states.items()}

    together = grads(segs)
    for name in "tu":
        alone = grads([s for s in segs if s.adapter == name])[name]
        assert alone.abs().sum() > 0
        torch.testing.assert_close(together[name], alone, rtol=1e-5, atol=1e-6)
