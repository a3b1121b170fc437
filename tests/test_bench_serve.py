"""`loquetier bench serve`: the workload it generates, its statistics, and a bounded soak test that
drives a real server with it (streams with cancellations, adapters loaded and unloaded, more
adapters than device slots and a fine-tuning job, all at once) and then checks that the KV pool is
empty, no request was lost and the server's memory did not grow."""

import asyncio
import contextlib
import json
import math
import random
import re
import time

import httpx
import pytest
from helpers import BASE, Server, write_adapter, write_model_with_tokenizer
from test_server_api import wait_job

from loquetier.bench.client import CANCELLED, COMPLETED, REJECTED, RequestResult
from loquetier.bench.report import SLOs, percentile, summarize
from loquetier.bench.serve import BenchConfig, run_bench
from loquetier.bench.workload import WorkloadConfig, arrival_times, build_workload, lognormal_length
from loquetier.cli import main
from loquetier.tiny import arithmetic_examples, write_jsonl


# ------------------------------------------------------------------------------------ workload, report
def test_poisson_arrivals_have_the_asked_rate_and_the_trace_is_scaled(tmp_path):
    times = arrival_times(WorkloadConfig(num_requests=4000, request_rate=20.0), random.Random(0))
    assert times[0] == 0 and times == sorted(times)
    assert 4000 / times[-1] == pytest.approx(20.0, rel=0.05)
    assert arrival_times(WorkloadConfig(num_requests=3), random.Random(0)) == [0.0, 0.0, 0.0]   # rate inf
    trace = tmp_path / "trace.txt"
    trace.write_text("7\n7\n9\n12\n40\n")
    cfg = WorkloadConfig(num_requests=4, arrival="trace", trace=str(trace), time_scale=0.5)
    assert arrival_times(cfg, random.Random(0)) == [0.0, 0.0, 1.0, 2.5]
    with pytest.raises(ValueError, match="holds 5 arrivals"):
        arrival_times(WorkloadConfig(num_requests=6, arrival="trace", trace=str(trace)), random.Random(0))


def test_sharegpt_lengths_have_its_means_and_requests_are_dealt_round_robin():
    rng = random.Random(1)
    draws = [lognormal_length(rng, 161, 10**6) for _ in range(20000)]
    assert sum(draws) / len(draws) == pytest.approx(161, rel=0.05)
    assert max(lognormal_length(rng, 338, 1024) for _ in range(5000)) == 1024   # capped
    specs = build_workload(WorkloadConfig(num_requests=400, models=("base", "a", "b"), cancel_rate=0.25,
                                          token_id_range=(10, 20), seed=3))
    assert [s.model for s in specs[:4]] == ["base", "a", "b", "base"]
    assert all(len(s.prompt) == s.input_len and all(10 <= t < 20 for t in s.prompt) for s in specs)
    cancelled = [s for s in specs if s.cancel_after is not None]
    assert 0.18 < len(cancelled) / 400 < 0.32 and all(1 <= s.cancel_after < max(2, s.output_len) for s in cancelled)
    again = build_workload(WorkloadConfig(num_requests=400, models=("base", "a", "b"), cancel_rate=0.25,
                                          token_id_range=(10, 20), seed=3))
    assert [(s.prompt, s.output_len, s.cancel_after) for s in again] == \
        [(s.prompt, s.output_len, s.cancel_after) for s in specs]
    words = build_workload(WorkloadConfig(num_requests=2, models=("m",), prompt_kind="words", lengths="fixed",
                                          input_len=7))
    assert all(isinstance(s.prompt, str) and len(s.prompt.split()) == 7 for s in words)


def test_summary_percentiles_throughput_and_goodput():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and percentile([5.0], 99) == 5.0
    assert percentile(list(map(float, range(101))), 90) == 90.0
    done = [RequestResult(i, "m", COMPLETED, 10, output_tokens=11, ttft=0.1 * (i + 1), e2e=0.1 * (i + 1) + 1.0,
                          itl=[0.1] * 10) for i in range(4)]
    others = [RequestResult(4, "m", CANCELLED, 10, output_tokens=3), RequestResult(5, "m", REJECTED, 10, status=404)]
    s = summarize(done + others, duration=2.0, slos=SLOs(ttft=0.25, tpot=0.2))
    assert s["requests"] == {"total": 6, "completed": 4, "cancelled": 1, "rejected": 1, "failed": 0}
    assert s["rejected_by_status"] == {"404": 1}
    assert s["request_throughput"] == 2.0 and s["output_token_throughput"] == 22.0
    assert s["total_token_throughput"] == 42.0
    assert s["ttft_ms"]["p50"] == pytest.approx(250.0) and s["tpot_ms"]["mean"] == pytest.approx(100.0)
    assert s["itl_ms"]["p99"] == pytest.approx(100.0) and s["e2el_ms"]["mean"] == pytest.approx(1250.0)
    assert s["goodput"] == 1.0 and s["slo_attainment"] == 0.5   # two of four have TTFT <= 250 ms


def test_bench_serve_reports_an_unreachable_server(capsys):
    assert main(["bench", "serve", "--model", "m", "--base-url", "http://127.0.0.1:9", "--no-progress"]) == 2
    assert "cannot reach" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ soak
SLOTS = 3   # device slots: the job's, and two for four served adapters


