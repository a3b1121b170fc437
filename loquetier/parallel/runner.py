"""`TPModelRunner`: the model runner of every rank; on rank 0 each step also sends its plan.

Rank 0 sends a step's plan before running it; the workers run the same step from it (forward,
losses, and with training rows the backward into their shards' gradient buffers), so every rank
issues the same collectives in the same order. The sampled tokens go from rank 0 to every rank's
`last_tokens` by a device broadcast (the next step's placeholder inputs read them there, without
the host). Training losses are computed on vocabulary shards.
"""

from __future__ import annotations

import torch

from ..engine.batch import HostBatch, MixedBatch
from ..engine.runner import ModelRunner, StepResult
from ..engine.sampler import SampledTokens
from .channel import Op
from .ops import vocab_parallel_cross_entropy
from .plan import decode_parts, host_batch_parts


class _NoSampler:
    """A worker's sampler: rank 0 samples; a worker gets the tokens by broadcast."""

    def sample(self, logits, seqs):
        return None


class TPModelRunner(ModelRunner):
    def __init__(self, model, max_sampled_rows: int, tp):
        super().__init__(model, max_sampled_rows)
        self.tp = tp
        if not tp.is_leader:
            self.sampler = _NoSampler()

    # ------------------------------------------------------------------ rank 0: steps and their plans
    def prepare(self, host: HostBatch) -> MixedBatch:
        self.tp.channel.send(Op.STEP, host_batch_parts(host))
        return super().prepare(host)

    def execute_bucketed(self, host: HostBatch) -> tuple[StepResult, list]:
        if self.tp.is_leader:
            self.tp.channel.send(Op.BUCKETED, host_batch_parts(host))
        return super().execute_bucketed(host)

    def execute_decode_graph(self, scheduled, slot_of, block_size):
        """As on one device; the workers replay their graph from the same metadata."""
        seqs, arrays = self.decode_metadata(scheduled, slot_of, block_size)
        with_lora = bool((arrays[3] >= 0).any())
        self.tp.channel.send(Op.DECODE, decode_parts(arrays, with_lora))
        logits = self.graphs.run(*arrays, with_lora)
        return seqs, StepResult(self.sampler.sample(logits, seqs), None, None, None)

    def publish(self, sampled: SampledTokens) -> None:
        super().publish(sampled)
        self.receive_tokens(sampled.tokens.shape[0])

    def drop_train_graphs(self) -> None:
        if self.tp.is_leader:
            self.tp.channel.send(Op.DROP_TRAIN_GRAPHS)
        super().drop_train_graphs()

    # ------------------------------------------------------------------ every rank
    def receive_tokens(self, n: int) -> None:
        """Rank 0's `last_tokens[:n]` into every rank's."""
        self.tp.broadcast_(self.last_tokens[:n])

    def _token_losses(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(self.model.compute_logits(hidden, gather=False).float(), targets, self.tp)
