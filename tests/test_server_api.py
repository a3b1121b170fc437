"""The HTTP API against a real `loquetier serve` subprocess, through the official OpenAI client.

One server (conftest.py's `api_server`: an API key, a KV pool of 256 blocks, a 100 kB upload limit
and a waiting queue of 100) serves most tests; the restart test runs its own so it can SIGKILL it.
"""

import asyncio
import signal
import time

import httpx
import openai
import pytest
from helpers import API_KEY, BASE, UPLOAD_LIMIT, Server, assert_error, post

from loquetier import SamplingParams

CHAT_STOP_IDS = [2, 6]   # </s> and <|end|> of the tiny tokenizer


@pytest.fixture
def env(api_server):
    return api_server


def greedy(max_tokens=16, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, **kw)


def chat_prompt(llm, messages) -> list[int]:
    text = llm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return llm.tokenizer.encode(text, add_special_tokens=False)


# ------------------------------------------------------------------------------------ models, generation
def test_models_list(env):
    _, server, _ = env
    models = {m.id: m for m in server.client().models.list().data}
    assert models[BASE].parent is None and models["a1"].parent == BASE
    assert server.client().models.retrieve("a1").id == "a1"


@pytest.mark.parametrize("model", [BASE, "a1"])
def test_completions_and_chat_equal_llm_generate(env, model):
    _, server, llm = env
    client = server.client()
    adapter = None if model == BASE else model
    prompts = ["Hello, how are you?", "The quick brown fox", "12+7="]
    resp = client.completions.create(model=model, prompt=prompts, max_tokens=16, temperature=0)
    expected = llm.generate(prompts, greedy(), adapter)
    assert [c.text for c in sorted(resp.choices, key=lambda c: c.index)] == [o.text for o in expected]
    assert [c.finish_reason for c in resp.choices] == [o.finish_reason for o in expected]
    assert resp.usage.prompt_tokens == sum(len(llm.encode(p)) for p in prompts)
    assert resp.usage.completion_tokens == sum(len(o.token_ids) for o in expected)
    ids = [5, 6, 7, 8, 9, 10]
    resp = client.completions.create(model=model, prompt=ids, max_tokens=10, temperature=0)
    assert resp.choices[0].text == llm.generate(ids, greedy(10), adapter)[0].text
    messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hi!"}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=20, temperature=0)
    ref = llm.generate(chat_prompt(llm, messages), greedy(20, stop_token_ids=CHAT_STOP_IDS), adapter)[0]
    assert chat.choices[0].message.content == ref.text and chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens == len(ref.token_ids)


