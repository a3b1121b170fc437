"""EngineStats: per-request latencies, SLO attainment and per-job training figures, in one object
that the server's /metrics endpoint and the benchmarks read."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from .prefix_cache import PrefixCacheStats
from .sequence import Sequence


@dataclass
class RequestStats:
    request_id: str
    adapter: str | None
    arrival: float
    queue_delay: float | None     # arrival -> first scheduled
    ttft: float | None            # arrival -> first token
    tpot: float | None            # mean time per output token after the first
    e2e: float | None
    prompt_tokens: int
    output_tokens: int
    finish_reason: str | None
    meets_slo: bool               # TTFT and TPOT both within their SLOs (unset SLOs always met)
    admitted_in_time: bool        # the paper's criterion: scheduled within `admit_deadline`


class EngineStats:
    def __init__(self, slo_ttft: float | None = None, slo_tpot: float | None = None,
                 admit_deadline: float = 6.0, keep: int = 100_000):
        self.slo_ttft, self.slo_tpot, self.admit_deadline = slo_ttft, slo_tpot, admit_deadline
        self.finished: deque[RequestStats] = deque(maxlen=keep)
        self.listeners: list = []   # callables(RequestStats), e.g. Prometheus
        self.steps = 0
        self.train_tokens = 0
        self.started = time.monotonic()
        self.prefix_cache = PrefixCacheStats()   # the engine's scheduler counts into this one

    def on_finish(self, seq: Sequence) -> RequestStats:
        end = seq.finish_time or time.monotonic()
        ttft = None if seq.first_token_time is None else seq.first_token_time - seq.arrival_time
        n_out = len(seq.output_token_ids)
        tpot = (end - seq.first_token_time) / (n_out - 1) if seq.first_token_time and n_out > 1 else None
        queue = None if seq.first_scheduled_time is None else seq.first_scheduled_time - seq.arrival_time
        ok_ttft = self.slo_ttft is None or (ttft is not None and ttft <= self.slo_ttft)
        ok_tpot = self.slo_tpot is None or tpot is None or tpot <= self.slo_tpot
        st = RequestStats(seq.request_id, seq.adapter, seq.arrival_time, queue, ttft, tpot, end - seq.arrival_time,
                          len(seq.prompt_token_ids), n_out, seq.finish_reason,
                          ok_ttft and ok_tpot and seq.finish_reason != "abort",
                          queue is not None and queue <= self.admit_deadline)
        self.finished.append(st)
        for listener in self.listeners:
            listener(st)
        return st

    def on_step(self, info: dict) -> None:
        self.steps += 1
        self.train_tokens += info["num_train_tokens"]

    def slo_attainment(self) -> float | None:
        done = [s for s in self.finished if s.finish_reason != "abort"]
        return sum(s.meets_slo for s in done) / len(done) if done else None

    def admitted_attainment(self) -> float | None:
        done = [s for s in self.finished if s.finish_reason != "abort"]
        return sum(s.admitted_in_time for s in done) / len(done) if done else None
