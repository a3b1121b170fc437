"""The mixed batch's layout: loss examples first, then prefills, then decode rows sorted by adapter
slot; SMLM segments keep every loss example apart and merge runs of inference rows of one slot."""

import numpy as np
import torch

from loquetier.engine.batch import (IGNORE_INDEX, LossSegment, ScheduledSeq, floor_token_bucket, plan_mixed_batch,
                                    token_bucket)
from loquetier.engine.sequence import Sequence
from loquetier.sampling_params import SamplingParams


def _seq(n_prompt: int, adapter, rid: str) -> Sequence:
    seq = Sequence(list(range(3, 3 + n_prompt)), SamplingParams(max_tokens=4), adapter, rid)
    seq.block_table = [int(rid[1:]) + 1]
    return seq


def test_lora_segments_merge_inference_runs_and_keep_loss_examples():
    slot_of = {None: -1, "a": 0, "b": 1}
    loss = [LossSegment([5, 6, 7], [6, 7, -100], "a", True), LossSegment([8, 9], [9, -100], "a", True)]
    prefill = ScheduledSeq(_seq(5, "b", "s0"), 0, 5)
    decode_adapters = ["b", "a", None, "b", "a", "b"]
    decodes = [ScheduledSeq(_seq(3, a, f"s{i + 1}"), 2, 1) for i, a in enumerate(decode_adapters)]
    host = plan_mixed_batch(loss, [decodes[0], prefill] + decodes[1:], slot_of, block_size=16)

    # per-sequence layout: 2 loss examples, the prefill, then decodes ordered by slot (base first)
    assert host.seg_cu.tolist() == [0, 3, 5, 10, 11, 12, 13, 14, 15, 16]
    assert host.seg_slot.tolist() == [0, 0, 1, -1, 0, 0, 1, 1, 1]
    assert [s.seq.adapter for s in host.scheduled] == ["b", None, "a", "a", "b", "b", "b"]
    # SMLM: loss examples apart (same slot, still two segments), the prefill and the slot runs merged
    assert host.lora_seg_cu.tolist() == [0, 3, 5, 10, 11, 13, 16]
    assert host.lora_seg_slot.tolist() == [0, 0, 1, -1, 0, 1]

    batch = host.to_device(torch.device("cpu"))
    meta = batch.ctx.lora
    assert meta.seg_cu.tolist() == host.lora_seg_cu.tolist() and meta.seg_slot.tolist() == [0, 0, 1, -1, 0, 1]
    assert meta.max_seg_len == 5 and meta.num_train_tokens == 5 and meta.num_train_segments == 2
    assert meta.token_slot.tolist() == np.repeat(host.seg_slot, np.diff(host.seg_cu)).tolist()
    assert batch.ctx.attn.loss_cu == [0, 3, 5] and batch.ctx.attn.loss_cu_t.tolist() == [0, 3, 5]
    assert batch.ctx.attn.prefill_cu == [5, 10] and batch.ctx.attn.decode_start == 10
    # the sampled rows follow the new order: the prefill's last token, then every decode row
    assert batch.sample_rows.tolist() == [9, 10, 11, 12, 13, 14, 15]
    assert batch.sample_seqs == [s.seq for s in host.scheduled]


def test_whole_prompts_get_packed_prefill_boundaries():
    """Prefill chunks that are whole prompts (start 0) come first and are counted for one packed
    attention call, with their boundaries from 0 on the device; chunks continuing a cached prompt
    follow them."""
    slot_of = {None: -1, "a": 0}
    whole = [ScheduledSeq(_seq(5, "a", "s0"), 0, 5), ScheduledSeq(_seq(3, None, "s1"), 0, 3)]
    decode = ScheduledSeq(_seq(4, None, "s2"), 3, 1)
    attn = plan_mixed_batch([], whole + [decode], slot_of, 16).to_device(torch.device("cpu")).ctx.attn
    assert attn.num_whole_prefills == 2 and attn.prefill_cu_t.tolist() == [0, 5, 8] and attn.max_prefill_len == 5
    assert attn.prefill_cu_t.dtype == torch.int32
    chunked = ScheduledSeq(_seq(9, None, "s3"), 4, 5)   # positions 4..8: its first 4 are cached already
    host = plan_mixed_batch([], [chunked] + whole, slot_of, 16)
    assert host.scheduled == whole + [chunked]
    attn = host.to_device(torch.device("cpu")).ctx.attn
    assert attn.num_whole_prefills == 2 and attn.prefill_cu_t.tolist() == [0, 5, 8, 13]
    assert attn.prefill_context_lens == [5, 3, 9]
    attn = plan_mixed_batch([], [decode], slot_of, 16).to_device(torch.device("cpu")).ctx.attn
    assert attn.num_whole_prefills == 0 and attn.prefill_cu_t is None


