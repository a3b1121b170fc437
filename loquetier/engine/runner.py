"""ModelRunner (mechanism): run one mixed batch through the model; sample and compute losses."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..kernels.smlm import LoraBatchMeta
from ..models.llama import LlamaModel
from ..sampling_params import SamplingParams
from .batch import IGNORE_INDEX, HostBatch, MixedBatch, ScheduledSeq, plan_mixed_batch
from .cuda_graphs import DecodeGraphs
from .train_graphs import TrainGraphs
from .sampler import SampledTokens, Sampler
from .sequence import Sequence


@dataclass
class StepResult:
    sampled: SampledTokens | None            # one row per sampled sequence, still on the device
    loss_sums: torch.Tensor | None           # [num_loss_segments] summed token CE, detached
    loss_counts: torch.Tensor | None         # [num_loss_segments] number of target tokens
    logits: torch.Tensor | None = None       # [num_sampled, V] when asked (tests)


class ModelRunner:
    def __init__(self, model: LlamaModel, max_sampled_rows: int):
        self.model = model
        self.sampler = Sampler()
        self.device = next(model.parameters()).device
        # the last step's sampled tokens, where the next step's placeholder input ids are read
        # (asynchronous scheduling: see Sequence); a fixed buffer, since decode graphs capture it
        self.last_tokens = torch.zeros(max_sampled_rows, dtype=torch.int64, device=self.device)
        self.graphs: DecodeGraphs | None = None
        self.train_graphs: TrainGraphs | None = None
        # the leaf every SMLM training node hangs off (LoraBatchMeta.grad_anchor)
        self.grad_anchor = torch.zeros((), device=self.device, requires_grad=True)

    @torch.no_grad()
    def warm_up_lora_kernels(self) -> None:
        """Compile the SMLM kernels (segment and gather paths) for every layer shape at start-up, so
        the first requests with adapters do not wait for Triton. Empty slots (zero weights) suffice."""
        seen = set()
        for table in self.model.virtual_layers()[:1]:
            for vl in dict.fromkeys(table.values()):   # the same order in every process (tensor parallelism)
                if (vl.in_features, vl.lora_a.shape[1], vl.slice_offsets) in seen:
                    continue
                seen.add((vl.in_features, vl.lora_a.shape[1], vl.slice_offsets))
                dev, dtype = vl.lora_a.device, vl.lora_a.dtype
                fold = vl.fold_shrink
                # segment path, then gather path; with the shrink kernels and, if used, folded
                for lengths, folded in itertools.product(([64, 64], [1, 1, 1, 1]), sorted({False, fold})):
                    n = sum(lengths)
                    cu = torch.tensor([0] + list(np.cumsum(lengths)), dtype=torch.int32, device=dev)
                    slots = torch.zeros(len(lengths), dtype=torch.int32, device=dev)
                    meta = LoraBatchMeta(seg_cu=cu, seg_slot=slots, token_slot=torch.zeros(n, dtype=torch.int32, device=dev),
                                         seg_cu_host=cu.tolist(), seg_slot_host=[0] * len(lengths),
                                         max_seg_len=max(lengths))
                    vl.fold_shrink = folded
                    vl(torch.zeros(n, vl.in_features, dtype=dtype, device=dev), meta)
                vl.fold_shrink = fold

    @torch.no_grad()
    def warm_up_steps(self, scratch_block: int, block_size: int) -> None:
        """Run two eager steps of dummy prefills and a decode row at start-up, so that the Triton
        kernels of prefill-sized batches compile now and not under the first burst of requests.
        Their K/V go to the scratch block, which no sequence owns. Two token counts, one a multiple
        of 16, because Triton specializes kernels on that."""
        for lengths in ((37, 64), (64, 63)):
            seqs = [Sequence([1] * n, SamplingParams(max_tokens=1), adapter)
                    for n, adapter in ((lengths[0], "warm-up"), (lengths[1], None), (4, "warm-up"))]
            for seq in seqs:
                seq.block_table = [scratch_block] * -(-seq.num_tokens // block_size)
            scheduled = [ScheduledSeq(seqs[0], 0, lengths[0]), ScheduledSeq(seqs[1], 0, lengths[1]),
                         ScheduledSeq(seqs[2], 3, 1)]
            host = plan_mixed_batch([], scheduled, {None: -1, "warm-up": 0}, block_size)
            self.execute(host.to_device(self.device))

    def enable_graphs(self, kv, max_model_len: int, max_batch: int, num_slots: int) -> None:
        """Capture decode graphs; if capture fails, say so and keep serving eagerly."""
        max_blocks = -(-max_model_len // kv.block_size)
        graphs = DecodeGraphs(self.model, kv.scratch_block, kv.block_size, max_blocks, max_batch, kv.pool.device,
                              max_segments=num_slots + 2, resolve_ids=self.resolve_ids)
        try:
            graphs.capture()
        except Exception as e:  # a driver/compiler problem must not stop the engine from serving
            logging.getLogger("loquetier").warning("CUDA graph capture failed (%s); decoding eagerly", e, exc_info=True)
            torch.cuda.synchronize()
            return
        self.graphs = graphs

    def enable_train_graphs(self, device: torch.device) -> None:
        self.train_graphs = TrainGraphs(self.forward_backward, device)

    def drop_train_graphs(self) -> None:
        if self.train_graphs is not None:
            self.train_graphs.clear()

    def resolve_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Input ids with placeholders (-(i + 1)) replaced by row i of the last step's tokens."""
        return torch.where(ids < 0, self.last_tokens[(-1 - ids).clamp_min(0)], ids)

    def publish(self, sampled: SampledTokens) -> None:
        """Keep this step's tokens on the device for the next step's placeholder inputs."""
        self.last_tokens[:sampled.tokens.shape[0]].copy_(sampled.tokens)

    def can_replay(self, scheduled, has_loss: bool) -> bool:
        return (self.graphs is not None and not has_loss and bool(scheduled)
                and all(s.length == 1 for s in scheduled) and self.graphs.bucket_for(len(scheduled)) is not None)

    def decode_metadata(self, scheduled: list[ScheduledSeq], slot_of: dict, block_size: int):
        """Host arrays of a decode-only step with rows sorted by adapter slot (runs become segments)."""
        order = sorted(scheduled, key=lambda s: slot_of[s.seq.adapter])
        seqs = [s.seq for s in order]
        n = len(seqs)
        # the token at each row's position: a one-token prefill chunk is not its sequence's last token
        ids = np.fromiter((s.seq.token_ids(s.start, s.start + 1)[0] for s in order), dtype=np.int64, count=n)
        pos = np.fromiter((s.start for s in order), dtype=np.int64, count=n)
        width = max(len(s.block_table) for s in seqs)
        tables = np.zeros((n, width), dtype=np.int64)
        for i, s in enumerate(seqs):
            tables[i, :len(s.block_table)] = s.block_table
        slot_map = tables[np.arange(n), pos // block_size] * block_size + pos % block_size
        token_slot = np.fromiter((slot_of[s.adapter] for s in seqs), dtype=np.int64, count=n)
        return seqs, (ids, pos, slot_map, token_slot, pos + 1, tables)

    def execute_decode_graph(self, scheduled: list[ScheduledSeq], slot_of: dict, block_size: int
                             ) -> tuple[list, StepResult]:
        """Decode-only step through a captured graph: one metadata copy, one replay, then sampling.
        Returns the sequences in the order of the result's tokens."""
        seqs, arrays = self.decode_metadata(scheduled, slot_of, block_size)
        with_lora = bool((arrays[3] >= 0).any())
        logits = self.graphs.run(*arrays, with_lora)
        return seqs, StepResult(self.sampler.sample(logits, seqs), None, None, None)

    def prepare(self, host: HostBatch) -> MixedBatch:
        """The step's batch on the device (split over ranks, the plan also goes to the workers)."""
        return host.to_device(self.device)

    def execute(self, batch: MixedBatch, keep_logits: bool = False) -> StepResult:
        """Any step, eagerly: forward; the loss of every loss segment; the next token of every
        sequence that completes; and, with training rows, the backward of sum(loss_weights * loss
        sums), which accumulates into the trained adapters' gradient buffers. The tokens are sampled
        before the backward is launched, so their copy to the host does not wait for it. No host sync."""
        sampled = []
        sums, counts, logits = self.forward_backward(
            # (a bucketed batch's padding rows come last)
            batch, lambda logits: sampled.append(self.sampler.sample(logits[:len(batch.sample_seqs)], batch.sample_seqs)))
        return StepResult(sampled[0] if sampled else None, sums, counts, logits if keep_logits else None)

    def execute_bucketed(self, host: HostBatch) -> tuple[StepResult, list]:
        """A bucketed step (training rows, maybe decode rows beside them), replayed from a captured
        graph once its buckets repeat (see train_graphs.py), else eager; the real rows' tokens are
        sampled after it. Returns the result and the sampled sequences in the order of its tokens."""
        out = self.train_graphs.run(host) if self.train_graphs is not None else None
        if out is None:
            batch = host.to_device(self.device)
            return self.execute(batch), batch.sample_seqs
        sums, counts, logits = out
        seqs = [s.seq for s in host.scheduled]
        sampled = self.sampler.sample(logits[:len(seqs)], seqs) if seqs else None
        return StepResult(sampled, sums, counts), seqs

    def forward_backward(self, batch: MixedBatch, on_logits=None) -> tuple:
        """(loss sums, token counts, logits of the sampled rows or None), the backward done; what a
        training graph captures. `on_logits(logits)` runs before the backward is launched."""
        ctx = batch.ctx
        has_train = ctx.lora is not None and ctx.lora.num_train_tokens > 0
        input_ids = self.resolve_ids(batch.input_ids) if batch.has_placeholders else batch.input_ids
        if has_train:
            ctx.lora.grad_anchor = self.grad_anchor
        with torch.set_grad_enabled(has_train):
            hidden = self.model(input_ids, ctx)
            loss_sums = loss_counts = None
            if batch.num_loss_segments:
                loss_sums, loss_counts = self._segment_losses(hidden[:ctx.attn.num_loss_tokens], batch)
        logits = None
        if batch.sample_rows is not None:
            with torch.no_grad():
                logits = self.model.compute_logits(hidden.detach().index_select(0, batch.sample_rows))
            if on_logits is not None:
                on_logits(logits)
        if has_train:
            (loss_sums * batch.loss_weights).sum().backward()
            loss_sums = loss_sums.detach()
        return loss_sums, loss_counts, logits

    def _segment_losses(self, hidden: torch.Tensor, batch: MixedBatch):
        """Per-segment summed cross entropy over target tokens (HF causal-LM loss, unreduced)."""
        targets = batch.loss_targets
        keep = targets != IGNORE_INDEX
        token_loss = self._token_losses(hidden, targets.clamp_min(0)) * keep
        n = batch.num_loss_segments
        sums = torch.zeros(n, device=hidden.device, dtype=torch.float32).index_add(0, batch.loss_seg_ids, token_loss)
        counts = torch.zeros(n, device=hidden.device, dtype=torch.float32).index_add(0, batch.loss_seg_ids, keep.float())
        return sums, counts

    def _token_losses(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Each row's cross entropy against its target (fp32 logits, as HF)."""
        return F.cross_entropy(self.model.compute_logits(hidden).float(), targets, reduction="none")
