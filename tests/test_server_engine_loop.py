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


def test_failing_step_fails_its_requests_and_the_loop_goes_on(llm):
    runner = llm.engine.runner
    real = runner.execute
    calls = {"n": 0}

    def flaky(batch, keep_logits=False):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected")
        return real(batch, keep_logits)

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
        # training-only steps go through execute_train, steps with inference rows through execute
        runner.execute = runner.execute_train = boom
        try:
            job = await aengine.call(aengine.trainer.submit, spec)
            for _ in range(500):
                if await aengine.call(lambda: job.status.value) == "failed":
                    break
                await asyncio.sleep(0.01)
        finally:
            del runner.execute, runner.execute_train   # the class's methods again
        group = await aengine.add([GenerationRequest([5, 6, 7], PARAMS)])
        return job, (await group.results())[0], aengine.alive

    job, out, alive = run(llm, body)
    assert job.status.value == "failed" and "injected" in job.error
    assert alive and out.finished and len(out.token_ids) == 12
