"""Batched sampling over all sequences of a step: penalties, temperature, top-k/p, min-p, seeds."""

from __future__ import annotations

import torch

from .sequence import Sequence, TokenLogprob


def _pad(rows: list[list[int]], fill: int, device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(width, 1)), fill, dtype=torch.int64)
    for i, r in enumerate(rows):
        if r:
            out[i, :len(r)] = torch.as_tensor(r)
    return out.to(device)


class Sampler:
    """Turns next-token logits [B, V] into tokens (and logprobs) for B sequences."""

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
        logits = logits.float()
        B, V = logits.shape
        dev = logits.device
        params = [s.params for s in seqs]
        want_logprobs = [p.logprobs is not None for p in params]
        raw_logprobs = torch.log_softmax(logits, -1) if any(want_logprobs) else None

        if any(p.has_penalties for p in params):
            logits = self._apply_penalties(logits, seqs)

        if all(p.greedy for p in params):
            tokens = logits.argmax(-1)
            return self._finish(tokens, raw_logprobs, params)
        temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=dev)
        greedy = torch.tensor([p.greedy for p in params], device=dev)
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
    def _finish(tokens, raw_logprobs, params):
        B = tokens.shape[0]
        token_list = tokens.tolist()

        logprobs: list[TokenLogprob | None] = [None] * B
        if raw_logprobs is not None:
            k = max(p.logprobs or 0 for p in params)
            chosen = raw_logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()
            top_v, top_i = (raw_logprobs.topk(k, -1) if k else (raw_logprobs[:, :0], raw_logprobs[:, :0].long()))
            top_v, top_i = top_v.tolist(), top_i.tolist()
            for i, p in enumerate(params):
                if p.logprobs is not None:
                    n = p.logprobs
                    logprobs[i] = TokenLogprob(token_list[i], chosen[i], list(zip(top_i[i][:n], top_v[i][:n])))
        return token_list, logprobs

    @staticmethod
    def _generator(seq: Sequence, device) -> torch.Generator:
        gen = getattr(seq, "generator", None)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(seq.params.seed)
            seq.generator = gen
        return gen

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        dev = logits.device
        B, V = logits.shape
        rep = torch.tensor([s.params.repetition_penalty for s in seqs], device=dev)
        pres = torch.tensor([s.params.presence_penalty for s in seqs], device=dev)
        freq = torch.tensor([s.params.frequency_penalty for s in seqs], device=dev)
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
        remove = ranks >= torch.tensor(top_k, device=dev)[:, None]
        probs = sorted_logits.softmax(-1)
        # top-p: drop a token if the mass before it already reaches p (always keep the first)
        cum_before = probs.cumsum(-1) - probs
        remove |= cum_before >= torch.tensor(top_p, device=dev)[:, None]
        remove |= probs < torch.tensor(min_p, device=dev)[:, None] * probs[:, :1]
        remove[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        return torch.empty_like(logits).scatter_(1, order, sorted_logits)
