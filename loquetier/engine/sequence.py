"""`Sequence`: one generation request's state as it moves through the engine."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..sampling_params import SamplingParams

if TYPE_CHECKING:
    from .detokenizer import IncrementalText
    from .structured import Grammar

_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]   # (token id, logprob), best first


@dataclass(eq=False)  # identity, not field-by-field comparison: sequences live in lists and sets
class Sequence:
    """A request: prompt, generated tokens, KV blocks, adapter, and timing for metrics.

    With asynchronous scheduling the last one or two entries of `output_token_ids` can be
    placeholders for tokens still on the device: -(i + 1) names row i of the tokens the previous
    step sampled, which the next step's inputs read on the device (`ModelRunner.resolve_ids`).
    The engine writes the real ids in one step later, before anything else reads them."""

    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: str | None = None
    request_id: str = ""
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0     # tokens whose K/V are in the cache
    # prefix caching (prefix_cache.py): hashes of its leading full blocks, the adapter weights version
    # they were made with, how many leading blocks of block_table are findable by others, and how
    # many tokens its last admission found cached
    block_hashes: list[bytes] = field(default_factory=list)
    weights_version: int | None = None
    num_cached_blocks: int = 0
    num_cached_tokens: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_text_len: int | None = None  # where the text is cut by a stop string
    detok: IncrementalText | None = field(default=None, repr=False)   # the output's text, for stop strings
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    error: str | None = None          # why the engine ended it, when it did (finish_reason "abort")
    final_in_flight: bool = False     # the token in flight is its last (length limit): do not schedule it
    grammar: Grammar | None = None    # structured outputs: the matcher its tokens advance (structured.py)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without concatenating the whole history."""
        n = len(self.prompt_token_ids)
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        if end <= n:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED
