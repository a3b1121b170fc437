"""Batched sampling over all sequences of a step: grammar masks, logit bias, penalties, temperature,
top-k/p, min-p, seeds.

Logprobs follow vLLM's default (`raw_logprobs`): the model's distribution after the grammar mask
(tokens a grammar forbids get -inf, as vLLM masks logits before its sampler) but before logit
bias, penalties and temperature, so a biased token is chosen but its logprob is the model's own.

`Sampler.sample` only queues device work and returns `SampledTokens`; its `to_host()` starts the
copies to the host without waiting, and `wait()` on the result waits for them. The engine
uses the gap to launch its next step before reading this one's tokens (asynchronous scheduling).
Per-row parameters go to the device by non-blocking copies from pinned memory: a blocking copy
would wait for every kernel queued before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .sequence import Sequence, TokenLogprob
from .structured import TokenBitmask


def _to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host tensor on `device` without a host sync."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _pad(rows: list[list[int]], fill: int, device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(width, 1)), fill, dtype=torch.int64)
    for i, r in enumerate(rows):
        if r:
            out[i, :len(r)] = torch.as_tensor(r)
    return _to_device(out, torch.int64, device)


@dataclass
class SampledTokens:
    """A step's sampled tokens (and logprobs when any row asked): on the device from `Sampler.sample`;
    `to_host()` gives the same in pinned host buffers filling by async copies, `wait()` reads them."""

    tokens: torch.Tensor                    # [B] int64
    chosen: torch.Tensor | None             # [B] logprob of each chosen token
    top_v: torch.Tensor | None              # [B, k] top logprobs
    top_i: torch.Tensor | None              # [B, k] their token ids
    logprob_counts: list[int | None]        # per row: how many top logprobs it asked for (None: none)
    event: torch.cuda.Event | None = None   # recorded after the copies to the host

    def to_host(self) -> SampledTokens:
        parts = [self.tokens, self.chosen, self.top_v, self.top_i]
        if self.tokens.device.type != "cuda":
            return self
        host = [None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                for t in parts]
        event = torch.cuda.Event()
        event.record()
        return SampledTokens(*host, self.logprob_counts, event)

    def wait(self) -> tuple[list[int], list[TokenLogprob | None]]:
        if self.event is not None:
            self.event.synchronize()
        token_list = self.tokens.tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(token_list)
        if self.chosen is not None:
            chosen, top_v, top_i = self.chosen.tolist(), self.top_v.tolist(), self.top_i.tolist()
            for i, n in enumerate(self.logprob_counts):
                if n is not None:
                    logprobs[i] = TokenLogprob(token_list[i], chosen[i], list(zip(top_i[i][:n], top_v[i][:n])))
        return token_list, logprobs


class Sampler:
    """Turns next-token logits [B, V] into tokens (and logprobs) for B sequences."""

    def __init__(self):
        self.bitmask = TokenBitmask()

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
        """Sample and wait for the tokens on the host."""
        return self.sample(logits, seqs).to_host().wait()

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampledTokens:
        """Queue the sampling of one token per row; nothing here waits for the device."""
        params = [s.params for s in seqs]
        grammar_rows = [i for i, s in enumerate(seqs) if s.grammar is not None]
        if not grammar_rows and all(p.greedy and p.logprobs is None and p.bias_arrays is None
                                    and not p.has_penalties for p in params):
            # plain greedy: the argmax of the model's dtype is the argmax of its exact fp32 cast, so skip
            # the cast (at batch 256 it writes and reads 128 MB of logits)
            return self._finish(logits.argmax(-1), None, params)
        logits = logits.float()
        B, V = logits.shape
        dev = logits.device
        if grammar_rows:
            logits = self.bitmask.apply(logits, grammar_rows, [seqs[i].grammar for i in grammar_rows])
        want_logprobs = [p.logprobs is not None for p in params]
        raw_logprobs = torch.log_softmax(logits, -1) if any(want_logprobs) else None

        if any(p.bias_arrays is not None for p in params):
            logits = self._apply_logit_bias(logits, params)
        if any(p.has_penalties for p in params):
            logits = self._apply_penalties(logits, seqs)

        if all(p.greedy for p in params):
            tokens = logits.argmax(-1)
            return self._finish(tokens, raw_logprobs, params)
        row = _to_device([[p.temperature if p.temperature > 0 else 1.0, float(p.greedy)] for p in params],
                         torch.float32, dev)
        temps, greedy = row[:, 0], row[:, 1] > 0
        scaled = logits / temps[:, None]
        scaled = self._filter(scaled, params)
        probs = scaled.softmax(-1)
        # Gumbel-max in its exponential form: argmax(p / q), q ~ Exp(1); seeded rows draw their own q
        q = torch.empty_like(probs).exponential_()
        for i, s in enumerate(seqs):
            if s.params.seed is not None and not s.params.greedy:
                q[i] = torch.empty(V, device=dev).exponential_(generator=self._generator(s, dev))
        sampled = (probs / q).argmax(-1)
        tokens = torch.where(greedy, logits.argmax(-1), sampled)
        return self._finish(tokens, raw_logprobs, params)

    @staticmethod
    def _finish(tokens, raw_logprobs, params) -> SampledTokens:
        counts = [p.logprobs for p in params]
        if raw_logprobs is None:
            return SampledTokens(tokens, None, None, None, counts)
        k = max(p.logprobs or 0 for p in params)
        chosen = raw_logprobs.gather(1, tokens[:, None]).squeeze(1)
        top_v, top_i = raw_logprobs.topk(k, -1) if k else (raw_logprobs[:, :0], raw_logprobs[:, :0].long())
        return SampledTokens(tokens, chosen, top_v, top_i, counts)

    @staticmethod
    def _generator(seq: Sequence, device) -> torch.Generator:
        gen = getattr(seq, "generator", None)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(seq.params.seed)
            seq.generator = gen
        return gen

    @staticmethod
    def _apply_logit_bias(logits: torch.Tensor, params) -> torch.Tensor:
        """Add each row's logit_bias: one copy of (row, token, bias) triples, one scatter-add."""
        rows = [i for i, p in enumerate(params) if p.bias_arrays is not None]
        ids = [params[i].bias_arrays[0] for i in rows]
        triples = np.stack([np.repeat(rows, [len(t) for t in ids]), np.concatenate(ids),
                            np.concatenate([params[i].bias_arrays[1] for i in rows])]).astype(np.float64)
        dev = _to_device(torch.from_numpy(triples), torch.float64, logits.device)   # token ids exact below 2**53
        row, token, bias = dev[0].long(), dev[1].long(), dev[2].float()
        return logits.index_put((row, token), bias, accumulate=True)

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        dev = logits.device
        B, V = logits.shape
        row = _to_device([[s.params.repetition_penalty, s.params.presence_penalty, s.params.frequency_penalty]
                          for s in seqs], torch.float32, dev)
        rep, pres, freq = row[:, 0], row[:, 1], row[:, 2]
        out_ids = _pad([s.output_token_ids for s in seqs], V, dev)
        counts = torch.zeros(B, V + 1, device=dev).scatter_add_(1, out_ids, torch.ones_like(out_ids, dtype=torch.float))[:, :V]
        all_ids = _pad([s.all_token_ids for s in seqs], V, dev)
        seen = torch.zeros(B, V + 1, dtype=torch.bool, device=dev).scatter_(1, all_ids, True)[:, :V]
        # HF repetition penalty: divide positive logits, multiply negative ones, for any seen token
        penalized = torch.where(logits > 0, logits / rep[:, None], logits * rep[:, None])
        logits = torch.where(seen, penalized, logits)
        # OpenAI presence/frequency penalties over generated tokens
        return logits - freq[:, None] * counts - pres[:, None] * (counts > 0).float()

    @staticmethod
    def _filter(logits: torch.Tensor, params) -> torch.Tensor:
        dev = logits.device
        V = logits.shape[1]
        top_k = [p.top_k if p.top_k and p.top_k > 0 else V for p in params]
        top_p = [p.top_p if p.top_p < 1.0 else 2.0 for p in params]  # 2.0: off (rounding-safe)
        min_p = [p.min_p for p in params]
        if all(k >= V for k in top_k) and all(p >= 1.0 for p in top_p) and all(m <= 0 for m in min_p):
            return logits
        sorted_logits, order = logits.sort(-1, descending=True)
        ranks = torch.arange(V, device=dev)[None, :]
        row = _to_device([list(r) for r in zip(top_k, top_p, min_p)], torch.float32, dev)
        remove = ranks >= row[:, 0:1]   # k <= V < 2**24: exact in float32
        probs = sorted_logits.softmax(-1)
        # top-p: drop a token if the mass before it already reaches p (always keep the first)
        cum_before = probs.cumsum(-1) - probs
        remove |= cum_before >= row[:, 1:2]
        remove |= probs < row[:, 2:3] * probs[:, :1]
        remove[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        return torch.empty_like(logits).scatter_(1, order, sorted_logits)