def test_streaming_with_usage(env):
    _, server, _ = env
    client = server.client()
    kw = dict(model="a1", prompt="Tell me a story", max_tokens=24, temperature=0)
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()
    messages = [{"role": "user", "content": "Hello"}]
    full = client.chat.completions.create(model=BASE, messages=messages, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model=BASE, messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens
    # without include_usage: no usage chunk
    chunks = list(client.completions.create(**kw, stream=True))
    assert all(c.usage is None for c in chunks) and chunks[-1].choices


def test_n_choices_and_seeds_reproduce(env):
    _, server, _ = env
    client = server.client()
    kw = dict(model=BASE, prompt="Hello", max_tokens=8, temperature=1.0, n=3, seed=123)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    texts = [c.text for c in sorted(a.choices, key=lambda c: c.index)]
    assert len(texts) == 3 and texts == [c.text for c in sorted(b.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1, "choices should use different seeds"
    single = client.completions.create(**{**kw, "n": 1, "seed": 124})
    assert single.choices[0].text == texts[1]      # choice i samples with seed + i
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(**kw, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[i] for i in range(3)] == texts
    chat = client.chat.completions.create(model="a1", messages=[{"role": "user", "content": "hi"}], n=2, seed=7,
                                          max_tokens=6)
    assert len(chat.choices) == 2 and chat.usage.prompt_tokens == len(chat_prompt(env[2], [{"role": "user", "content": "hi"}]))


def test_stop_strings(env):
    _, server, llm = env
    client = server.client()
    for prompt in ["Hello", "The answer is", "Tell me a story", "What is", "12+7="]:
        text = client.completions.create(model=BASE, prompt=prompt, max_tokens=32, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].text
        stops = [ch for ch in text[1:] if ch.isascii() and ch.isprintable() and text.index(ch) >= 1]
        if stops:
            break
    else:
        pytest.skip("the random model produced no printable ASCII character to stop at")
    stop = stops[0]
    expected = text[:text.index(stop)]
    kw = dict(model=BASE, prompt=prompt, max_tokens=32, temperature=0, stop=[stop, "never-matches"],
              extra_body={"ignore_eos": True})
    resp = client.completions.create(**kw)
    assert resp.choices[0].text == expected and resp.choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices) == expected
    assert llm.generate(prompt, greedy(32, stop=[stop], ignore_eos=True))[0].text == expected


def test_logprobs(env):
    _, server, llm = env
    client = server.client()
    resp = client.completions.create(model="a1", prompt="Hello there", max_tokens=6, temperature=0, logprobs=3)
    lp = resp.choices[0].logprobs
    ref = llm.generate("Hello there", greedy(6, logprobs=3), "a1")[0]
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == resp.usage.completion_tokens
    assert lp.token_logprobs == pytest.approx([x.logprob for x in ref.logprobs], abs=1e-4)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3 and chosen >= max(top.values()) - 1e-5   # greedy picks the best
    chat = client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob <= 0 and t.bytes is not None for t in content)
    streamed = [c.choices[0].logprobs for c in client.completions.create(
        model="a1", prompt="Hello there", max_tokens=6, temperature=0, logprobs=3, stream=True) if c.choices]
    assert sum((s.token_logprobs for s in streamed if s), []) == pytest.approx(lp.token_logprobs, abs=1e-6)


def test_load_and_unload_adapter(env):
    root, server, llm = env
    client = server.client()
    r = post(server, "/v1/load_lora_adapter", json={"lora_name": "a2", "lora_path": "a2"})
    assert r.status_code == 200, r.text
    models = {m.id: m for m in client.models.list().data}
    assert models["a2"].parent == BASE
    out = client.completions.create(model="a2", prompt="Hello", max_tokens=10, temperature=0)
    assert out.choices[0].text == llm.generate("Hello", greedy(10), "a2")[0].text
    assert_error(post(server, "/v1/load_lora_adapter", json={"lora_name": "a2", "lora_path": "a2"}), 400, "already")
    assert post(server, "/v1/unload_lora_adapter", json={"lora_name": "a2"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="a2", prompt="Hello", max_tokens=2)
    assert_error(post(server, "/v1/unload_lora_adapter", json={"lora_name": "a2"}), 404)


# ------------------------------------------------------------------------------------ bad inputs
def test_bad_inputs_get_openai_errors(env):
    root, server, _ = env
    comp = lambda **body: post(server, "/v1/completions", json={"model": BASE, "prompt": "Hi", **body})  # noqa: E731
    assert assert_error(comp(model="nope"), 404, "nope")["code"] == "model_not_found"
    assert_error(post(server, "/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user",
                                                                                          "content": "x"}]}), 404)
    assert assert_error(comp(max_tokens=-1), 400, "max_tokens")["param"] == "max_tokens"
    assert_error(comp(max_tokens=10**9), 400, "maximum context length")
    assert_error(comp(prompt=list(range(3, 303)) * 2), 400, "maximum context length")   # 600 tokens > 512
    assert_error(post(server, "/v1/chat/completions", json={
        "model": BASE, "messages": [{"role": "user", "content": "word " * 600}]}), 400, "context")
    assert_error(comp(temperature=-1), 400, "temperature")
    assert_error(comp(seed=2**70), 400, "seed")
    assert_error(comp(prompt=[1, 2, 100000]), 400, "token ids")
    # malformed JSON, and a body that is not an object
    r = httpx.post(f"{server.url}/v1/completions", content=b'{"model": "tiny", "prompt": ',
                   headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert_error(r, 400, "JSON")
    assert_error(post(server, "/v1/completions", json=[1, 2]), 400)
    # files and jobs
    bad = b'{"prompt": "1+1=", "completion": "2"}\nnot json\n{"text": 5}\n'
    r = post(server, "/v1/files", files={"file": ("bad.jsonl", bad)}, data={"purpose": "fine-tune"})
    assert_error(r, 400, "line 2", "line 3", "bad.jsonl")
    with pytest.raises(openai.BadRequestError, match="line 2"):
        server.client().files.create(file=("bad.jsonl", bad), purpose="fine-tune")
    r = post(server, "/v1/files", files={"file": ("big.jsonl", b"x" * (UPLOAD_LIMIT * 2))}, data={"purpose": "fine-tune"})
    assert_error(r, 413)
    assert_error(httpx.get(f"{server.url}/v1/files/file-nope", headers={"Authorization": f"Bearer {API_KEY}"}), 404)
    with pytest.raises(openai.NotFoundError):
        server.client().files.retrieve("file-nope")
    with pytest.raises(openai.NotFoundError):
        server.client().fine_tuning.jobs.retrieve("ftjob-nope")
    with pytest.raises(openai.NotFoundError):
        server.client().fine_tuning.jobs.list_events("ftjob-nope")
    assert_error(post(server, "/v1/fine_tuning/jobs", json={"model": BASE, "training_file": "file-nope"}), 404)
    # API key
    assert_error(post(server, "/v1/completions", auth="wrong", json={"model": BASE, "prompt": "x"}), 401)
    assert_error(post(server, "/v1/completions", auth=None, json={"model": BASE, "prompt": "x"}), 401)
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    # adapter paths outside the roots: absolute, `..`, and a symlink pointing out
    (root / "adapters" / "link").symlink_to(root / "outside" / "a3")
    for path in [str(root / "outside" / "a3"), "../outside/a3", "link"]:
        assert_error(post(server, "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path}), 400,
                     "outside the allowed roots")
    # a full waiting queue: 8 prompts x n=16 = 128 sequences > 100 waiting
    with pytest.raises(openai.RateLimitError):
        server.client().completions.create(model=BASE, prompt=["a"] * 8, n=16, max_tokens=4)
    assert_error(comp(n=16, prompt=["a"] * 8), 429)
    health = server.health()
    assert health["status"] == "ok" and health["num_requests_waiting"] == 0 and health["kv_blocks_used"] == 0


# ------------------------------------------------------------------------------------ concurrency
def test_64_concurrent_streaming_clients(env):
    _, server, llm = env
    prompts = [f"Request number {i}: say something" for i in range(64)]
    adapters = [None if i % 2 else "a1" for i in range(64)]
    expected = [o.text for o in llm.generate(prompts, greedy(12), adapters)]

    async def one(client, prompt, adapter):
        stream = await client.completions.create(model=adapter or BASE, prompt=prompt, max_tokens=12, temperature=0,
                                                 stream=True)
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        try:
            return await asyncio.gather(*(one(client, p, a) for p, a in zip(prompts, adapters)))
        finally:
            await client.close()

    assert asyncio.run(main()) == expected
    assert server.health()["kv_blocks_used"] == 0
    # a prompt sent twice: the second finds its full blocks cached, and /metrics counts them
    long_prompt = "Once upon a time, far away, there lived a prefix cache. " * 3
    server.client().completions.create(model=BASE, prompt=long_prompt, max_tokens=1)
    before = _prefix_cache_counters(server)
    server.client().completions.create(model=BASE, prompt=long_prompt, max_tokens=1)
    after = _prefix_cache_counters(server)
    n = len(llm.encode(long_prompt))
    assert after["queries"] - before["queries"] == n
    assert after["hits"] - before["hits"] == (n - 1) // 16 * 16 > 0


def _prefix_cache_counters(server) -> dict:
    text = httpx.get(f"{server.url}/metrics").text
    return {name: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            for name in ("queries", "hits") if line.startswith(f"loquetier_prefix_cache_{name}_total ")}


def _aborted(server) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("loquetier_requests_total{") and 'finished_reason="abort"' in line)


def test_disconnecting_clients_free_their_kv_blocks(env):
    _, server, _ = env
    before = _aborted(server)
    body = {"model": BASE, "prompt": "Hello", "max_tokens": 480, "temperature": 0, "ignore_eos": True,
            "stream": True, "logprobs": 0}   # logprobs: every token makes a chunk, even bytes of a partial character
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(timeout=60) as http:
        streams = [http.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers) for _ in range(8)]
        responses = [s.__enter__() for s in streams]
        for resp in responses:
            lines = resp.iter_lines()
            got = 0
            while got < 2:
                got += next(lines).startswith("data:")
        assert server.health()["kv_blocks_used"] > 0
        for s in streams:
            s.__exit__(None, None, None)
    # a non-streamed request whose client gives up is aborted too
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.url}/v1/completions", headers=headers, timeout=0.1,
                   json={**body, "stream": False, "logprobs": None, "max_tokens": 480})
    deadline = time.time() + 20
    while time.time() < deadline:
        h = server.health()
        if h["kv_blocks_used"] == 0 and h["num_requests_running"] == 0 and _aborted(server) - before >= 9:
            break
        time.sleep(0.05)
    assert (h["kv_blocks_used"], h["num_requests_running"]) == (0, 0)
    assert _aborted(server) - before == 9
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "loquetier_kv_cache_usage_ratio 0.0" in metrics and "loquetier_time_to_first_token_seconds_bucket" in metrics


