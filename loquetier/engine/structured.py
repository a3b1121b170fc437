"""Structured outputs: a request's output follows a grammar (a JSON schema, or any JSON object).

Each such request has its own matcher, advanced on the host over every token it samples. A step
that samples grammar rows fills one packed int32 bitmask for them on the host (bit t of a row:
token t is allowed), sends it to the device with one non-blocking copy, and the sampler sets the
forbidden tokens' logits to -inf. The mask is filled after the step's forward is launched, so it
overlaps the GPU. A row's next mask needs its previous token on the host, so such steps run
synchronously (`SamplingParams.needs_tokens_on_host`).

The grammar library is llguidance: MIT-licensed, one abi3 wheel per platform (CPython 3.9+, so
3.11 and 3.12 alike) with no Python dependencies, masks in tens of microseconds for a 128k
vocabulary with no per-schema precompilation over the vocabulary, and a full JSON-schema compiler.
vLLM and SGLang ship it as a backend. xgrammar would add its own requirements on torch, transformers,
triton and apache-tvm-ffi. outlines-core builds an index over the whole vocabulary per schema (slow
for large schemas) and turns schemas into regular expressions, which cannot express recursion.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch

from ..errors import RequestError
from ..sampling_params import StructuredOutputsParams

if TYPE_CHECKING:   # imported where first used: an engine that never sees a grammar does not load it
    import llguidance

# Fixed separators and no other whitespace (the layout `json.dumps` writes): a model cannot pad the
# output with whitespace until max_tokens, which vLLM's `disable-any-whitespace` exists to prevent.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
JSON_OBJECT_SCHEMA = {"type": "object"}
MAX_CACHED_GRAMMARS = 64


class Grammar:
    """One request's matcher, advanced over each token the request samples."""

    __slots__ = ("matcher",)

    def __init__(self, matcher: llguidance.LLMatcher):
        self.matcher = matcher

    def accept(self, token: int) -> bool:
        """Consume a sampled token; True when the output is complete (nothing but EOS may follow)
        or the matcher failed (`error`)."""
        self.matcher.consume_token(token)
        return self.matcher.is_stopped()

    @property
    def error(self) -> str:
        return self.matcher.get_error()


class GrammarCompiler:
    """Compiles grammars for one tokenizer and keeps the newest ones. Thread-safe, so the server can
    compile a request's schema off the engine thread before the engine sees the request."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: set[int]):
        self.hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._grammars: OrderedDict[str, str] = OrderedDict()   # schema -> checked llguidance grammar
        self._lock = threading.Lock()

    def tokenizer(self) -> llguidance.LLTokenizer:
        """The vocabulary as llguidance reads it, built on first use (about a second for 128k tokens)."""
        import llguidance.hf
        with self._lock:
            if self._tokenizer is None:
                if self.hf_tokenizer is None:
                    raise RequestError("structured outputs need the model's tokenizer, and this model has none")
                try:
                    self._tokenizer = llguidance.hf.from_tokenizer(self.hf_tokenizer, n_vocab=self.vocab_size,
                                                                   eos_token=self.eos_token_ids)
                except ValueError as e:   # a slow (Python) tokenizer
                    raise RequestError(f"structured outputs need a fast tokenizer: {e}") from None
            return self._tokenizer

    def compile(self, spec: StructuredOutputsParams) -> str:
        """The llguidance grammar of `spec`, checked and cached; raises RequestError for a schema
        that is invalid or uses a feature the compiler does not support."""
        schema: Any = JSON_OBJECT_SCHEMA if spec.json_object else spec.json
        try:
            key = schema if isinstance(schema, str) else json.dumps(schema)   # key order is output order: kept
        except (TypeError, ValueError) as e:
            raise RequestError(f"the JSON schema is not JSON: {e}") from None
        with self._lock:
            grammar = self._grammars.get(key)
            if grammar is not None:
                self._grammars.move_to_end(key)
                return grammar
        import llguidance
        tokenizer = self.tokenizer()
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
            matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        except (ValueError, TypeError, RuntimeError) as e:
            raise RequestError(f"the JSON schema cannot be used: {e}") from None
        if matcher.is_error():
            raise RequestError(f"the JSON schema cannot be used: {matcher.get_error()}")
        with self._lock:
            self._grammars[key] = grammar
            while len(self._grammars) > MAX_CACHED_GRAMMARS:
                self._grammars.popitem(last=False)
        return grammar

    def grammar(self, spec: StructuredOutputsParams) -> Grammar:
        """A new request's matcher. Built from the grammar, not copied from another matcher: copies
        share one lexer cache behind a lock, and their masks took 3x as long (64 rows, 128k vocabulary)."""
        import llguidance
        return Grammar(llguidance.LLMatcher(self.tokenizer(), self.compile(spec), log_level=0))


class TokenBitmask:
    """Masks the logits of a step's grammar rows with one packed bitmask built on the host."""

    def __init__(self):
        self.executor: llguidance.LLExecutor | None = None   # made on first use
        self._bit_positions: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def apply(self, logits: torch.Tensor, rows: list[int], grammars: list[Grammar]) -> torch.Tensor:
        """`logits` [B, V] with -inf where row `rows[i]`'s grammar forbids a token (a new tensor)."""
        if self.executor is None:
            import llguidance
            self.executor = llguidance.LLExecutor()
        V, dev = logits.shape[1], logits.device
        words, n = (V + 31) // 32, len(rows)
        # one pinned buffer: n masks of `words` int32, then the n row indices
        host = torch.empty(n * words + n, dtype=torch.int32, pin_memory=dev.type == "cuda")
        host[n * words:] = torch.tensor(rows, dtype=torch.int32)
        self.executor.unsafe_compute_mask_ptr([(g.matcher, i) for i, g in enumerate(grammars)],
                                               host.data_ptr(), words * 4, n)
        flat = host.to(dev, non_blocking=True)
        masks, row_ids = flat[:n * words].view(n, words), flat[n * words:].long()
        word_of, bit_of = self._positions(V, dev)
        allowed = (masks.index_select(1, word_of) >> bit_of) & 1        # [n, V]
        masked = logits.index_select(0, row_ids).masked_fill(allowed == 0, float("-inf"))
        return logits.index_put((row_ids,), masked)

    def _positions(self, V: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Token t's word (t // 32) and bit (t % 32) in a packed mask, made once per vocabulary."""
        key = (V, dev)
        if key not in self._bit_positions:
            t = torch.arange(V, device=dev, dtype=torch.int32)
            self._bit_positions[key] = (t // 32, t % 32)
        return self._bit_positions[key]
