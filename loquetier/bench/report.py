"""Summary of a serving benchmark: outcome counts, latency percentiles, throughput and goodput,
as a dict (written as JSON) and as the table `loquetier bench serve` prints."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from .client import CANCELLED, COMPLETED, FAILED, REJECTED, RequestResult

PERCENTILES = (50, 90, 99)


@dataclass
class SLOs:
    """Goodput counts the completed requests that meet every SLO given (seconds; None: no limit)."""

    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None

    def met_by(self, r: RequestResult) -> bool:
        return all(limit is None or (value is not None and value <= limit)
                   for limit, value in ((self.ttft, r.ttft), (self.tpot, r.tpot), (self.e2e, r.e2e)))

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.ttft, self.tpot, self.e2e))


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile with linear interpolation between the closest ranks (numpy's default)."""
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _stats_ms(values: list[float]) -> dict:
    if not values:
        return {"mean": None, **{f"p{q}": None for q in PERCENTILES}}
    return {"mean": 1e3 * sum(values) / len(values), **{f"p{q}": 1e3 * percentile(values, q) for q in PERCENTILES}}


def summarize(results: list[RequestResult], duration: float, slos: SLOs) -> dict:
    """Counts, latency statistics (ms), throughput (per second of the run) and goodput."""
    outcomes = Counter(r.outcome for r in results)
    done = [r for r in results if r.outcome == COMPLETED]
    duration = max(duration, 1e-9)
    output_tokens = sum(r.output_tokens for r in done)
    input_tokens = sum(r.input_len for r in done)
    summary = {
        "requests": {"total": len(results),
                     **{k: outcomes.get(k, 0) for k in (COMPLETED, CANCELLED, REJECTED, FAILED)}},
        "rejected_by_status": dict(sorted(Counter(str(r.status) for r in results if r.outcome == REJECTED).items())),
        "failure_examples": sorted({f"{r.status}: {r.error}" for r in results if r.outcome == FAILED})[:5],
        "duration_s": duration,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "request_throughput": len(done) / duration,
        "output_token_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        "ttft_ms": _stats_ms([r.ttft for r in done if r.ttft is not None]),
        "tpot_ms": _stats_ms([r.tpot for r in done if r.tpot is not None]),
        "itl_ms": _stats_ms([gap for r in done for gap in r.itl]),
        "e2el_ms": _stats_ms([r.e2e for r in done if r.e2e is not None]),
    }
    if slos.any:
        good = sum(slos.met_by(r) for r in done)
        summary["slos_s"] = {"ttft": slos.ttft, "tpot": slos.tpot, "e2e": slos.e2e}
        summary["goodput"] = good / duration
        summary["slo_attainment"] = good / len(done) if done else 0.0
    return summary


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def format_table(summary: dict, side_load: dict | None = None) -> str:
    """The human-readable report, in the manner of `vllm bench serve`."""
    req = summary["requests"]
    rows = [("Requests sent", req["total"]), ("Completed", req["completed"]),
            ("Cancelled by the client", req["cancelled"]),
            ("Rejected (4xx)", req["rejected"] if not summary["rejected_by_status"] else
             f"{req['rejected']}  {summary['rejected_by_status']}"),
            ("Failed", req["failed"]), ("Duration (s)", summary["duration_s"]),
            ("Input tokens (completed)", summary["input_tokens"]),
            ("Output tokens (completed)", summary["output_tokens"]),
            ("Request throughput (req/s)", summary["request_throughput"]),
            ("Output token throughput (tok/s)", summary["output_token_throughput"]),
            ("Total token throughput (tok/s)", summary["total_token_throughput"])]
    if "goodput" in summary:
        rows += [("Goodput (req/s)", summary["goodput"]), ("SLO attainment", summary["slo_attainment"])]
    for key, title in (("ttft_ms", "TTFT (ms)"), ("tpot_ms", "TPOT (ms)"), ("itl_ms", "ITL (ms)"),
                       ("e2el_ms", "E2E latency (ms)")):
        stats = summary[key]
        names = ("mean", *(f"p{q}" for q in PERCENTILES))
        rows.append((title, "  ".join(f"{name} {_fmt(stats[name])}" for name in names)))
    for name, value in (side_load or {}).items():
        rows.append((name, value))
    width = max(len(title) for title, _ in rows)
    lines = [" Serving benchmark ".center(width + 40, "=")]
    lines += [f"{title:<{width}}  {_fmt(value)}" for title, value in rows]
    lines += ["=" * (width + 40)]
    for example in summary["failure_examples"]:
        lines.append(f"failure: {example}")
    return "\n".join(lines)
