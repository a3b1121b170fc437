"""`loquetier bench serve`: open-loop load against any OpenAI-compatible server (ours or vLLM's).

Requests are sent at their arrival times (workload.py) whatever the server's pace, streamed and
timed (client.py), optionally beside adapter loads/unloads and a fine-tuning job (side_load.py);
the report (report.py) is printed as a table and written as JSON. The exit status is 1 when any
request or side call failed (a 5xx, a broken stream, a lost connection), 0 otherwise: requests the
server refused with a clear 4xx and those the client cancelled are not failures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from tqdm import tqdm

from .client import CANCELLED, COMPLETED, FAILED, REJECTED, RequestResult, send
from .report import SLOs, format_table, summarize
from .side_load import FineTuneReport, Tally, churn_adapters, fine_tune
from .workload import DEFAULT_TRACE, RequestSpec, WorkloadConfig, build_workload


class BenchError(Exception):
    """The benchmark cannot run as asked (server unreachable, unknown model, bad flags)."""


@dataclass
class BenchConfig:
    """A benchmark run: the server, the workload, the SLOs and the side work."""

    model: str                                   # the served base model (GET /v1/models lists it)
    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = "completions"                # "completions" | "chat"
    api_key: str | None = None
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)   # models default to (model,)
    max_concurrency: int | None = None           # None: open loop without a cap
    ignore_eos: bool = True
    slos: SLOs = field(default_factory=SLOs)
    timeout: float = 600.0                       # per read, seconds
    progress: bool = True
    churn_adapters: dict[str, str] = field(default_factory=dict)   # name -> path the server can load
    churn_interval: float = 1.0
    finetune_file: str | None = None
    finetune_epochs: int = 1
    finetune_batch_size: int = 4
    finetune_wait: bool = False                  # report the job after it ends (else: its state then)
    result_json: str | None = None


@dataclass
class BenchReport:
    summary: dict
    results: list[RequestResult]
    side_load: dict

    @property
    def failures(self) -> int:
        return self.summary["requests"][FAILED] + self.side_load.get("failures", 0)

    def to_json(self, config: BenchConfig) -> dict:
        cfg = dataclasses.asdict(config)
        if math.isinf(cfg["workload"]["request_rate"]):
            cfg["workload"]["request_rate"] = "inf"
        return {"config": cfg, "summary": self.summary, "side_load": self.side_load,
                "requests": [{**dataclasses.asdict(r), "tpot": r.tpot} for r in self.results]}


async def _check_server(http: httpx.AsyncClient, cfg: BenchConfig) -> None:
    try:
        resp = await http.get(f"{cfg.base_url}/v1/models")
    except httpx.HTTPError as e:
        raise BenchError(f"cannot reach {cfg.base_url}: {type(e).__name__}: {e}") from None
    if resp.status_code != 200:
        raise BenchError(f"GET {cfg.base_url}/v1/models answered {resp.status_code}: {resp.text[:300]}")
    served = [m["id"] for m in resp.json().get("data", [])]
    if cfg.model not in served:
        raise BenchError(f"model {cfg.model!r} is not served at {cfg.base_url}; it serves {served}")


async def run_bench(cfg: BenchConfig) -> BenchReport:
    """Send the workload, with the side work beside it, and summarize."""
    workload = cfg.workload if cfg.workload.models else dataclasses.replace(cfg.workload, models=(cfg.model,))
    if cfg.endpoint not in ("completions", "chat"):
        raise BenchError(f"endpoint must be 'completions' or 'chat', got {cfg.endpoint!r}")
    if cfg.endpoint == "chat" and workload.prompt_kind == "tokens":
        raise BenchError("token-id prompts need /v1/completions; use word prompts with the chat endpoint")
    try:
        specs = build_workload(workload)
    except (ValueError, OSError) as e:
        raise BenchError(str(e)) from None
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    url = f"{cfg.base_url}/v1/{'chat/completions' if cfg.endpoint == 'chat' else 'completions'}"
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=cfg.max_concurrency or 100)
    async with httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout, connect=30.0), limits=limits,
                                 headers=headers) as http:
        await _check_server(http, cfg)
        stop, tally = asyncio.Event(), Tally()
        side = []
        if cfg.churn_adapters:
            side.append(asyncio.create_task(churn_adapters(http, cfg.base_url, cfg.churn_adapters,
                                                           cfg.churn_interval, stop, tally)))
        job = None
        if cfg.finetune_file:
            job = asyncio.create_task(fine_tune(http, cfg.base_url, cfg.model, Path(cfg.finetune_file),
                                                cfg.finetune_epochs, cfg.finetune_batch_size, stop,
                                                cfg.finetune_wait, tally))
        results, duration = await _send_all(http, url, specs, cfg)
        stop.set()
        await asyncio.gather(*side)
        finetune = await job if job is not None else None
    return BenchReport(summarize(results, duration, cfg.slos), results, _side_summary(tally, finetune))


async def _send_all(http: httpx.AsyncClient, url: str, specs: list[RequestSpec],
                    cfg: BenchConfig) -> tuple[list[RequestResult], float]:
    limit = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    counts = dict.fromkeys((COMPLETED, CANCELLED, REJECTED, FAILED), 0)
    bar = tqdm(total=len(specs), unit="req", dynamic_ncols=True, disable=not cfg.progress, desc="bench serve")
    start = time.perf_counter()

    async def one(spec: RequestSpec) -> RequestResult:
        await asyncio.sleep(max(0.0, spec.arrival - (time.perf_counter() - start)))   # open loop
        async with limit if limit is not None else contextlib.nullcontext():
            result = await send(http, url, spec, cfg.endpoint == "chat", cfg.ignore_eos)
        counts[result.outcome] += 1
        bar.set_postfix({"ok": counts[COMPLETED], "cancel": counts[CANCELLED], "4xx": counts[REJECTED],
                         "fail": counts[FAILED]}, refresh=False)
        bar.update(1)
        return result

    try:
        results = await asyncio.gather(*(one(s) for s in specs))
    finally:
        bar.close()
    return list(results), time.perf_counter() - start


def _side_summary(tally: Tally, finetune: FineTuneReport | None) -> dict:
    out: dict = {}
    if tally.counts:
        out["calls"] = dict(sorted(tally.counts.items()))
    if finetune is not None:
        out["finetune"] = dataclasses.asdict(finetune)
    out["failures"] = len(tally.failures)
    if tally.failures:
        out["failure_examples"] = tally.failures[:5]
    return out


def _table_rows(side: dict) -> dict:
    rows = {}
    if "calls" in side:
        rows["Side calls"] = ", ".join(f"{k} {v}" for k, v in side["calls"].items())
    if "finetune" in side:
        ft = side["finetune"]
        rows["Fine-tuning job"] = (f"{ft['job_id']} {ft['status']}: {ft['steps']} steps, {ft['trained_tokens']} "
                                   f"tokens in {ft['seconds']:.1f}s" + (f" ({ft['error']})" if ft["error"] else ""))
    if side.get("failures"):
        rows["Side-call failures"] = "; ".join(side["failure_examples"])
    return rows


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loquetier bench serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--api-key", default=os.environ.get("LOQUETIER_API_KEY") or os.environ.get("OPENAI_API_KEY"),
                   help="bearer token (default: $LOQUETIER_API_KEY or $OPENAI_API_KEY)")
    p.add_argument("--model", required=True, help="the served base model")
    p.add_argument("--adapters", default="", help="comma-separated models (adapters, the base) to deal requests "
                                                  "over round-robin (default: --model)")
    g = p.add_argument_group("load")
    g.add_argument("--num-prompts", type=int, default=100, help="requests to send")
    g.add_argument("--arrival", choices=("poisson", "trace"), default="poisson")
    g.add_argument("--request-rate", type=float, default=math.inf, help="Poisson rate, req/s (inf: all at once)")
    g.add_argument("--trace", default=str(DEFAULT_TRACE), help="arrival seconds, one integer per line (BurstGPT)")
    g.add_argument("--time-scale", type=float, default=1.0, help="multiply trace times (0.1 = 10x the load)")
    g.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    g.add_argument("--cancel-rate", type=float, default=0.0, help="share of requests the client abandons mid-stream")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("lengths and prompts")
    g.add_argument("--lengths", choices=("sharegpt", "fixed"), default="sharegpt",
                   help="sharegpt: lognormal, mean prompt 161 / output 338 tokens, capped")
    g.add_argument("--input-len", type=int, default=128, help="fixed prompt length")
    g.add_argument("--output-len", type=int, default=128, help="fixed output length (max_tokens)")
    g.add_argument("--max-input-len", type=int, default=1024)
    g.add_argument("--max-output-len", type=int, default=1024)
    g.add_argument("--prompt", choices=("tokens", "words"), default=None,
                   help="random token ids (exact lengths; default for completions) or random words (chat)")
    g.add_argument("--token-id-range", default="10:250", metavar="LO:HI", help="token ids drawn from [LO, HI)")
    g.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="do not send ignore_eos (outputs may end before max_tokens)")
    g = p.add_argument_group("report")
    g.add_argument("--goodput", nargs="*", default=[], metavar="KEY:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:10000 (milliseconds)")
    g.add_argument("--result-json", default=None, help="write the summary and every request's timings here")
    g.add_argument("--timeout", type=float, default=600.0, help="seconds a read may wait")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    g = p.add_argument_group("side load")
    g.add_argument("--churn-adapter", action="append", default=[], metavar="NAME=PATH",
                   help="load and unload this adapter in a loop while the load runs (repeatable)")
    g.add_argument("--churn-interval", type=float, default=1.0, help="seconds an adapter stays loaded / unloaded")
    g.add_argument("--finetune-file", default=None, help="JSONL to fine-tune --model on while the load runs")
    g.add_argument("--finetune-epochs", type=int, default=1)
    g.add_argument("--finetune-batch-size", type=int, default=4)
    g.add_argument("--finetune-wait", action="store_true", help="wait for the job to end before reporting")
    return p


def _goodput(items: list[str]) -> SLOs:
    slos = SLOs()
    for item in items:
        key, sep, value = item.partition(":")
        if not sep or key not in ("ttft", "tpot", "e2el"):
            raise BenchError(f"--goodput takes ttft:MS, tpot:MS or e2el:MS, got {item!r}")
        setattr(slos, "e2e" if key == "e2el" else key, float(value) / 1e3)
    return slos


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    lo, sep, hi = args.token_id_range.partition(":")
    if not sep or not lo.isdigit() or not hi.isdigit():
        raise BenchError(f"--token-id-range takes LO:HI, got {args.token_id_range!r}")
    churn = {}
    for item in args.churn_adapter:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise BenchError(f"--churn-adapter takes NAME=PATH, got {item!r}")
        churn[name] = path
    workload = WorkloadConfig(
        num_requests=args.num_prompts, arrival=args.arrival, request_rate=args.request_rate, trace=args.trace,
        time_scale=args.time_scale, lengths=args.lengths, input_len=args.input_len, output_len=args.output_len,
        max_input_len=args.max_input_len, max_output_len=args.max_output_len,
        prompt_kind=args.prompt or ("words" if args.endpoint == "chat" else "tokens"),
        token_id_range=(int(lo), int(hi)), models=tuple(m for m in args.adapters.split(",") if m),
        cancel_rate=args.cancel_rate, seed=args.seed)
    return BenchConfig(
        model=args.model, base_url=args.base_url.rstrip("/"), endpoint=args.endpoint, api_key=args.api_key,
        workload=workload, max_concurrency=args.max_concurrency, ignore_eos=args.ignore_eos,
        slos=_goodput(args.goodput), timeout=args.timeout, progress=args.progress, churn_adapters=churn,
        churn_interval=args.churn_interval, finetune_file=args.finetune_file, finetune_epochs=args.finetune_epochs,
        finetune_batch_size=args.finetune_batch_size, finetune_wait=args.finetune_wait,
        result_json=args.result_json)


def run(cfg: BenchConfig) -> BenchReport:
    """Run the benchmark, print its table and write its JSON (when asked)."""
    report = asyncio.run(run_bench(cfg))
    print(format_table(report.summary, _table_rows(report.side_load)))
    if cfg.result_json:
        Path(cfg.result_json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.result_json).write_text(json.dumps(report.to_json(cfg), indent=1))
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = run(config_from_args(args))
    except BenchError as e:
        print(f"bench serve: {e}", file=sys.stderr)
        return 2
    return 1 if report.failures else 0
