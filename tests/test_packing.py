"""First-fit packing of examples into token-budget micro-batches, against a plain O(n^2) first fit."""

import numpy as np
import pytest

from loquetier.training.packing import epoch_plan, first_fit, shuffled_order, steps_in_epoch
from loquetier.training.spec import TrainSpec


def naive_first_fit(lengths, order, capacity):
    bins, room = [], []
    for i in order:
        n = lengths[i]
        if n > capacity:
            bins.append([i])
            room.append(0)
            continue
        for b, r in enumerate(room):
            if r >= n:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


@pytest.mark.parametrize("seed,n,capacity", [(0, 1, 64), (1, 37, 64), (2, 500, 256), (3, 200, 50)])
def test_first_fit_matches_the_plain_algorithm(seed, n, capacity):
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(30), 0.8, n).astype(np.int64), 1, 120)
    order = rng.permutation(n)
    got = [b.tolist() for b in first_fit(lengths, order, capacity)]
    assert got == naive_first_fit(lengths.tolist(), order.tolist(), capacity)
    assert sorted(i for b in got for i in b) == list(range(n))
    assert all(lengths[b].sum() <= capacity or len(b) == 1 for b in got)


def test_epoch_plan_is_deterministic_and_counts_steps():
    lengths = np.random.default_rng(0).integers(5, 90, 300)
    spec = TrainSpec(name="x", train_file="", output_dir="", micro_batch_tokens=512, grad_accum=3, seed=7)
    a, b = epoch_plan(spec, lengths, 2), epoch_plan(spec, lengths, 2)
    assert [x.tolist() for x in a] == [x.tolist() for x in b]
    assert [x.tolist() for x in epoch_plan(spec, lengths, 3)] != [x.tolist() for x in a]
    assert steps_in_epoch(spec, lengths, 2) == -(-len(a) // 3)
    # packed micro-batches fill their budget: the plan is close to the fewest possible
    assert len(a) <= int(np.ceil(lengths.sum() / 512)) + 2
    count = TrainSpec(name="x", train_file="", output_dir="", micro_batch_size=8, seed=7)
    plan = epoch_plan(count, lengths, 0)
    assert np.concatenate(plan).tolist() == shuffled_order(300, 7, 0).tolist() and len(plan[0]) == 8
