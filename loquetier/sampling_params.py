"""`SamplingParams`, shaped like vLLM's."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import RequestError


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop. temperature=0 means greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1           # -1 or 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0   # HF-style, over prompt and output tokens
    presence_penalty: float = 0.0     # OpenAI-style, over output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None       # number of top logprobs to return per token (0: only the chosen one)
    n: int = 1

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if self.max_tokens is None or self.max_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise RequestError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise RequestError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not -2 <= self.presence_penalty <= 2 or not -2 <= self.frequency_penalty <= 2:
            raise RequestError("presence_penalty and frequency_penalty must be in [-2, 2]")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise RequestError(f"logprobs must be in [0, 20], got {self.logprobs}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise RequestError(f"seed must fit in a signed 64-bit integer, got {self.seed}")
        if self.n < 1:
            raise RequestError(f"n must be at least 1, got {self.n}")
        if self.top_k is None:
            self.top_k = -1

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
