"""CUDA graphs for training-only steps: forward, losses and LoRA backward replayed as one graph.

A LoRA training step launches thousands of kernels (every layer's forward and backward: GEMMs,
SMLM, norms, rotary, attention); on short examples the host takes longer to launch them than the
GPU takes to run them. So a step whose `HostBatch.graph_key` was seen `CAPTURE_AFTER` times before is
captured once, and every later step with that key is one metadata copy and one replay.

Bucketed batches (bf16/fp16 on CUDA, where one packed flash-attention call covers every segment
from device metadata) are padded to bucket sizes, so their key holds only the buckets: a graph
replays whatever the example lengths, and packed micro-batches of a token budget fall in one or
two buckets. Other batches (fp32: attention loops over segments on the host) are keyed by their
exact layout. The backward accumulates into the trained adapters' persistent gradient buffers
(lora/trainable.py), which live outside the graph's memory pool; jobs that start or stop drop the
graphs (`clear`), since the buffers a graph writes belong to the jobs it was captured with.
LoRA dropout masks are hashed from per-token keys in the metadata, so dropout replays too.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .batch import HostBatch
from .graph_capture import collector_paused

CAPTURE_AFTER = 1   # eager runs of one layout before it is captured (it warms up kernels)
# bucketed mixed steps see a few dozen keys (training and decode buckets, trained adapters); the
# graphs share one memory pool, so each costs little beyond its kernels' parameters
MAX_GRAPHS = 64     # least recently used dropped first
MAX_SEEN = 1024


@dataclass
class _Entry:
    graph: torch.cuda.CUDAGraph
    flat: torch.Tensor            # static input: the step's integer metadata (loss weights included)
    outputs: tuple                # static outputs: loss sums, token counts, decode rows' logits (or None)


TrainFn = Callable[..., tuple]


class TrainGraphs:
    """Captured training steps keyed by `HostBatch.graph_key`."""

    def __init__(self, train_fn: TrainFn, device: torch.device):
        # train_fn(batch) -> (loss sums, token counts, logits of sampled rows or None), the backward
        # done: the runner's `forward_backward`
        self.train_fn, self.device = train_fn, device
        self.entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self.seen: dict[tuple, int] = {}
        self.failed: set[tuple] = set()
        self.pool = None
        # what became of each step (benchmarks report them): replayed a graph captured earlier,
        # captured (and replayed) now, or ran eagerly
        self.replays = self.captures = self.eager = 0

    def clear(self) -> None:
        """Forget every graph (their memory goes back) and every count of repeated layouts."""
        if self.entries:
            self.entries.clear()
            self.pool = None
            torch.cuda.empty_cache()
        self.seen.clear()

    def run(self, host: HostBatch) -> tuple | None:
        """`train_fn`'s outputs from a replay, or None: run this step eagerly (first sightings of a
        layout, or a capture that failed). The outputs are overwritten by the next replay."""
        key = host.graph_key
        entry = self.entries.get(key)
        if entry is None:
            if key in self.failed:
                self.eager += 1
                return None
            if len(self.seen) > MAX_SEEN:   # layouts that never repeat (exact keys of varied data)
                self.seen.clear()
            self.seen[key] = self.seen.get(key, 0) + 1
            if self.seen[key] <= CAPTURE_AFTER:
                self.eager += 1
                return None
            entry = self._capture(key, host)
            if entry is None:
                self.eager += 1
                return None
            self.captures += 1
        else:
            self.replays += 1
        self.entries.move_to_end(key)
        entry.flat.copy_(torch.from_numpy(host.flat).pin_memory(), non_blocking=True)
        entry.graph.replay()
        return entry.outputs

    def _capture(self, key, host: HostBatch) -> _Entry | None:
        while len(self.entries) >= MAX_GRAPHS:
            self.entries.popitem(last=False)
        flat = torch.from_numpy(host.flat).to(self.device)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with collector_paused(), torch.cuda.graph(graph, pool=self.pool):
                # the batch's views and int32 copies are made inside the graph: a replay refreshes them
                outputs = self.train_fn(host.to_device(self.device, flat))
        except Exception as e:   # a capture problem must not stop training: this layout stays eager
            logging.getLogger("loquetier").warning("training step capture failed (%s); running it eagerly", e, exc_info=True)
            self.failed.add(key)
            torch.cuda.synchronize()
            return None
        if self.pool is None:
            self.pool = graph.pool()
        entry = _Entry(graph, flat, tuple(outputs))
        self.entries[key] = entry
        return entry
