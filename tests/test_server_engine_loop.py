"""AsyncEngine in-process: outputs equal LLM.generate, a failing step fails only its requests,
aborts free KV blocks, and incremental detokenization holds back what may still change."""

import asyncio

import pytest
from helpers import write_model_with_tokenizer

from loquetier import LLM, SamplingParams
from loquetier.engine.engine import RequestOutput
from loquetier.errors import AdapterNotFoundError, RequestError
from loquetier.server.engine_loop import (
    AsyncEngine,
    EngineFailure,
    EngineUnavailable,
    GenerationRequest,
    IncrementalDetokenizer,
)
from loquetier.training.trainer import Trainer


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("loop")
    write_model_with_tokenizer(path, "llama")
    return LLM(str(path), num_kv_blocks=64, block_size=4)


def run(llm, body):
    """Run `body(aengine)` in a fresh event loop with the engine thread started."""
    async def main():
        aengine = AsyncEngine(llm.engine, Trainer(llm.engine))
        aengine.start()
        try:
            return await body(aengine)
        finally:
            aengine.stop()
            llm.engine.participant = None
    return asyncio.run(main())


PARAMS = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def test_outputs_match_llm_generate_and_groups_are_atomic(llm):
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], list(range(20, 40))]
    expected = [o.token_ids for o in llm.generate(prompts, PARAMS)]

    async def body(aengine):
        group = await aengine.add([GenerationRequest(p, PARAMS) for p in prompts])
        outs = await group.results()
        # a group with one bad member adds nothing at all
        with pytest.raises(RequestError):
            await aengine.add([GenerationRequest([1, 2], PARAMS), GenerationRequest([], PARAMS)])
        with pytest.raises(AdapterNotFoundError):
            await aengine.add([GenerationRequest([1, 2], PARAMS, "nope")])
        assert await aengine.call(lambda: len(aengine.engine.requests)) == 0
        return outs

    assert [o.token_ids for o in run(llm, body)] == expected


def failing_once(execute):
    """`execute` that raises on its first call only."""
    calls = {"n": 0}

    def flaky(batch, keep_logits=False):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected")
        return execute(batch, keep_logits)
    return flaky


def test_failing_step_fails_its_requests_and_the_loop_goes_on(llm):
    runner = llm.engine.runner
    real = runner.execute
    flaky = failing_once(real)

    async def body(aengine):
        runner.execute = flaky
        try:
            bad = await aengine.add([GenerationRequest([5, 6, 7], PARAMS)])
            with pytest.raises(EngineFailure, match="injected"):
                await bad.results()
            good = await aengine.add([GenerationRequest([5, 6, 7], PARAMS)])
            out = (await good.results())[0]
            free = await aengine.call(lambda: aengine.engine.kv.allocator.num_free)
            return out, free, aengine.alive
        finally:
            runner.execute = real

    out, free, alive = run(llm, body)
    assert alive and out.finished and len(out.token_ids) == 12
    assert free == llm.engine.kv.num_blocks


def test_close_aborts_and_frees_blocks(llm):
    long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)

    async def body(aengine):
        group = await aengine.add([GenerationRequest(list(range(10, 30)), long) for _ in range(3)])
        await group.next_outputs()
        group.close()
        for _ in range(100):
            used = await aengine.call(lambda: (len(aengine.engine.requests),
                                               aengine.engine.kv.num_blocks - aengine.engine.kv.allocator.num_free))
            if used == (0, 0):
                return used
            await asyncio.sleep(0.01)
        return used

    assert run(llm, body) == (0, 0)


class FakeTokenizer:
    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids)


def _out(ids, finished=False, text=""):
    return RequestOutput("r", [1], ids, text, finished)