def test_bucketed_training_batch_pads_to_bucket_sizes_and_shares_its_key():
    """A bucketed training-only step: the examples, one padding segment (no adapter, no loss, no
    weight) and empty segments up to the segment bucket; batches of other lengths in the same
    buckets have the same graph key, and their flat arrays the same sizes."""
    slot_of = {None: -1, "a": 0, "b": 1}

    def segs(lengths):
        return [LossSegment(list(range(3, 3 + n)), [IGNORE_INDEX] + list(range(4, 3 + n)), "ab"[i % 2], True,
                            weight=0.5, dropout_seed=i) for i, n in enumerate(lengths)]

    host = plan_mixed_batch(segs([30, 50, 47]), [], slot_of, 16, bucketed=True)
    n = token_bucket(127)
    assert n == 128 and host.seg_cu[-1] == n
    # 3 examples + 1 padding segment of 1 token, then empty segments up to 8
    assert np.diff(host.seg_cu).tolist() == [30, 50, 47, 1, 0, 0, 0, 0]
    assert host.seg_slot.tolist() == [0, 1, 0, -1, -1, -1, -1, -1]
    batch = host.to_device(torch.device("cpu"))
    assert batch.num_loss_segments == 8 and batch.loss_weights.tolist() == [0.5] * 3 + [0.0] * 5
    assert (batch.loss_targets[127:] == IGNORE_INDEX).all() and batch.ctx.lora.train_slots == (0, 1)
    # the longest-segment bound is bucketed coarsely (at least 512) and never exceeds the tokens
    assert batch.ctx.attn.max_loss_len == 128 and batch.ctx.lora.num_train_tokens == 128
    other = plan_mixed_batch(segs([20, 31, 12, 40]), [], slot_of, 16, bucketed=True)
    assert other.graph_key == host.graph_key and other.sizes == host.sizes
    assert plan_mixed_batch(segs([20, 31, 12, 40]), [], slot_of, 16).graph_key != host.graph_key
    short = plan_mixed_batch(segs([250, 250, 250, 200]), [], slot_of, 16, bucketed=True)   # longest 512
    shorter = plan_mixed_batch(segs([100] * 9), [], slot_of, 16, bucketed=True)
    longer = plan_mixed_batch(segs([600, 150, 100, 100]), [], slot_of, 16, bucketed=True)  # longest 1024
    assert short.seg_cu[-1] == longer.seg_cu[-1] == shorter.seg_cu[-1] == 1024 and short.max_loss_len == 512
    assert longer.max_loss_len == 1024 and longer.graph_key != short.graph_key
    # 5 or 10 segments of 1,024 tokens: one segment bucket (16 = 1,024 / 64), one key
    assert short.num_loss_segments == shorter.num_loss_segments == 16 and shorter.graph_key == short.graph_key


def _host_state(obj, skip=("loss_cu", "seg_cu_host", "seg_slot_host", "loss_segments", "sample_seqs", "scheduled",
                           "_masks")):
    """Every host-side value a step's kernels and launch sizes may read (tensors: their shapes and dtypes)."""
    import dataclasses
    if isinstance(obj, torch.Tensor):
        return ("tensor", tuple(obj.shape), obj.dtype)
    if dataclasses.is_dataclass(obj):
        return {f.name: _host_state(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name not in skip}
    if isinstance(obj, (list, tuple)):
        return [_host_state(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _host_state(v) for k, v in obj.items()}
    return obj


def test_batches_of_one_graph_key_differ_only_in_device_data():
    """A captured training graph replays the host-side values of the batch it captured: two bucketed
    batches with one key must agree on every host value the GPU path reads (the host lists of the
    reference paths aside), so that a replay computes the new batch."""
    slot_of = {None: -1, "a": 0, "b": 1}
    rng = np.random.default_rng(0)
    batches = []
    for lengths in ([30, 50, 47], [20, 31, 12, 40], [64, 2, 2, 2, 2, 2, 2]):
        segs = [LossSegment(rng.integers(3, 99, n), rng.integers(3, 99, n), "ab"[i % 2], True, weight=rng.random(),
                            dropout_seed=i) for i, n in enumerate(lengths)]
        batches.append(plan_mixed_batch(segs, [], slot_of, 16, bucketed=True))
    assert len({b.graph_key for b in batches}) == 1
    states = [_host_state(b.to_device(torch.device("cpu"))) for b in batches]
    assert states[0] == states[1] == states[2]
    assert states[0]["ctx"]["lora"]["train_slots"] == [0, 1]


def test_mixed_batches_of_one_graph_key_differ_only_in_device_data():
    """The same for training rows beside decode rows: padding rows fill the decode bucket, block
    tables have a fixed width, the SMLM runs a fixed count, whatever the adapters and contexts."""
    from loquetier.engine.batch import DecodePadding
    slot_of = {None: -1, "a": 0, "b": 1, "c": 2}
    padding = DecodePadding((1, 2, 4, 8), table_width=8, scratch_block=99, max_runs=6)
    rng = np.random.default_rng(1)
    batches = []
    for lengths, adapters in (([30, 50], ["a", None, "c"]), ([20, 31, 22], ["b", "b", "a", None]),
                              ([60, 10, 10], ["c", "c", "c"])):
        segs = [LossSegment(rng.integers(3, 99, n), rng.integers(3, 99, n), "a", True, weight=0.1) for n in lengths]
        rows = []
        for i, adapter in enumerate(adapters):
            seq = _seq(int(rng.integers(3, 90)), adapter, f"s{i}")
            seq.block_table = rng.integers(0, 90, -(-seq.num_tokens // 16)).tolist()
            rows.append(ScheduledSeq(seq, seq.num_tokens - 1, 1))
        batches.append(plan_mixed_batch(segs, rows, slot_of, 16, bucketed=True, decode_padding=padding))
    assert len({b.graph_key for b in batches}) == 1
    states = [_host_state(b.to_device(torch.device("cpu"))) for b in batches]
    assert states[0] == states[1] == states[2]
    assert states[0]["ctx"]["attn"]["decode_block_tables"] == ("tensor", (4, 8), torch.int32)
    assert states[0]["sample_rows"] == ("tensor", (4,), torch.int64)


def test_floor_token_bucket_is_the_largest_bucket_not_above():
    buckets = sorted({token_bucket(n) for n in range(1, 20000)})
    for n in list(range(0, 3000)) + [8191, 8192, 8193, 10239, 10240, 12000]:
        assert floor_token_bucket(n) == max((b for b in buckets if b <= n), default=0)