# ------------------------------------------------------------------------------------ fine-tuning
def wait_job(client, job_id, statuses=("succeeded", "failed", "cancelled"), timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {job.status}")


def test_fine_tuning_lifecycle(env):
    root, server, llm = env
    client = server.client()
    train = client.files.create(file=(root / "train.jsonl").open("rb"), purpose="fine-tune")
    valid = client.files.create(file=(root / "valid.jsonl").open("rb"), purpose="fine-tune")
    assert client.files.retrieve(train.id).bytes == (root / "train.jsonl").stat().st_size
    assert train.id in [f.id for f in client.files.list().data]
    job = client.fine_tuning.jobs.create(
        model=BASE, training_file=train.id, validation_file=valid.id, suffix="sum", seed=3,
        hyperparameters={"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 5},
        extra_body={"lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj", "down_proj"]}})
    assert job.status in ("queued", "running") and job.model == BASE and job.seed == 3
    job = wait_job(client, job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model.startswith(f"ft:{BASE}:sum:") and job.trained_tokens > 0 and job.finished_at
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    metrics = [e for e in events if e.type == "metrics"]
    assert sorted(e.data["step"] for e in metrics) == list(range(1, 9))
    assert any("succeeded" in e.message for e in events) and any("eval loss" in e.message for e in events)
    page = client.fine_tuning.jobs.list_events(job.id, limit=3)
    assert len(page.data) == 3 and page.has_more
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [8, 6, 4, 2]
    assert checkpoints[0].fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:step-8"
    assert checkpoints[0].metrics.train_loss > 0 and checkpoints[0].metrics.valid_loss > 0
    models = {m.id: m for m in client.models.list().data}
    assert models[job.fine_tuned_model].parent == BASE
    assert models[f"{job.fine_tuned_model}:step-2"].parent == job.fine_tuned_model
    # the fine-tuned model is the checkpoint the job saved last
    ckpt_dir = root / "data" / "jobs" / job.id / "checkpoint-8"
    llm.load_adapter("ft-check", ckpt_dir)
    for name in (job.fine_tuned_model, f"{job.fine_tuned_model}:step-8"):
        out = client.completions.create(model=name, prompt="3+4=", max_tokens=8, temperature=0)
        assert out.choices[0].text == llm.generate("3+4=", greedy(8), "ft-check")[0].text
    client.completions.create(model=f"{job.fine_tuned_model}:step-2", prompt="3+4=", max_tokens=4)
    # pagination over jobs
    second = client.fine_tuning.jobs.create(model=job.fine_tuned_model, training_file=train.id,
                                            hyperparameters={"n_epochs": 1, "batch_size": 8})
    assert wait_job(client, second.id).status == "succeeded"
    first_page = client.fine_tuning.jobs.list(limit=1)
    assert [j.id for j in first_page.data] == [second.id] and first_page.has_more
    assert client.fine_tuning.jobs.list(limit=1, after=second.id).data[0].id == job.id
    assert client.files.delete(valid.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(valid.id)


def test_cancel_and_pause_resume(env):
    root, server, _ = env
    client = server.client()
    train = client.files.create(file=(root / "train.jsonl").open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=BASE, training_file=train.id,
                                         hyperparameters={"n_epochs": 50, "batch_size": 1})

    def steps():
        return [e.data["step"] for e in client.fine_tuning.jobs.list_events(job.id, limit=1000).data
                if e.type == "metrics"]

    deadline = time.time() + 30
    while not steps() and time.time() < deadline:
        time.sleep(0.05)
    paused = client.post(f"/fine_tuning/jobs/{job.id}/pause", cast_to=dict)
    assert paused["status"] == "paused"
    done = len(steps())
    time.sleep(0.5)
    assert len(steps()) == done and server.health()["training_jobs_active"] == 0
    assert_error(post(server, f"/v1/fine_tuning/jobs/{job.id}/pause"), 400, "paused")
    assert client.post(f"/fine_tuning/jobs/{job.id}/resume", cast_to=dict)["status"] == "running"
    while len(steps()) == done and time.time() < deadline:
        time.sleep(0.05)
    assert len(steps()) > done
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    with pytest.raises(openai.BadRequestError, match="cancelled"):
        client.fine_tuning.jobs.cancel(job.id)
    assert_error(post(server, f"/v1/fine_tuning/jobs/{job.id}/resume"), 400)
    assert server.health()["training_jobs_active"] == 0


def test_server_killed_during_a_job_resumes_it(env, tmp_path):
    root, _, _ = env
    data_dir, log = tmp_path / "data", tmp_path / "server.log"
    args = ("--checkpoint-interval", "2", "--base-learning-rate", "1e-3")
    server = Server(root / "model", data_dir, log, *args)
    try:
        client = server.client(key=None)
        train = client.files.create(file=(root / "train.jsonl").open("rb"), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model=BASE, training_file=train.id, suffix="crash",
                                             hyperparameters={"n_epochs": 6, "batch_size": 1})
        deadline = time.time() + 60
        while not client.fine_tuning.jobs.checkpoints.list(job.id).data and time.time() < deadline:
            time.sleep(0.02)
        server.stop(signal.SIGKILL)
        server = Server(root / "model", data_dir, log, *args)
        client = server.client(key=None)
        assert [f.id for f in client.files.list().data] == [train.id]
        assert [j.id for j in client.fine_tuning.jobs.list().data] == [job.id]
        job = wait_job(client, job.id)
        assert job.status == "succeeded", job.error
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=1000).data]
        assert any(m.startswith("resumed from checkpoint-") for m in messages), "the job finished before the kill"
        assert "server restarted; job resumed" in messages
        steps = [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id, limit=100).data]
        assert sorted(steps) == list(range(2, 97, 2))
        ask = dict(prompt="5+5=", max_tokens=8, temperature=0)
        before = [client.completions.create(model=m, **ask).choices[0].text
                  for m in (job.fine_tuned_model, f"{job.fine_tuned_model}:step-2")]
        # a succeeded job's model and checkpoints are served again after another restart
        server.stop(signal.SIGKILL)
        server = Server(root / "model", data_dir, log, *args)
        client = server.client(key=None)
        models = {m.id: m.parent for m in client.models.list().data}
        assert models[job.fine_tuned_model] == BASE and models[f"{job.fine_tuned_model}:step-2"] == job.fine_tuned_model
        after = [client.completions.create(model=m, **ask).choices[0].text
                 for m in (job.fine_tuned_model, f"{job.fine_tuned_model}:step-2")]
        assert after == before
        assert client.fine_tuning.jobs.retrieve(job.id).status == "succeeded"
    finally:
        server.stop()
