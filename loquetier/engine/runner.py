"""ModelRunner (mechanism): run one mixed batch through the model; sample and compute losses."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.llama import LlamaModel
from .batch import IGNORE_INDEX, MixedBatch
from .sampler import Sampler
from .sequence import TokenLogprob


@dataclass
class StepResult:
    tokens: list[int]                        # one per batch.sample_seqs
    logprobs: list[TokenLogprob | None]
    loss_sums: torch.Tensor | None           # [num_loss_segments] summed token CE (graph for train rows)
    loss_counts: torch.Tensor | None         # [num_loss_segments] number of target tokens
    logits: torch.Tensor | None = None       # [num_sampled, V] when asked (tests)


class ModelRunner:
    def __init__(self, model: LlamaModel):
        self.model = model
        self.sampler = Sampler()

    def execute(self, batch: MixedBatch, keep_logits: bool = False) -> StepResult:
        ctx = batch.ctx
        has_train = any(s.train for s in batch.loss_segments)
        with torch.set_grad_enabled(has_train):
            hidden = self.model(batch.input_ids, ctx)
            loss_sums = loss_counts = None
            if batch.loss_segments:
                loss_sums, loss_counts = self._segment_losses(hidden[:ctx.attn.num_loss_tokens], batch)
        tokens, logprobs, logits = [], [], None
        if batch.sample_rows is not None:
            with torch.no_grad():
                logits = self.model.compute_logits(hidden.detach().index_select(0, batch.sample_rows))
                tokens, logprobs = self.sampler(logits, batch.sample_seqs)
        return StepResult(tokens, logprobs, loss_sums, loss_counts, logits if keep_logits else None)

    def _segment_losses(self, hidden: torch.Tensor, batch: MixedBatch):
        """Per-segment summed cross entropy over target tokens (HF causal-LM loss, unreduced)."""
        targets = batch.loss_targets
        keep = targets != IGNORE_INDEX
        logits = self.model.compute_logits(hidden).float()
        token_loss = F.cross_entropy(logits, targets.clamp_min(0), reduction="none") * keep
        n = len(batch.loss_segments)
        sums = torch.zeros(n, device=hidden.device, dtype=torch.float32).index_add(0, batch.loss_seg_ids, token_loss)
        counts = torch.zeros(n, device=hidden.device, dtype=torch.float32).index_add(0, batch.loss_seg_ids, keep.float())
        return sums, counts