def test_incremental_detokenizer_holds_back_partial_characters_and_stop_prefixes():
    tok = FakeTokenizer({0: "ab", 1: "\ufffd", 2: "é", 3: "X", 4: "Y"})
    d = IncrementalDetokenizer(tok)
    assert d.delta(_out([0])) == "ab"
    assert d.delta(_out([0, 1])) == ""            # an incomplete UTF-8 sequence waits
    assert d.delta(_out([0, 2])) == "é"           # (the real decode then yields the whole character)
    assert d.delta(_out([0, 2, 3], True, "abéX")) == "X"
    d = IncrementalDetokenizer(tok, stop=["XY"])
    assert d.delta(_out([0, 3])) == "ab"          # "X" may start the stop string
    assert d.delta(_out([0, 3, 4], True, "ab")) == ""   # it did: the engine cut the text there
    assert d.sent == "ab"


def test_failing_training_step_fails_the_job_not_the_loop(llm, tmp_path):
    from helpers import write_prompt_completion

    from loquetier.lora.adapter import LoraSpec
    from loquetier.training.spec import TrainSpec
    data = write_prompt_completion(tmp_path / "data.jsonl", 4)
    spec = TrainSpec(name="t", train_file=str(data), output_dir=str(tmp_path / "out"),
                     lora=LoraSpec(r=4, target_modules=["q_proj"]))
    runner = llm.engine.runner

    def boom(*args, **kwargs):
        raise RuntimeError("injected")

    async def body(aengine):
        # bucketed steps go through execute_bucketed, the others through execute
        runner.execute = runner.execute_bucketed = boom
        try:
            job = await aengine.call(aengine.trainer.submit, spec)
            for _ in range(500):
                if await aengine.call(lambda: job.status.value) == "failed":
                    break
                await asyncio.sleep(0.01)
        finally:
            del runner.execute, runner.execute_bucketed   # the class's methods again
        group = await aengine.add([GenerationRequest([5, 6, 7], PARAMS)])
        return job, (await group.results())[0], aengine.alive

    job, out, alive = run(llm, body)
    assert job.status.value == "failed" and "injected" in job.error
    assert alive and out.finished and len(out.token_ids) == 12


# ------------------------------------------------------------------------------------ fault isolation
def _training_spec(tmp_path, epochs=1):
    from helpers import write_prompt_completion

    from loquetier.lora.adapter import LoraSpec
    from loquetier.training.spec import TrainSpec
    data = write_prompt_completion(tmp_path / "data.jsonl", 8)
    return TrainSpec(name="t", train_file=str(data), output_dir=str(tmp_path / "out"), epochs=epochs,
                     micro_batch_size=1, lora=LoraSpec(r=4, target_modules=["q_proj"]))


