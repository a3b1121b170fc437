"""CUDA graphs for decode-only steps: one graph per bucketed batch size, captured at start-up.

A replay needs one host->device copy of the step's integer metadata into a static buffer; the
graph itself slices it, runs the model and the LM head. Padding rows write K/V into a scratch
block that no sequence owns and carry no adapter.

Rows arrive sorted by adapter slot. From `SEGMENT_MIN_BATCH` rows up, each run of one adapter is a
SMLM segment (the segment kernels share weight tiles across the run); smaller batches use the
per-token gather kernels. A batch of many adapters with a row or two each has little to share, and
there the gather kernels win (`benchmarks/tune_many_adapters.py`, H200, batch 64: 64 adapters one row
each, per layer 197 us gathered against 338 us in segments; 16 adapters, four rows each, segments
win); so where the slot table allows runs that short, a bucket also has a per-token LoRA graph, and
a replay takes it when the mean run is shorter than `PER_TOKEN_MAX_MEAN_RUN` rows. The segment arrays have a fixed length, padded with empty segments, so
one graph serves any mix of adapters: sorted rows form at most one run per adapter slot, one of
base-only rows and one of padding rows, so `max_segments` = slots + 2 always suffices (the
segment kernels' grids grow with the segment count, so it is not the bucket size).
"""

from __future__ import annotations

import numpy as np
import torch

from ..kernels.smlm import LoraBatchMeta
from .context import AttentionMeta, BatchContext
from .graph_capture import collector_paused

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)
SEGMENT_MIN_BATCH = 32   # kernel benchmark (H100): segments beat per-token gather from ~32 tokens
PER_TOKEN_MAX_MEAN_RUN = 2   # measured: 1-row runs gather faster, 4-row runs not; 2 lies between


