"""`TPModelRunner`: the model runner of every rank; on rank 0 each step also sends its plan.

Rank 0 sends a step's plan before running it; the workers run the same step from it, so both
sides issue the same collectives in the same order. The sampled tokens go from rank 0 to every
rank's `last_tokens` by a device broadcast (the next step's placeholder inputs read them there,
without the host). Training losses are computed on vocabulary shards.
"""

from __future__ import annotations

import numpy as np
import torch

from ..engine.batch import HostBatch, MixedBatch
from ..engine.runner import ModelRunner, StepResult
from ..engine.sampler import SampledTokens
from .adapters import gather_full
from .channel import Op
from .ops import backward_to_workers, vocab_parallel_cross_entropy
from .plan import decode_parts, floats, host_batch_parts


class _NoSampler:
    """A worker's sampler: rank 0 samples; a worker gets the tokens by broadcast."""

    def sample(self, logits, seqs):
        return None


class TPModelRunner(ModelRunner):
    def __init__(self, model, max_sampled_rows: int, tp, adapters):
        super().__init__(model, max_sampled_rows)
        self.tp = tp
        self.adapters = adapters   # rank 0: a TPAdapterManager (the trained adapters' tensors)
        if not tp.is_leader:
            self.sampler = _NoSampler()

    # ------------------------------------------------------------------ rank 0: steps and their plans
    def prepare(self, host: HostBatch) -> MixedBatch:
        self.tp.channel.send(Op.STEP, host_batch_parts(host))
        return super().prepare(host)

    def execute_decode_graph(self, scheduled, slot_of, block_size):
        """As on one device; the workers replay their graph from the same metadata."""
        seqs, arrays = self.decode_metadata(scheduled, slot_of, block_size)
        with_lora = bool((arrays[3] >= 0).any())
        self.tp.channel.send(Op.DECODE, decode_parts(arrays, with_lora))
        logits = self.graphs.run(*arrays, with_lora)
        return seqs, StepResult(self.sampler.sample(logits, seqs), None, None, None)

    def execute(self, batch: MixedBatch, keep_logits: bool = False) -> StepResult:
        result = super().execute(batch, keep_logits)
        if self.tp.is_leader and result.loss_sums is not None and result.loss_sums.requires_grad:
            result.loss_sums = backward_to_workers(result.loss_sums, self._send_backward)
        return result

    def _send_backward(self, grad: torch.Tensor) -> None:
        self.tp.channel.send(Op.BACKWARD, [np.asarray([grad.numel()])])
        self.tp.broadcast_(grad)

    def execute_train(self, host: HostBatch, weights: list[float], params, device: torch.device) -> StepResult:
        """`params`: trained adapters' whole tensors (rank 0's); their gradients come back whole."""
        slots, shards, kinds = self.adapters.shards_of(params)
        self.tp.channel.send(Op.TRAIN, [floats(weights), np.asarray(slots), *host_batch_parts(host)])
        return self.train_shards(host, weights, shards, kinds, device)

    def train_shards(self, host: HostBatch, weights: list[float], shards, kinds, device) -> StepResult:
        """Every rank: a training-only step for this rank's shards; rank 0 gets the whole gradients."""
        result = super().execute_train(host, weights, tuple(shards), device)
        result.grads = gather_full(self.tp, list(result.grads), kinds)
        return result

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
