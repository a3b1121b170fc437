"""`SamplingParams`, shaped like vLLM's."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import RequestError

MAX_LOGIT_BIAS = 100.0   # OpenAI's range: -100 bans a token, +100 all but forces it


@dataclass
class StructuredOutputsParams:
    """Constrain the output to a grammar, like vLLM's: `json` (a JSON schema, as a dict or a JSON
    string) or `json_object=True` (any JSON object). Exactly one of them."""

    json: dict[str, Any] | str | None = None
    json_object: bool = False

    def __post_init__(self):
        if (self.json is not None) == bool(self.json_object):
            raise RequestError("structured outputs take exactly one of `json` (a schema) and `json_object=True`")


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
    logit_bias: dict[int, float] | None = None       # token id -> added to its logit, in [-100, 100]
    structured_outputs: StructuredOutputsParams | None = None
    # logit_bias as arrays (token ids int64, biases float32), made once so a step only concatenates them
    bias_arrays: tuple[np.ndarray, np.ndarray] | None = field(default=None, init=False, repr=False, compare=False)

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
        if self.logit_bias:
            self._check_logit_bias()
            self.bias_arrays = (np.fromiter(self.logit_bias.keys(), dtype=np.int64, count=len(self.logit_bias)),
                                np.fromiter(self.logit_bias.values(), dtype=np.float32, count=len(self.logit_bias)))
        else:
            self.logit_bias = None

    def _check_logit_bias(self) -> None:
        for token, bias in self.logit_bias.items():
            if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < 2**31:   # no vocab is larger
                raise RequestError(f"logit_bias keys must be token ids (non-negative integers), got {token!r}",
                                   param="logit_bias")
            if (not isinstance(bias, (int, float)) or isinstance(bias, bool) or not math.isfinite(bias)
                    or abs(bias) > MAX_LOGIT_BIAS):
                raise RequestError(f"logit_bias values must be numbers in [-100, 100], got {bias!r} for token "
                                   f"{token}", param="logit_bias")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def needs_tokens_on_host(self) -> bool:
        """Sampling the next token reads the previous ones on the host (penalties count them, a
        grammar advances over them), so steps with this request run synchronously."""
        return self.has_penalties or self.structured_outputs is not None