async def _until(predicate, timeout=20.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def _clean_up(llm, jobs=()):
    """A fatal error leaves the engine as it was (the process would exit): reset it for the next test."""
    for job in jobs:
        job.cancel()
    for rid in list(llm.engine.requests):
        llm.engine.abort(rid)


def test_only_the_failed_steps_requests_fail(llm):
    prompts = [[5, 6, 7], [8, 9, 10, 11], list(range(20, 30)), list(range(40, 46))]
    expected = [o.token_ids for o in llm.generate(prompts, PARAMS)]
    runner, scheduler_config = llm.engine.runner, llm.engine.config.scheduler
    real, limit = runner.execute, scheduler_config.max_num_seqs
    flaky = failing_once(real)

    async def body(aengine):
        # two requests run at a time; the step that fails holds the first two only
        groups = await asyncio.gather(*(aengine.add([GenerationRequest(p, PARAMS)]) for p in prompts))
        return await asyncio.gather(*(g.results() for g in groups), return_exceptions=True)

    scheduler_config.max_num_seqs, runner.execute = 2, flaky
    try:
        results = run(llm, body)
    finally:
        scheduler_config.max_num_seqs, runner.execute = limit, real
    assert [type(r) for r in results[:2]] == [EngineFailure, EngineFailure]
    assert [r[0].token_ids for r in results[2:]] == expected[2:]


def test_a_request_that_finished_inside_a_failed_step_gets_an_error_not_a_hang(llm):
    engine = llm.engine
    short = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    state = {"finished": set(), "raised": False}

    def on_finish(st):
        if st.prompt_tokens == 3 and st.finish_reason == "length":
            state["finished"].add(st.request_id)

    def fail_once_after_it_finished(info):
        if state["finished"] and not state["raised"]:
            state["raised"] = True
            raise RuntimeError("injected after the request finished")

    async def body(aengine):
        other = await aengine.add([GenerationRequest(list(range(20, 30)), PARAMS)])
        group = await aengine.add([GenerationRequest([5, 6, 7], short)])
        with pytest.raises(EngineFailure, match="injected"):
            await asyncio.wait_for(group.results(), 10)   # its final output was lost with the step
        with pytest.raises(EngineFailure):   # it was in that step too
            await asyncio.wait_for(other.results(), 10)
        after = await aengine.add([GenerationRequest([5, 6, 7], PARAMS)])
        out = (await after.results())[0]
        free = await aengine.call(lambda: engine.kv.allocator.num_free)
        return out, free, aengine.alive

    engine.stats.listeners.append(on_finish)
    engine.step_observers.append(fail_once_after_it_finished)
    try:
        out, free, alive = run(llm, body)
    finally:
        engine.stats.listeners.remove(on_finish)
        engine.step_observers.remove(fail_once_after_it_finished)
    assert state["raised"] and alive and len(out.token_ids) == 12 and free == engine.kv.num_blocks


def test_out_of_memory_in_a_training_step_fails_the_job_alone(llm, tmp_path):
    import torch
    runner = llm.engine.runner
    real = runner.execute
    expected = llm.generate([[5, 6, 7]], PARAMS)[0].token_ids

    def oom_with_training(batch, keep_logits=False):   # steps that mix training and inference rows
        if batch.sample_seqs and any(seg.train for seg in batch.loss_segments):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(batch, keep_logits)

    async def body(aengine):
        job = await aengine.call(aengine.trainer.submit, _training_spec(tmp_path, epochs=50))
        await _until(lambda: job.step >= 1)          # training-only steps run fine
        group = await aengine.add([GenerationRequest([5, 6, 7], PARAMS)])   # now steps mix both
        out = (await group.results())[0]
        await _until(lambda: job.status.value != "running")
        return job, out, aengine.alive

    runner.execute = oom_with_training
    try:
        job, out, alive = run(llm, body)
    finally:
        runner.execute = real
    assert job.status.value == "failed" and "out of device memory" in job.error and "20.00 GiB" in job.error
    assert alive and out.token_ids == expected


def test_a_device_error_is_fatal_and_jobs_stay_resumable(llm, tmp_path):
    runner = llm.engine.runner
    jobs = []

    def cuda_fault(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    async def body(aengine):
        job = await aengine.call(aengine.trainer.submit, _training_spec(tmp_path))
        jobs.append(job)
        runner.execute_bucketed = runner.execute = cuda_fault
        await _until(lambda: aengine.fatal is not None)
        with pytest.raises(EngineUnavailable) as refused:
            await aengine.add([GenerationRequest([5, 6, 7], PARAMS)])
        return job.status.value, aengine, refused.value

    try:
        status, aengine, refused = run(llm, body)
    finally:
        del runner.execute, runner.execute_bucketed
        _clean_up(llm, jobs)
    assert not aengine.alive and "CUDA error" in str(aengine.fatal)
    assert refused.status == 503 and refused.code == "engine_dead"
    assert status == "running"   # not failed: a restarted server resumes it from its checkpoint


def test_a_step_that_fails_again_after_its_requests_failed_is_fatal(llm):
    runner = llm.engine.runner

    def broken(*args, **kwargs):
        raise ValueError("injected")

    async def body(aengine):
        runner.execute = broken
        first = await aengine.add([GenerationRequest([5, 6, 7], PARAMS)])
        with pytest.raises(EngineFailure) as failed:
            await first.results()
        second = await aengine.add([GenerationRequest([8, 9, 10], PARAMS)])
        with pytest.raises(EngineUnavailable) as dead:
            await second.results()
        return failed.value, dead.value, aengine.alive

    try:
        failed, dead, alive = run(llm, body)
    finally:
        del runner.execute
        _clean_up(llm)
    assert failed.status == 500 and not isinstance(failed, EngineUnavailable)
    assert dead.code == "engine_dead" and not alive
