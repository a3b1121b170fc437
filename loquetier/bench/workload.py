"""The requests a serving benchmark sends: when each arrives, its lengths, prompt, model and whether
the client cancels it. Everything is drawn from one seeded RNG, so a workload is reproducible.

Arrivals are open-loop (a request is sent at its time whether or not earlier ones finished):
Poisson at a given rate, or the arrival seconds of a trace file (one integer per line, as the
BurstGPT trace shipped beside the repository) scaled in time. Lengths are fixed, or drawn from a
lognormal with ShareGPT's means (prompt 161, output 338 tokens; capped). No text ships with the
benchmark, so prompts are random token ids (exact lengths, /v1/completions) or random words.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

SHAREGPT_PROMPT_MEAN, SHAREGPT_OUTPUT_MEAN = 161, 338
LOGNORMAL_SIGMA = 1.0   # long-tailed, as the chat datasets are
DEFAULT_TRACE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "burstgpt_arrivals.txt"
WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one "
         "had by word but not what all were we when your can said there use an each which she do how their "
         "if will up other about out many then them these so some her would make like him into time has look "
         "two more write go see number no way could people my than first water been call who oil its now find "
         "long down day did get come made may part over new sound take only little work know place year live "
         "me back give most very after thing our just name good sentence man think say great where help").split()


@dataclass
class WorkloadConfig:
    """What load to generate (the `loquetier bench serve` flags of the same names)."""

    num_requests: int = 100
    arrival: str = "poisson"             # "poisson" | "trace"
    request_rate: float = math.inf       # requests/s of the Poisson process; inf sends all at once
    trace: str = str(DEFAULT_TRACE)      # arrival seconds, one integer per line
    time_scale: float = 1.0              # trace seconds are multiplied by this (0.1: ten times the load)
    lengths: str = "sharegpt"            # "sharegpt" | "fixed"
    input_len: int = 128                 # fixed lengths
    output_len: int = 128
    max_input_len: int = 1024            # caps of the ShareGPT-like draws
    max_output_len: int = 1024
    prompt_kind: str = "tokens"          # "tokens" (random ids, exact length) | "words"
    token_id_range: tuple[int, int] = (10, 250)   # [lo, hi): ids every vocabulary has
    models: tuple[str, ...] = ()         # dealt round-robin: request i goes to models[i % len]
    cancel_rate: float = 0.0             # share of requests the client abandons mid-stream
    seed: int = 0

    def validate(self) -> None:
        if self.num_requests < 1:
            raise ValueError("num_requests must be at least 1")
        if self.arrival not in ("poisson", "trace"):
            raise ValueError(f"arrival must be 'poisson' or 'trace', got {self.arrival!r}")
        if self.arrival == "poisson" and not self.request_rate > 0:
            raise ValueError("request_rate must be positive (inf sends every request at once)")
        if self.lengths not in ("sharegpt", "fixed"):
            raise ValueError(f"lengths must be 'sharegpt' or 'fixed', got {self.lengths!r}")
        if self.prompt_kind not in ("tokens", "words"):
            raise ValueError(f"prompt_kind must be 'tokens' or 'words', got {self.prompt_kind!r}")
        if min(self.input_len, self.output_len, self.max_input_len, self.max_output_len) < 1:
            raise ValueError("lengths must be at least 1")
        if not 0.0 <= self.cancel_rate <= 1.0:
            raise ValueError("cancel_rate must be in [0, 1]")
        lo, hi = self.token_id_range
        if not 0 <= lo < hi:
            raise ValueError(f"token_id_range must be LO:HI with 0 <= LO < HI, got {lo}:{hi}")
        if not self.models:
            raise ValueError("at least one model is needed")


@dataclass
class RequestSpec:
    """One request of the workload."""

    index: int
    arrival: float                  # seconds after the start
    model: str
    prompt: list[int] | str
    input_len: int                  # tokens (words for word prompts)
    output_len: int                 # max_tokens
    cancel_after: int | None        # the client closes the stream after this many token chunks


def arrival_times(cfg: WorkloadConfig, rng: random.Random) -> list[float]:
    """Seconds after the start at which each request is sent."""
    if cfg.arrival == "trace":
        seconds = [int(line) for line in Path(cfg.trace).read_text().split()]
        if len(seconds) < cfg.num_requests:
            raise ValueError(f"{cfg.trace} holds {len(seconds)} arrivals; {cfg.num_requests} were asked for")
        seconds = sorted(seconds[:cfg.num_requests])
        return [(s - seconds[0]) * cfg.time_scale for s in seconds]
    if math.isinf(cfg.request_rate):
        return [0.0] * cfg.num_requests
    t, times = 0.0, []
    for _ in range(cfg.num_requests):
        times.append(t)
        t += rng.expovariate(cfg.request_rate)
    return times


def lognormal_length(rng: random.Random, mean: float, cap: int) -> int:
    """A lognormal draw with the given mean (sigma LOGNORMAL_SIGMA), rounded into [1, cap]."""
    mu = math.log(mean) - LOGNORMAL_SIGMA ** 2 / 2
    return int(min(cap, max(1, round(rng.lognormvariate(mu, LOGNORMAL_SIGMA)))))


def build_workload(cfg: WorkloadConfig) -> list[RequestSpec]:
    """Every request of the benchmark, in arrival order."""
    cfg.validate()
    rng = random.Random(cfg.seed)
    specs = []
    for i, arrival in enumerate(arrival_times(cfg, rng)):
        if cfg.lengths == "fixed":
            n_in, n_out = cfg.input_len, cfg.output_len
        else:
            n_in = lognormal_length(rng, SHAREGPT_PROMPT_MEAN, cfg.max_input_len)
            n_out = lognormal_length(rng, SHAREGPT_OUTPUT_MEAN, cfg.max_output_len)
        if cfg.prompt_kind == "tokens":
            prompt: list[int] | str = [rng.randrange(*cfg.token_id_range) for _ in range(n_in)]
        else:
            prompt = " ".join(rng.choice(WORDS) for _ in range(n_in))
        cut = rng.randint(1, max(1, n_out - 1))   # drawn for every request: the rate changes nothing else
        cancel = cut if rng.random() < cfg.cancel_rate else None
        specs.append(RequestSpec(i, arrival, cfg.models[i % len(cfg.models)], prompt, n_in, n_out, cancel))
    return specs
