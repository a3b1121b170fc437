"""Work a benchmark runs beside its requests: adapters loaded and unloaded in a loop (vLLM's
/v1/load_lora_adapter and /v1/unload_lora_adapter), and a fine-tuning job (OpenAI's files and
fine-tuning jobs API). Each tallies what the server answered; a 5xx or a broken connection is a
failure, a 4xx (an adapter in use, a name already loaded) a clear refusal."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

TERMINAL_JOB_STATUSES = ("succeeded", "failed", "cancelled")
UNLOAD_TRIES = 100


@dataclass
class Tally:
    """HTTP outcomes of one kind of side work: counts by 'ok', '4xx status' and failures."""

    counts: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def record(self, what: str, resp: httpx.Response | None, error: Exception | None = None) -> bool:
        """Count one call; True when it succeeded."""
        if resp is not None and resp.status_code < 300:
            self.counts[f"{what} ok"] += 1
            return True
        if resp is not None and 400 <= resp.status_code < 500:
            self.counts[f"{what} {resp.status_code}"] += 1
            return False
        self.failures.append(f"{what}: " + (f"HTTP {resp.status_code}: {resp.text[:200]}" if resp is not None
                                            else f"{type(error).__name__}: {error}"))
        return False


async def _call(http: httpx.AsyncClient, tally: Tally, what: str, method: str, url: str, **kw) -> httpx.Response | None:
    try:
        resp = await http.request(method, url, **kw)
    except httpx.HTTPError as e:
        tally.record(what, None, e)
        return None
    tally.record(what, resp)
    return resp


async def churn_adapters(http: httpx.AsyncClient, base_url: str, adapters: dict[str, str], interval: float,
                         stop: asyncio.Event, tally: Tally) -> None:
    """Until `stop`: load each adapter (name -> path as the server sees it), wait, unload it, wait."""
    while not stop.is_set():
        for name, path in adapters.items():
            await _call(http, tally, "load", "POST", f"{base_url}/v1/load_lora_adapter",
                        json={"lora_name": name, "lora_path": path})
            await _wait(stop, interval)
            await _unload(http, base_url, name, interval / 4, tally)
            await _wait(stop, interval)


async def _unload(http: httpx.AsyncClient, base_url: str, name: str, retry_every: float, tally: Tally) -> None:
    """Unload `name`; while requests still use it the server refuses (409): try again a while."""
    for _ in range(UNLOAD_TRIES):
        resp = await _call(http, tally, "unload", "POST", f"{base_url}/v1/unload_lora_adapter",
                           json={"lora_name": name})
        if resp is None or resp.status_code != 409:
            return
        await asyncio.sleep(retry_every)


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass


@dataclass
class FineTuneReport:
    job_id: str | None = None
    status: str | None = None
    steps: int = 0
    trained_tokens: int = 0
    seconds: float = 0.0
    error: str | None = None


async def fine_tune(http: httpx.AsyncClient, base_url: str, model: str, train_file: Path, epochs: int,
                    batch_size: int, stop: asyncio.Event, wait: bool, tally: Tally) -> FineTuneReport:
    """Upload `train_file`, start a job on `model` and follow it until `stop` (with `wait`: until it ends)."""
    report, start = FineTuneReport(), time.perf_counter()
    resp = await _call(http, tally, "upload", "POST", f"{base_url}/v1/files", data={"purpose": "fine-tune"},
                       files={"file": (train_file.name, train_file.read_bytes())})
    if resp is None or resp.status_code >= 300:
        report.error = "upload refused" if resp is None else resp.text[:300]
        return report
    resp = await _call(http, tally, "create job", "POST", f"{base_url}/v1/fine_tuning/jobs",
                       json={"model": model, "training_file": resp.json()["id"], "suffix": "bench",
                             "hyperparameters": {"n_epochs": epochs, "batch_size": batch_size}})
    if resp is None or resp.status_code >= 300:
        report.error = "job refused" if resp is None else resp.text[:300]
        return report
    report.job_id, report.status = resp.json()["id"], resp.json()["status"]
    while report.status not in TERMINAL_JOB_STATUSES and (wait or not stop.is_set()):
        await asyncio.sleep(0.2)
        resp = await _call(http, tally, "poll job", "GET", f"{base_url}/v1/fine_tuning/jobs/{report.job_id}")
        if resp is not None and resp.status_code == 200:
            job = resp.json()
            report.status, report.trained_tokens = job["status"], job.get("trained_tokens") or 0
            report.error = (job.get("error") or {}).get("message") if job.get("error") else None
    resp = await _call(http, tally, "poll job", "GET", f"{base_url}/v1/fine_tuning/jobs/{report.job_id}/events",
                       params={"limit": 1000})
    if resp is not None and resp.status_code == 200:
        report.steps = max((e["data"]["step"] for e in resp.json()["data"]
                            if e.get("type") == "metrics" and e.get("data")), default=0)
    report.seconds = time.perf_counter() - start
    return report
