"""Shutdown and fatal errors of a real `loquetier serve` process: SIGTERM drains (503 for new work,
in-flight streams finish, jobs checkpoint, exit 0) and a restart resumes the jobs; a device error
turns /health to 503 and exits 1, and the restarted server resumes the jobs from their checkpoints."""

import json
import signal
import time

import httpx
import pytest
from helpers import BASE, Server, assert_error, write_model_with_tokenizer

from loquetier.tiny import arithmetic_examples, write_jsonl

STEPS_PER_EPOCH = 16   # 16 examples, batch size 1
EPOCHS = 40            # long enough that no job ends while a test still needs it running


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("lifecycle")
    write_model_with_tokenizer(root / "model", "llama")
    write_jsonl(arithmetic_examples(16, seed=1, max_operand=30), root / "train.jsonl")
    return root


def start_job(client, root, suffix, epochs):
    train = client.files.create(file=(root / "train.jsonl").open("rb"), purpose="fine-tune")
    return client.fine_tuning.jobs.create(model=BASE, training_file=train.id, suffix=suffix,
                                          hyperparameters={"n_epochs": epochs, "batch_size": 1})


def metric_steps(client, job_id) -> list[int]:
    return sorted(e.data["step"] for e in client.fine_tuning.jobs.list_events(job_id, limit=1000).data
                  if e.type == "metrics")


def wait_for(predicate, timeout=60.0, what="condition"):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def sse_events(lines) -> list[dict | str]:
    return [line[len("data: "):] if line == "data: [DONE]" else json.loads(line[len("data: "):])
            for line in lines if line.startswith("data: ")]


def test_sigterm_drains_requests_checkpoints_jobs_and_exits_0(root, tmp_path):
    data, log = tmp_path / "data", tmp_path / "server.log"
    server = Server(root / "model", data, log, "--checkpoint-interval", "1000", "--shutdown-timeout", "60")
    try:
        client = server.client(key=None)
        job = start_job(client, root, "drain", epochs=EPOCHS)
        wait_for(lambda: metric_steps(client, job.id), what="a training step")
        body = {"model": BASE, "prompt": "Tell me a story", "max_tokens": 40, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            server.proc.send_signal(signal.SIGTERM)
            # new work is refused with an OpenAI error while the stream goes on
            deadline = time.time() + 10
            while True:
                refused = httpx.post(f"{server.url}/v1/completions", timeout=10,
                                     json={"model": BASE, "prompt": "Hi", "max_tokens": 1})
                if refused.status_code == 503 or time.time() > deadline:
                    break
            assert assert_error(refused, 503, "shutting down")["code"] == "server_shutting_down"
            assert httpx.get(f"{server.url}/health", timeout=10).status_code == 503
            assert httpx.get(f"{server.url}/v1/models", timeout=10).status_code == 200   # reads still work
            events = sse_events([first, *lines])
        assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 40
        assert [e["choices"][0]["finish_reason"] for e in events[:-2]][-1] == "length"
        assert server.proc.wait(60) == 0, server.tail()
        checkpoints = sorted((data / "jobs" / job.id).glob("checkpoint-*"))
        assert len(checkpoints) == 1, checkpoints   # the periodic interval is never reached: this is the drain's
        saved_step = json.loads((checkpoints[0] / "trainer_state.json").read_text())["step"]
        assert 1 <= saved_step < EPOCHS * STEPS_PER_EPOCH

        # the restarted server resumes the job exactly there: every step trains once
        server = Server(root / "model", data, log, "--checkpoint-interval", "1000", "--shutdown-timeout", "0")
        client = server.client(key=None)
        wait_for(lambda: max(metric_steps(client, job.id)) > saved_step + 2, what="training after the restart")
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=1000).data]
        assert f"resumed from checkpoint-{saved_step}" in messages
        steps = metric_steps(client, job.id)
        assert steps == list(range(1, len(steps) + 1))
        assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"

        # with --shutdown-timeout 0 a stream still running is ended with an error, and the exit is clean
        body["max_tokens"] = 480
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            server.proc.send_signal(signal.SIGTERM)
            events = sse_events([first, *lines])
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "server_shutting_down"
        assert server.proc.wait(60) == 0, server.tail()
    finally:
        server.stop()


FAULTY_LAUNCHER = """
import sys
from pathlib import Path

from loquetier.engine.runner import ModelRunner

trigger = Path(sys.argv.pop(1))
execute = ModelRunner.execute


def faulty_execute(self, *args, **kwargs):   # a kernel fault, once the test creates the trigger file
    if trigger.exists():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    return execute(self, *args, **kwargs)


ModelRunner.execute = faulty_execute
from loquetier.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
"""


def test_device_error_exits_1_and_the_restarted_server_resumes_jobs(root, tmp_path):
    data, log = tmp_path / "data", tmp_path / "server.log"
    launcher, trigger = tmp_path / "faulty_serve.py", tmp_path / "fault"
    launcher.write_text(FAULTY_LAUNCHER)
    server = Server(root / "model", data, log, "--checkpoint-interval", "2", launcher=(str(launcher), str(trigger)))
    try:
        client = server.client(key=None)
        job = start_job(client, root, "crash", epochs=EPOCHS)
        wait_for(lambda: client.fine_tuning.jobs.checkpoints.list(job.id).data, what="a checkpoint")
        trigger.touch()   # the next step (training runs through ModelRunner.execute too) faults
        assert server.proc.wait(30) == 1, server.tail()
        saved = max(json.loads((c / "trainer_state.json").read_text())["step"]
                    for c in (data / "jobs" / job.id).glob("checkpoint-*"))

        server = Server(root / "model", data, log, "--checkpoint-interval", "2")
        client = server.client(key=None)
        assert client.fine_tuning.jobs.retrieve(job.id).status == "running"
        wait_for(lambda: max(metric_steps(client, job.id)) > saved + 2, what="training after the restart")
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=1000).data]
        assert f"resumed from checkpoint-{saved}" in messages and "server restarted; job resumed" in messages
        steps = sorted(c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id, limit=1000).data)
        assert steps == list(range(2, steps[-1] + 1, 2))
        assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    finally:
        server.stop()


def test_health_is_503_after_a_fatal_engine_error(root, tmp_path):
    from fastapi.testclient import TestClient

    from loquetier.server.app import create_app
    from loquetier.server.config import ServerConfig
    app = create_app(ServerConfig(model=str(root / "model"), served_model_name=BASE, data_dir=str(tmp_path / "d"),
                                  num_kv_blocks=64))

    def cuda_fault(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with TestClient(app) as http:
        assert http.get("/health").status_code == 200
        app.state.engine.runner.execute = cuda_fault
        r = http.post("/v1/completions", json={"model": BASE, "prompt": "Hi", "max_tokens": 4})
        assert_error(r, 503, "CUDA error")
        assert assert_error(http.get("/health"), 503, "unrecoverable")["code"] == "engine_dead"
        refused = http.post("/v1/completions", json={"model": BASE, "prompt": "Hi"})
        assert assert_error(refused, 503)["code"] == "engine_dead"
