"""An epoch's micro-batches: the shuffled examples cut into micro-batches of a count or packed
first-fit into micro-batches of a token budget.

Packing is what makes short, varied examples cheap: examples are concatenated without padding
(each stays its own attention and loss segment), so a step carries `micro_batch_tokens` real
tokens whatever the lengths. First fit in the shuffled order: each example goes into the first
micro-batch that still has room for it, so micro-batches fill to within a few tokens of the
budget while the order stays close to the shuffle. An example longer than the budget gets a
micro-batch of its own. The plan is a pure function of (seed, epoch, lengths): a resumed job
rebuilds the same one.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .spec import TrainSpec


def shuffled_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's example order (the same permutation as torch.randperm with that seed)."""
    return torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed + epoch)).numpy()


def first_fit(lengths: np.ndarray, order: np.ndarray, capacity: int) -> list[np.ndarray]:
    """Micro-batches (arrays of example indices) of at most `capacity` tokens, first fit in `order`.

    A segment tree over the micro-batches' free room finds the first one with room in O(log n);
    micro-batches not opened yet have all their room, so the first of them is found when no open
    one fits."""
    n = len(order)
    size = 1 << max(0, n - 1).bit_length()
    room = [capacity] * (2 * size)       # leaves: free tokens of micro-batch i; nodes: max of children
    batches: list[list[int]] = []
    for idx in order.tolist():
        need = int(lengths[idx])
        if need > capacity:              # alone, in the next unopened micro-batch
            leaf = len(batches)
        else:
            node = 1
            while node < size:
                node = 2 * node if room[2 * node] >= need else 2 * node + 1
            leaf = node - size
        if leaf == len(batches):
            batches.append([])
        batches[leaf].append(idx)
        node = size + leaf
        room[node] = max(0, room[node] - need)
        node //= 2
        while node:
            room[node] = max(room[2 * node], room[2 * node + 1])
            node //= 2
    return [np.asarray(b, dtype=np.int64) for b in batches]


def epoch_plan(spec: TrainSpec, lengths: np.ndarray, epoch: int) -> list[np.ndarray]:
    """The epoch's micro-batches under `spec` (`micro_batch_tokens` if set, else `micro_batch_size`)."""
    order = shuffled_order(len(lengths), spec.seed, epoch)
    if spec.micro_batch_tokens:
        return first_fit(lengths, order, spec.micro_batch_tokens)
    mbs = spec.micro_batch_size
    return [order[i:i + mbs] for i in range(0, len(order), mbs)]


def steps_in_epoch(spec: TrainSpec, lengths: np.ndarray, epoch: int) -> int:
    """Optimizer steps of one epoch: its micro-batches in windows of `grad_accum`."""
    if spec.micro_batch_tokens:
        return math.ceil(len(epoch_plan(spec, lengths, epoch)) / spec.grad_accum)
    return math.ceil(math.ceil(len(lengths) / spec.micro_batch_size) / spec.grad_accum)


def total_steps(spec: TrainSpec, lengths: np.ndarray) -> int:
    """`max_steps`, or every epoch's steps (packed epochs can differ by a micro-batch)."""
    if spec.max_steps:
        return spec.max_steps
    return sum(steps_in_epoch(spec, lengths, e) for e in range(spec.epochs))
