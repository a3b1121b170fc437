"""Prometheus metrics of one server, in a registry of its own (several servers may share a process)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

PREFIX = "loquetier"

# Seconds. TTFT spans a cached short prompt (ms) to a long prefill behind a queue (tens of s).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
# Seconds per output token: a few ms (small model, small batch) to a stalled decode.
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
# Whole-request latencies and queueing delays.
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
                   30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0)


class ServerMetrics:
    """Every metric the server exports; `render()` gives the /metrics response."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)   # process_resident_memory_bytes etc., as vLLM exports them
        self.requests = Counter(f"{PREFIX}_requests", "Finished generation requests.",
                                ["model", "finished_reason"], registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "Tokens generated.", ["model"], registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Time to first token.",
                              ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram(f"{PREFIX}_time_per_output_token_seconds", "Mean time per output token after the first.",
                              ["model"], buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram(f"{PREFIX}_e2e_request_latency_seconds", "End-to-end request latency.",
                             ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram(f"{PREFIX}_request_queue_time_seconds", "Time a request waited before its first step.",
                               ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.running = Gauge(f"{PREFIX}_num_requests_running", "Requests in the running batch.", registry=r)
        self.waiting = Gauge(f"{PREFIX}_num_requests_waiting", "Requests waiting to be scheduled.", registry=r)
        self.kv_usage = Gauge(f"{PREFIX}_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0..1).",
                              registry=r)
        self.adapters = Gauge(f"{PREFIX}_lora_adapters_loaded", "LoRA adapters resident, by device (gpu|cpu).",
                              ["device"], registry=r)
        self.job_tokens_per_s = Gauge(f"{PREFIX}_training_tokens_per_second", "Training throughput of a job.",
                                      ["job_id"], registry=r)
        self.job_loss = Gauge(f"{PREFIX}_training_loss", "Latest training loss of a job.", ["job_id"], registry=r)
        # vLLM's prefix cache metrics: tokens looked up in the cache, and those found there
        self.prefix_cache_queries = Counter(f"{PREFIX}_prefix_cache_queries",
                                            "Prompt tokens looked up in the prefix cache.", registry=r)
        self.prefix_cache_hits = Counter(f"{PREFIX}_prefix_cache_hits",
                                         "Prompt tokens whose KV came from the prefix cache.", registry=r)
        self._prefix_seen = (0, 0)
        self.slo_attainment = Gauge(f"{PREFIX}_slo_attainment_ratio",
                                    "Fraction of recent requests that met their TTFT/TPOT SLOs (0..1).", registry=r)

    def observe_request(self, model: str, ttft: float | None, tpot: float | None, e2e: float,
                        queue: float | None, finished_reason: str, prompt_tokens: int = 0,
                        completion_tokens: int = 0) -> None:
        """Record one finished request; a None timing (no token produced, a single token) is skipped."""
        self.requests.labels(model=model, finished_reason=finished_reason).inc()
        if prompt_tokens:
            self.prompt_tokens.labels(model=model).inc(prompt_tokens)
        if completion_tokens:
            self.generation_tokens.labels(model=model).inc(completion_tokens)
        if ttft is not None:
            self.ttft.labels(model=model).observe(ttft)
        if tpot is not None:
            self.tpot.labels(model=model).observe(tpot)
        if queue is not None:
            self.queue.labels(model=model).observe(queue)
        self.e2e.labels(model=model).observe(e2e)

    def set_engine_gauges(self, running: int, waiting: int, kv_usage: float,
                          adapters_gpu: int, adapters_cpu: int) -> None:
        """Snapshot of the engine's state, set once per step or per scrape."""
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_usage.set(kv_usage)
        self.adapters.labels(device="gpu").set(adapters_gpu)
        self.adapters.labels(device="cpu").set(adapters_cpu)

    def set_prefix_cache(self, queries: int, hits: int) -> None:
        """The engine's running totals (tokens); the counters advance by what is new since last time."""
        seen_q, seen_h = self._prefix_seen
        if queries > seen_q:
            self.prefix_cache_queries.inc(queries - seen_q)
        if hits > seen_h:
            self.prefix_cache_hits.inc(hits - seen_h)
        self._prefix_seen = (max(queries, seen_q), max(hits, seen_h))

    def set_job(self, job_id: str, tokens_per_s: float, loss: float | None) -> None:
        """Latest throughput and loss of a training job."""
        self.job_tokens_per_s.labels(job_id=job_id).set(tokens_per_s)
        if loss is not None:
            self.job_loss.labels(job_id=job_id).set(loss)

    def remove_job(self, job_id: str) -> None:
        """Drop a finished job's series so they do not linger at their last value."""
        for gauge in (self.job_tokens_per_s, self.job_loss):
            try:
                gauge.remove(job_id)
            except KeyError:
                pass

    def set_slo_attainment(self, fraction: float) -> None:
        self.slo_attainment.set(fraction)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type, for GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
