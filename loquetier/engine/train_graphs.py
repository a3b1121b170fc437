"""CUDA graphs for training-only steps: forward, losses and LoRA gradients replayed as one graph.

A LoRA training step launches about 3,000 kernels (every layer's forward and backward: GEMMs,
SMLM, norms, rotary, attention); at 4 x 512 tokens on an 8B model the host takes longer to launch
them than the GPU takes to run them, and the host's speed varies from machine to machine. So a
step whose layout (`HostBatch.layout_key`: segment lengths and slots) and trained parameters
were seen `CAPTURE_AFTER` times in a row is captured once, and every later step with that layout
is one metadata copy and one replay. Training on fixed-length (or packed) examples repeats its
layout every step; other steps run eagerly with the same math.

Only training-only steps without LoRA dropout qualify: inference rows change the layout every
step, and dropout masks come from each job's own generator. A training step that rides with
inference drops the graphs (`clear`), so their memory pool never sits beside an eager step's
activations; the layout must then repeat again before a new capture.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .batch import HostBatch

CAPTURE_AFTER = 2   # eager runs of one layout before it is captured (the first warms up kernels)
MAX_GRAPHS = 8      # e.g. one per concurrently trained adapter; least recently used dropped first
MAX_SEEN = 1024


@dataclass
class _Entry:
    graph: torch.cuda.CUDAGraph
    flat: torch.Tensor            # static input: the step's integer metadata
    weights: torch.Tensor         # static input: each loss segment's weight in the total loss
    sums: torch.Tensor            # static outputs
    counts: torch.Tensor
    grads: tuple[torch.Tensor, ...]
    params: tuple[torch.Tensor, ...]  # kept alive: the key holds their ids


TrainFn = Callable[..., tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]]


class TrainGraphs:
    """Captured training steps keyed by (layout, trained parameters)."""

    def __init__(self, train_fn: TrainFn, device: torch.device):
        # train_fn(batch, weights, params) -> (loss sums, token counts, grads): the runner's step
        self.train_fn, self.device = train_fn, device
        self.entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self.seen: dict[tuple, int] = {}
        self.failed: set[tuple] = set()
        self.pool = None

    def clear(self) -> None:
        """Forget every graph (their memory goes back) and every count of repeated layouts."""
        if self.entries:
            self.entries.clear()
            self.pool = None
            torch.cuda.empty_cache()
        self.seen.clear()

    def run(self, host: HostBatch, weights: list[float], params: tuple[torch.Tensor, ...]):
        """(sums, counts, grads) from a replay, or None: run this step eagerly (first sightings of a
        layout, or a capture that failed). The outputs are overwritten by the next replay."""
        key = (host.layout_key, tuple(map(id, params)))
        entry = self.entries.get(key)
        if entry is None:
            if key in self.failed:
                return None
            if len(self.seen) > MAX_SEEN:   # layouts that never repeat (variable-length data)
                self.seen.clear()
            self.seen[key] = self.seen.get(key, 0) + 1
            if self.seen[key] <= CAPTURE_AFTER:
                return None
            entry = self._capture(key, host, len(weights), params)
            if entry is None:
                return None
        self.entries.move_to_end(key)
        entry.flat.copy_(torch.from_numpy(host.flat).pin_memory(), non_blocking=True)
        entry.weights.copy_(torch.from_numpy(np.asarray(weights, dtype=np.float32)).pin_memory(), non_blocking=True)
        entry.graph.replay()
        return entry.sums, entry.counts, entry.grads

    def _capture(self, key, host: HostBatch, num_segments: int, params) -> _Entry | None:
        while len(self.entries) >= MAX_GRAPHS:
            self.entries.popitem(last=False)
        flat = torch.from_numpy(host.flat).to(self.device)
        weights = torch.zeros(num_segments, dtype=torch.float32, device=self.device)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()   # the eager steps' cached blocks go back; the graph pool takes their place
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                # the batch's views and int32 copies are made inside the graph: a replay refreshes them
                sums, counts, grads = self.train_fn(host.to_device(self.device, flat), weights, params)
        except Exception as e:   # a capture problem must not stop training: this layout stays eager
            logging.getLogger("loquetier").warning("training step capture failed (%s); running it eagerly", e)
            self.failed.add(key)
            torch.cuda.synchronize()
            return None
        if self.pool is None:
            self.pool = graph.pool()
        entry = _Entry(graph, flat, weights, sums, counts, tuple(grads), tuple(params))
        self.entries[key] = entry
        return entry