@pytest.fixture(scope="module")
def soak(tmp_path_factory):
    root = tmp_path_factory.mktemp("soak")
    hf = write_model_with_tokenizer(root / "model", "llama")
    for i, targets in enumerate([["q_proj", "v_proj"], ["o_proj"], ["down_proj", "up_proj"], ["q_proj"]]):
        write_adapter(hf, root / "adapters" / f"a{i}", 4, targets, seed=i)
    write_jsonl(arithmetic_examples(16, seed=2, max_operand=30), root / "train.jsonl")
    adapters = [f"--adapter=a{i}={root / 'adapters' / f'a{i}'}" for i in range(3)]
    server = Server(root / "model", root / "data", root / "server.log", *adapters, "--enable-lora-loading",
                    "--lora-root", str(root / "adapters"), "--max-loras", str(SLOTS), "--checkpoint-interval", "100")
    try:
        yield root, server
    finally:
        server.stop()


def test_a_job_created_while_every_slot_is_busy_waits_for_one(soak):
    root, server = soak
    client = server.client(key=None)
    train = client.files.create(file=(root / "train.jsonl").open("rb"), purpose="fine-tune")
    body = {"prompt": "Hello", "max_tokens": 480, "ignore_eos": True, "stream": True}
    with contextlib.ExitStack() as streams:
        readers = []   # kept: a dropped line iterator closes its response, which aborts the request
        for name in ("a0", "a1", "a2"):   # three adapters pin the three slots while they stream
            resp = streams.enter_context(httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                                                      json={**body, "model": name}))
            readers.append(resp.iter_lines())
            next(line for line in readers[-1] if line.startswith("data: "))
        assert server.health()["num_requests_running"] == 3
        job = client.fine_tuning.jobs.create(model=BASE, training_file=train.id,
                                             hyperparameters={"n_epochs": 1, "batch_size": 4})
        assert job.status == "queued"
    # the streams are gone, their slots free: the job starts by itself
    job = wait_job(client, job.id)
    assert job.status == "succeeded", job.error
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert "every adapter slot is in use; the job starts when one is free" in messages


def soak_config(root, server, seed: int) -> BenchConfig:
    workload = WorkloadConfig(num_requests=32, request_rate=30.0, max_input_len=64, max_output_len=32,
                              token_id_range=(10, 250), models=(BASE, "a0", "a1", "a2", "churned"),
                              cancel_rate=0.3, seed=seed)
    return BenchConfig(model=BASE, base_url=server.url, workload=workload, progress=False,
                       churn_adapters={"churned": "a3"}, churn_interval=0.2,
                       finetune_file=str(root / "train.jsonl"), finetune_epochs=1, finetune_batch_size=4,
                       finetune_wait=True, slos=SLOs(ttft=5.0))


def server_rss(server) -> float:
    """The server process's resident memory, from its /metrics."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return float(re.search(r"^process_resident_memory_bytes (\S+)$", text, re.M).group(1))


def settled(server) -> dict:
    """/health once the last aborts have run (a cancelled stream is aborted between two steps)."""
    deadline = time.time() + 20
    while True:
        health = server.health()
        if (health["kv_blocks_used"], health["num_requests_running"], health["num_requests_waiting"]) == (0, 0, 0):
            return health
        if time.time() > deadline:
            return health
        time.sleep(0.05)


def check_round(summary: dict, side: dict) -> None:
    req = summary["requests"]
    # nothing lost: every request completed, was cancelled by the client, or got a clear 4xx
    assert req["failed"] == 0 and side["failures"] == 0, (summary["failure_examples"], side)
    assert req["completed"] + req["cancelled"] + req["rejected"] == req["total"] == 32
    assert req["completed"] > 0 and req["cancelled"] > 0
    assert set(summary["rejected_by_status"]) <= {"404"}   # the churned adapter, while it was unloaded
    assert side["finetune"]["status"] == "succeeded" and side["finetune"]["steps"] == 4
    assert side["calls"]["load ok"] > 0 and side["calls"]["unload ok"] > 0


def test_soak_streams_cancellations_adapter_churn_and_a_job_leave_nothing_behind(soak, tmp_path):
    root, server = soak
    # round 0 through the command line: table printed, JSON written, exit status 0
    out = tmp_path / "round0.json"
    args = ["bench", "serve", "--model", BASE, "--base-url", server.url, "--num-prompts", "32", "--request-rate", "30",
            "--max-input-len", "64", "--max-output-len", "32", "--adapters", f"{BASE},a0,a1,a2,churned",
            "--cancel-rate", "0.3", "--churn-adapter", "churned=a3", "--churn-interval", "0.2",
            "--finetune-file", str(root / "train.jsonl"), "--finetune-batch-size", "4", "--finetune-wait",
            "--goodput", "ttft:5000", "--no-progress", "--result-json", str(out)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    check_round(report["summary"], report["side_load"])
    assert len(report["requests"]) == 32 and report["summary"]["ttft_ms"]["p99"] is not None
    assert settled(server)["kv_blocks_used"] == 0

    rss = []
    for seed in (1, 2):
        result = asyncio.run(run_bench(soak_config(root, server, seed)))
        check_round(result.summary, result.side_load)
        health = settled(server)
        assert (health["kv_blocks_used"], health["num_requests_running"], health["num_requests_waiting"]) == (0, 0, 0)
        assert health["training_jobs_active"] == 0 and health["adapters_gpu"] <= SLOTS
        rss.append(server_rss(server))
    assert rss[1] <= rss[0] + (16 << 20), [f"{r / 2**20:.0f} MiB" for r in rss]
    assert math.isfinite(result.summary["request_throughput"]) and result.summary["goodput"] > 0