class DecodeGraphs:
    """Captured decode forwards (with and without the LoRA path) keyed by padded batch size."""

    def __init__(self, model, scratch_block: int, block_size: int, max_blocks_per_seq: int,
                 max_batch: int, device: torch.device, max_segments: int, resolve_ids=None):
        self.model, self.device = model, device
        self.resolve_ids = resolve_ids   # placeholder input ids -> the last step's tokens (ModelRunner)
        self.max_segments = max_segments
        self.scratch_block, self.block_size, self.max_blocks = scratch_block, block_size, max_blocks_per_seq
        self.buckets = [b for b in BUCKETS if b <= max_batch]
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        # bucket -> the LoRA graph with the per-token kernels, for batches of many short runs
        self.per_token_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.pool = None

    def _num_segments(self, bucket: int) -> int:
        return min(bucket, self.max_segments)

    def _fields(self, bucket: int) -> list[int]:
        # input_ids, positions, slot_mapping, token_slot, context_lens, seg_cu, seg_slot, block_tables
        g = self._num_segments(bucket)
        return [bucket] * 5 + [g + 1, g, bucket * self.max_blocks]

    def _segmented(self, bucket: int) -> bool:
        return bucket >= SEGMENT_MIN_BATCH

    def _has_per_token_graph(self, bucket: int) -> bool:
        # runs short enough to pick it need more runs than the slot table gives (slots + base-only rows)
        return self._segmented(bucket) and (self.max_segments - 1) * PER_TOKEN_MAX_MEAN_RUN > bucket

    def _forward(self, flat: torch.Tensor, bucket: int, with_lora: bool, per_token: bool = False) -> torch.Tensor:
        ids, pos, slot_map, token_slot, ctx_lens, seg_cu, seg_slot, tables = torch.split(flat, self._fields(bucket))
        if self.resolve_ids is not None:
            ids = self.resolve_ids(ids)
        lora = None
        if with_lora:
            segmented = self._segmented(bucket) and not per_token
            # host lists are never read on this path (the kernels take the device tensors)
            lora = LoraBatchMeta(seg_cu=seg_cu.to(torch.int32), seg_slot=seg_slot.to(torch.int32),
                                 token_slot=token_slot.to(torch.int32), seg_cu_host=[], seg_slot_host=[0],
                                 max_seg_len=bucket if segmented else 1)
        attn = AttentionMeta(num_loss_tokens=0, loss_cu=[0], slot_mapping=slot_map, prefill_cu=[],
                             prefill_context_lens=[], prefill_block_tables=None, decode_start=0,
                             decode_block_tables=tables.view(bucket, self.max_blocks).to(torch.int32),
                             decode_context_lens=ctx_lens.to(torch.int32))
        ctx = BatchContext(positions=pos, lora=lora, attn=attn, num_tokens=bucket)
        return self.model.compute_logits(self.model(ids, ctx))

    @torch.no_grad()
    def capture(self) -> None:
        for bucket in reversed(self.buckets):   # largest first: later graphs reuse its pool
            variants = [(True, False), (False, False)] + [(True, True)] * self._has_per_token_graph(bucket)
            for with_lora, per_token in variants:
                flat = torch.from_numpy(self.host_metadata(*self._empty_rows(), bucket)).to(self.device)
                for _ in range(2):  # warm up (Triton compiles, allocator settles) outside the graph
                    self._forward(flat, bucket, with_lora, per_token)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with collector_paused(), torch.cuda.graph(graph, pool=self.pool):
                    logits = self._forward(flat, bucket, with_lora, per_token)
                if self.pool is None:
                    self.pool = graph.pool()
                if per_token:
                    self.per_token_graphs[bucket] = (graph, flat, logits)
                else:
                    self.graphs[(bucket, with_lora)] = (graph, flat, logits)

    @staticmethod
    def _empty_rows():
        z = np.zeros(0, dtype=np.int64)
        return z, z, z, z, z, np.zeros((0, 1), dtype=np.int64)

    def bucket_for(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def host_metadata(self, ids, pos, slot_map, token_slot, ctx_lens, tables, bucket: int) -> np.ndarray:
        """The flat int64 metadata of n rows (sorted by `token_slot`) padded to `bucket` rows."""
        n = len(ids)
        pad = bucket - n
        full_tables = np.zeros((bucket, self.max_blocks), dtype=np.int64)
        full_tables[:n, :tables.shape[1]] = tables
        full_tables[n:, 0] = self.scratch_block
        # segments: runs of one slot, then the padding rows (no adapter), then empty segments
        starts = np.flatnonzero(np.diff(token_slot, prepend=np.int64(-2))) if n else np.zeros(0, np.int64)
        g = self._num_segments(bucket)
        assert len(starts) + (n < bucket) <= g, "more adapter runs than segments: rows must be sorted by slot"
        seg_cu = np.full(g + 1, bucket, dtype=np.int64)
        seg_slot = np.full(g, -1, dtype=np.int64)
        seg_cu[:len(starts)] = starts
        seg_slot[:len(starts)] = token_slot[starts]
        seg_cu[len(starts)] = n
        return np.concatenate([
            np.pad(ids, (0, pad)), np.pad(pos, (0, pad)),
            np.pad(slot_map, (0, pad), constant_values=self.scratch_block * self.block_size),
            np.pad(token_slot, (0, pad), constant_values=-1), np.pad(ctx_lens, (0, pad), constant_values=1),
            seg_cu, seg_slot, full_tables.reshape(-1)])

    def run(self, ids: np.ndarray, pos: np.ndarray, slot_map: np.ndarray, token_slot: np.ndarray,
            ctx_lens: np.ndarray, tables: np.ndarray, with_lora: bool) -> torch.Tensor:
        """Replay for n real rows (n <= bucket, sorted by slot); returns logits [n, vocab] (a view)."""
        n = len(ids)
        bucket = self.bucket_for(n)
        graph, flat, logits = self._graph_for(bucket, with_lora, token_slot)
        host = self.host_metadata(ids, pos, slot_map, token_slot, ctx_lens, tables, bucket)
        flat.copy_(torch.from_numpy(host).pin_memory(), non_blocking=True)
        graph.replay()
        return logits[:n]

    def _graph_for(self, bucket: int, with_lora: bool, token_slot: np.ndarray):
        """The captured graph for these sorted rows: the per-token LoRA graph when runs are short."""
        if with_lora and bucket in self.per_token_graphs and len(token_slot):
            runs = 1 + int(np.count_nonzero(np.diff(token_slot)))
            if runs * PER_TOKEN_MAX_MEAN_RUN > len(token_slot):
                return self.per_token_graphs[bucket]
        return self.graphs[(bucket, with_lora)]

    @torch.no_grad()
    def run_eager(self, ids, pos, slot_map, token_slot, ctx_lens, tables, with_lora: bool,
                  per_token: bool = False) -> torch.Tensor:
        """The captured computation without a graph (any device): for tests and debugging."""
        n = len(ids)
        bucket = self.bucket_for(n)
        flat = torch.from_numpy(self.host_metadata(ids, pos, slot_map, token_slot, ctx_lens, tables, bucket))
        return self._forward(flat.to(self.device), bucket, with_lora, per_token)[:n]
