"""Triton SMLM and paged decode attention kernels against plain-PyTorch references.

On a machine without a GPU the kernels run under the Triton interpreter (set below, before
triton is imported); with a GPU they run compiled, and the bf16 tests at realistic sizes run too.
"""

import pytest
import torch

pytest.importorskip("triton")

# conftest.py sets TRITON_INTERPRET=1 on a machine without CUDA before this module imports triton
from helpers import DEVICE, needs_gpu  # noqa: E402
from loquetier.kernels import attention_triton, smlm_triton  # noqa: E402



# --------------------------------------------------------------------------- references


def make_segments(lengths, slots, device=DEVICE):
    """seg_cu [G+1], seg_slot [G], token_slot [N] (int32) and max segment length."""
    seg_cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    seg_cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    seg_slot = torch.tensor(slots, dtype=torch.int32)
    token_slot = torch.repeat_interleave(seg_slot, torch.tensor(lengths))
    return seg_cu.to(device), seg_slot.to(device), token_slot.to(device), max(lengths)


def shrink_ref(x, lora_a, token_slot):
    v = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
    for t, slot in enumerate(token_slot.tolist()):
        if slot >= 0:
            v[t] = lora_a[slot].float() @ x[t].float()
    return v


def expand_ref(y, v, lora_b, scaling, offsets, token_slot):
    y = y.float().clone()
    rank = lora_b.shape[2]
    for t, slot in enumerate(token_slot.tolist()):
        if slot < 0:
            continue
        for s in range(len(offsets) - 1):
            lo, hi = offsets[s], offsets[s + 1]
            b = lora_b[slot, lo:hi].float()
            y[t, lo:hi] += scaling[slot, s] * (b @ v[t, s * rank:(s + 1) * rank].float())
    return y


def make_lora(num_slots, num_slices, rank, d_in, offsets, dtype=torch.float32, device=DEVICE, ranks=None):
    """Random slot weights; slot l uses rank ranks[l] <= rank, the rest zero-padded."""
    a = torch.randn(num_slots, num_slices * rank, d_in, device=device) / d_in**0.5
    b = torch.randn(num_slots, offsets[-1], rank, device=device) / rank**0.5
    for slot, r in enumerate(ranks or []):
        for s in range(num_slices):
            a[slot, s * rank + r:(s + 1) * rank] = 0
        b[slot, :, r:] = 0
    scaling = torch.rand(num_slots, num_slices, device=device) + 0.5
    return a.to(dtype), b.to(dtype), scaling


# --------------------------------------------------------------------------- SMLM (interpreter-sized)

CASES = {
    "single_token": ([1], [3], 3, 16, 80, (20, 9, 9)),
    # name: (segment lengths, slots, S, R, d_in, slice widths)
    "prefill_mixed": ([13, 0, 21, 5, 9], [2, 1, -1, 0, 2], 3, 8, 72, (40, 12, 12)),
    "decode_only": ([1] * 11, [0, 3, -1, 1, 0, 0, 2, -1, 3, 1, 1], 1, 16, 50, (90,)),
    "prefill_plus_decode": ([33, 17, 1, 1, 1, 1, 1], [1, -1, 0, 1, -1, 3, 1], 3, 16, 96, (64, 16, 16)),
    "one_long_segment": ([64], [2], 1, 8, 40, (33,)),
}


def _case(name):
    lengths, slots, num_slices, rank, d_in, widths = CASES[name]
    offsets = tuple([0] + torch.tensor(widths).cumsum(0).tolist())
    torch.manual_seed(0)
    seg_cu, seg_slot, token_slot, max_len = make_segments(lengths, slots)
    x = torch.randn(sum(lengths), d_in, device=DEVICE)
    a, b, scaling = make_lora(4, num_slices, rank, d_in, offsets, ranks=[rank, rank // 2, rank, 3])
    return x, a, b, scaling, offsets, seg_cu, seg_slot, token_slot, max_len


# "gather" forces the per-token path (valid for any batch: it reads token_slot only);
# "segment" forces the tiled path (decode-sized batches: short tiles), "segment_long" with the tiles
# of long batches; "_split": d_in split across programs.
PATHS = ["segment", "gather", "segment_split", "gather_split", "segment_long"]


def _tiles_for(path, monkeypatch):
    if path.endswith("long"):
        monkeypatch.setattr(smlm_triton, "SHORT_BATCH_TOKENS", 0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", list(CASES))
def test_shrink_matches_reference(name, path, monkeypatch):
    x, a, _, _, _, seg_cu, seg_slot, token_slot, max_len = _case(name)
    max_len = 1 if path.startswith("gather") else max(max_len, 2)
    _tiles_for(path, monkeypatch)
    monkeypatch.setattr(smlm_triton, "SHRINK_WAVES", 1000 if path.endswith("split") else 0)
    if path.endswith("split"):
        monkeypatch.setattr(smlm_triton, "SHRINK_GATHER_BLOCK_K", 16)
        monkeypatch.setattr(smlm_triton, "SHRINK_BLOCK_K", 16)
        assert smlm_triton._split_k(x.shape[0], x.shape[1], 16, x.device) > 1
    out = torch.full((x.shape[0], a.shape[1]), float("nan"), device=DEVICE)
    v = smlm_triton.shrink(x, a, seg_cu, seg_slot, token_slot, max_len, out=out)
    assert v.data_ptr() == out.data_ptr()
    torch.testing.assert_close(v, shrink_ref(x, a, token_slot), rtol=1e-5, atol=1e-5)
    assert (v[token_slot < 0] == 0).all()


EXPAND_PATHS = ["segment", "gather", "segment_long"]


def _expand_path(path, max_len):
    return 1 if path == "gather" else max(max_len, 2)


@pytest.mark.parametrize("path", EXPAND_PATHS)
@pytest.mark.parametrize("name", list(CASES))
def test_expand_reads_own_slot_from_every_slots_shrink(name, path, monkeypatch):
    """v_slot_stride = S*R: v holds every slot's shrink (the folded base GEMM's extra columns, a
    strided view); each token must add the delta of its own slot only."""
    _tiles_for(path, monkeypatch)
    x, a, b, scaling, offsets, seg_cu, seg_slot, token_slot, max_len = _case(name)
    max_len = _expand_path(path, max_len)
    num_slots, rows = a.shape[0], a.shape[1]
    d_out = offsets[-1]
    y_aug = torch.cat([torch.randn(x.shape[0], d_out, device=DEVICE), x @ a.reshape(-1, a.shape[2]).t()], 1)
    y, v_all = y_aug[:, :d_out], y_aug[:, d_out:]
    y0, v0 = y.clone(), v_all.clone()
    smlm_triton.expand_(y, v_all, b, scaling, offsets, seg_cu, seg_slot, token_slot, max_len, v_slot_stride=rows)
    v_own = shrink_ref(x, a, token_slot)
    torch.testing.assert_close(y, expand_ref(y0, v_own, b, scaling, offsets, token_slot), rtol=1e-5, atol=1e-5)
    assert torch.equal(v_all, v0) and v_all.shape[1] == num_slots * rows


@pytest.mark.parametrize("path", EXPAND_PATHS)
@pytest.mark.parametrize("name", list(CASES))
def test_expand_matches_reference_and_touches_only_its_columns(name, path, monkeypatch):
    _tiles_for(path, monkeypatch)
    x, a, b, scaling, offsets, seg_cu, seg_slot, token_slot, max_len = _case(name)
    max_len = _expand_path(path, max_len)
    v = shrink_ref(x, a, token_slot)
    d_out = offsets[-1]
    # y is a strided view into a wider, poisoned buffer: columns outside it must stay NaN.
    big = torch.full((x.shape[0], d_out + 11), float("nan"), device=DEVICE)
    y = big[:, 5:5 + d_out]
    y.copy_(torch.randn(x.shape[0], d_out))
    y0 = y.clone()
    smlm_triton.expand_(y, v, b, scaling, offsets, seg_cu, seg_slot, token_slot, max_len)
    torch.testing.assert_close(y, expand_ref(y0, v, b, scaling, offsets, token_slot), rtol=1e-5, atol=1e-5)
    assert torch.equal(y[token_slot < 0], y0[token_slot < 0])
    assert big[:, :5].isnan().all() and big[:, 5 + d_out:].isnan().all()


@pytest.mark.parametrize("path", ["segment", "gather", "gather_per_slot_rank", "segment_split"])
@pytest.mark.parametrize("name", list(CASES))
def test_slot_ranks_skip_the_padding(name, path, monkeypatch):
    """With each slot's rank given, the kernels read no rank past it (B: past it rounded up to
    `rank_step`, where the table holds zeros): the padding past that (zeros in a real table) is
    poisoned with NaN here, and shrink and expand still match the reference on clean weights.
    The gather expand picks a token's rank from the whole table in registers, or (gather_per_slot_rank)
    reads the one entry once it knows the slot."""
    if path == "gather_per_slot_rank":
        monkeypatch.setattr(smlm_triton, "SLOT_RANKS_IN_REGISTERS_MAX", 0)
        path = "gather"
    x, a, b, scaling, offsets, seg_cu, seg_slot, token_slot, max_len = _case(name)
    num_slices, rank = len(offsets) - 1, b.shape[2]
    ranks = [rank, rank // 2, rank, 3]            # _case's slot ranks: the table is zero past them
    a_bad, b_bad = a.clone(), b.clone()
    step = smlm_triton.rank_step(rank)   # B is read up to the slot's rank rounded up to this (zeros there)
    for slot, r in enumerate(ranks):
        for s in range(num_slices):
            a_bad[slot, s * rank + r:(s + 1) * rank] = float("nan")
        b_bad[slot, :, -(-r // step) * step:] = float("nan")
    slot_rank = torch.tensor(ranks, dtype=torch.int32, device=DEVICE)
    shrink_len = 1 if path == "gather" else max(max_len, 2)
    monkeypatch.setattr(smlm_triton, "SHRINK_WAVES", 1000 if path.endswith("split") else 0)
    if path.endswith("split"):
        monkeypatch.setattr(smlm_triton, "SHRINK_BLOCK_K", 16)
    v = smlm_triton.shrink(x, a_bad, seg_cu, seg_slot, token_slot, shrink_len, slot_rank=slot_rank, table_rank=rank)
    torch.testing.assert_close(v, shrink_ref(x, a, token_slot), rtol=1e-5, atol=1e-5)
    expand_len = _expand_path(path if path in EXPAND_PATHS else "segment", max_len)
    y0 = torch.randn(x.shape[0], offsets[-1], device=DEVICE)
    y = y0.clone()
    smlm_triton.expand_(y, v, b_bad, scaling, offsets, seg_cu, seg_slot, token_slot, expand_len, slot_rank=slot_rank)
    torch.testing.assert_close(y, expand_ref(y0, v, b, scaling, offsets, token_slot), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_smlm_training_backward_matches_per_token_autograd(dropout):
    """The SMLM autograd node (the engine's training path) against plain per-token autograd: dx of
    the training rows (zero for the inference rows after them), and the A/B gradients accumulated
    into each trained slot's buffers (on top of what they held) in the training layout. Slot 1 in
    two separate runs, a base-only segment, slot 2 of a smaller rank and its own dropout."""
    import numpy as np

    from loquetier.kernels.lora_dropout import dropout_keys, lora_dropout_ref
    from loquetier.kernels.smlm import LoraBatchMeta, TrainSlot, smlm
    torch.manual_seed(0)
    num_slices, rank, d_in, offsets = 3, 8, 40, (0, 24, 32, 40)
    lengths, slots = [7, 5, 1, 9, 4], [1, -1, 2, 1, 1]   # the last segment: inference rows
    n_train = sum(lengths[:4])
    ranks = {1: 8, 2: 5}
    seg_cu, seg_slot, token_slot, max_len = make_segments(lengths, slots, device="cpu")
    x = torch.randn(sum(lengths), d_in)
    dy = torch.randn(sum(lengths), offsets[-1])
    a, b, scaling = make_lora(3, num_slices, rank, d_in, offsets, device="cpu", ranks=[8, 8, 5])
    slot_p = torch.tensor([0.0, dropout, dropout / 2])
    keys = torch.from_numpy(dropout_keys(np.arange(4, dtype=np.int64) * 977, np.asarray(lengths[:4])))
    salt = 12345

    # reference: every token through its slot's full (zero-padded) tables, plain autograd; the
    # training rows' LoRA input dropped out by the reference mask
    ag, bg, xg = a.clone().requires_grad_(), b.clone().requires_grad_(), x.clone().requires_grad_()
    x_lora = lora_dropout_ref(xg, n_train, keys, token_slot, slot_p, salt) if dropout else xg
    y = torch.zeros(x.shape[0], offsets[-1])
    for t, slot in enumerate(token_slot.tolist()):
        if slot < 0:
            continue
        v = ag[slot] @ (x_lora[t] if t < n_train else x_lora[t].detach())
        for sl in range(num_slices):
            lo, hi = offsets[sl], offsets[sl + 1]
            y[t, lo:hi] += scaling[slot, sl] * (bg[slot, lo:hi] @ v[sl * rank:(sl + 1) * rank])
    (y[:n_train] * dy[:n_train]).sum().backward()

    # ours: each trained slot's weights in the training layout, gradient buffers holding a prior sum
    train, prior = [], {}
    for slot, r in ranks.items():
        wa = a[slot].view(num_slices, rank, d_in)[:, :r].reshape(num_slices * r, d_in).clone()
        wb = b[slot, :, :r].clone()
        ga, gb = torch.randn_like(wa), torch.randn_like(wb)
        prior[slot] = (ga.clone(), gb.clone())
        train.append((slot, TrainSlot(r, wa, wb, ga, gb)))
    meta = LoraBatchMeta(seg_cu=seg_cu, seg_slot=seg_slot, token_slot=token_slot, seg_cu_host=seg_cu.tolist(),
                         seg_slot_host=slots, max_seg_len=max_len, num_train_tokens=n_train, num_train_segments=4,
                         train_slots=(1, 2), any_dropout=dropout > 0, dropout_keys=keys, slot_dropout=slot_p,
                         grad_anchor=torch.zeros((), requires_grad=True))
    xo = x.clone().requires_grad_()
    out = smlm(xo, torch.zeros(x.shape[0], offsets[-1]), a, b, scaling, offsets, meta, tuple(train), salt)
    torch.testing.assert_close(out, y.detach(), rtol=1e-5, atol=1e-5)
    (out * dy).sum().backward()
    torch.testing.assert_close(xo.grad[:n_train], xg.grad[:n_train], rtol=1e-5, atol=1e-5)
    assert (xo.grad[n_train:] == 0).all()
    for slot, ts in train:
        r = ts.rank
        want_a = ag.grad[slot].view(num_slices, rank, d_in)[:, :r].reshape(num_slices * r, d_in)
        torch.testing.assert_close(ts.grad_a, prior[slot][0] + want_a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ts.grad_b, prior[slot][1] + bg.grad[slot, :, :r], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- attention (interpreter-sized)


def make_paged_kv(context_lens, num_kv_heads, head_dim, block_size, dtype=torch.float32, device=DEVICE):
    """Random caches with each sequence's pages scattered over a shuffled pool."""
    pages_per_seq = [-(-n // block_size) for n in context_lens]
    max_pages = max(max(pages_per_seq), 1)
    num_blocks = sum(pages_per_seq) + 3
    perm = torch.randperm(num_blocks).tolist()
    block_tables = torch.full((len(context_lens), max_pages), 10**6, dtype=torch.int32)  # poison unused
    for b, n_pages in enumerate(pages_per_seq):
        block_tables[b, :n_pages] = torch.tensor([perm.pop() for _ in range(n_pages)], dtype=torch.int32)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, device=device).to(dtype)
    v_cache = torch.randn(shape, device=device).to(dtype)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=device)
    return k_cache, v_cache, block_tables.to(device), lens


@pytest.mark.parametrize(
    "context_lens,num_heads,num_kv_heads,head_dim,block_size,num_splits",
    [
        ([70, 1, 0, 33], 4, 2, 32, 16, 1),
        ([70, 1, 0, 33], 4, 2, 32, 16, 4),
        ([130, 5], 6, 1, 24, 4, 1),  # block_size < BLOCK_N, head_dim not a power of two
        ([64, 9, 100], 2, 2, 16, 32, 2),  # MHA (group 1)
    ],
)
def test_paged_decode_attention_matches_reference(context_lens, num_heads, num_kv_heads, head_dim, block_size,
                                                  num_splits):
    torch.manual_seed(0)
    k_cache, v_cache, block_tables, lens = make_paged_kv(context_lens, num_kv_heads, head_dim, block_size)
    q = torch.randn(len(context_lens), num_heads, head_dim, device=DEVICE)
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))
    got = attention_triton.paged_decode_attention(q, k_cache, v_cache, block_tables, lens, scale,
                                                  num_splits=num_splits, out=out)
    want = attention_triton.paged_decode_attention_ref(q, k_cache, v_cache, block_tables, lens, scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got[lens == 0] == 0).all()


@pytest.mark.parametrize("num_splits", [1, 4])
def test_paged_decode_attention_sliding_window(num_splits):
    """Only the last `window` cached positions are visible (Mistral); compared with the engine's
    PyTorch reference, which masks explicitly."""
    from loquetier.kernels.attention import paged_decode_attention_ref as engine_ref
    torch.manual_seed(1)
    k_cache, v_cache, block_tables, lens = make_paged_kv([70, 5, 200, 9], 2, 16, 8)
    q = torch.randn(4, 4, 16, device=DEVICE)
    out = torch.full_like(q, float("nan"))
    got = attention_triton.paged_decode_attention(q, k_cache, v_cache, block_tables, lens, 0.25,
                                                  num_splits=num_splits, out=out, sliding_window=9)
    tables = torch.where(block_tables == 10**6, 0, block_tables)  # the engine pads tables with block 0
    want = engine_ref(q, k_cache, v_cache, tables, lens, 0.25, sliding_window=9)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    full = engine_ref(q, k_cache, v_cache, tables, lens, 0.25)
    assert not torch.allclose(got[0], full[0])  # the window really cut something


def test_attention_reference_matches_dense_softmax():
    torch.manual_seed(0)
    k_cache, v_cache, block_tables, lens = make_paged_kv([11], 1, 8, 4)
    q = torch.randn(1, 2, 8, device=DEVICE)
    got = attention_triton.paged_decode_attention_ref(q, k_cache, v_cache, block_tables, lens, 0.5)
    pos = torch.arange(11, device=DEVICE)
    pages = block_tables[0, pos // 4].long()
    k, v = k_cache[pages, pos % 4, 0], v_cache[pages, pos % 4, 0]  # [11, 8]
    want = torch.softmax(q[0] @ k.T * 0.5, dim=-1) @ v
    torch.testing.assert_close(got[0], want)


# --------------------------------------------------------------------------- GPU, realistic sizes, bf16


def rel_err(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def _lengths(name):
    return {
        "decode_32": ([1] * 32, [i % 5 - 1 for i in range(32)]),
        "prefill_4x512": ([512] * 4, [0, 1, 2, 3]),
        "mixed": ([1024, 300, 211] + [1] * 64, [0, -1, 2] + [i % 4 for i in range(64)]),
        "train_2048": ([2048], [1]),
    }[name]


@needs_gpu
@pytest.mark.parametrize("name", ["decode_32", "prefill_4x512", "mixed", "train_2048"])
def test_smlm_bf16_realistic(name):
    torch.manual_seed(0)
    lengths, slots = _lengths(name)
    offsets = (0, 4096, 5120, 6144)  # fused q/k/v
    seg_cu, seg_slot, token_slot, max_len = make_segments(lengths, slots)
    a, b, scaling = make_lora(4, 3, 16, 4096, offsets, dtype=torch.bfloat16, ranks=[16, 8, 16, 4])
    x = torch.randn(sum(lengths), 4096, device=DEVICE, dtype=torch.bfloat16)
    y0 = torch.randn(x.shape[0], offsets[-1], device=DEVICE, dtype=torch.bfloat16)

    # fp32 reference, vectorised over tokens
    idx = token_slot.clamp(min=0).long()
    has = (token_slot >= 0).float()[:, None]
    v_ref = torch.einsum("tod,td->to", a.float()[idx], x.float()) * has
    v = smlm_triton.shrink(x, a, seg_cu, seg_slot, token_slot, max_len)
    assert rel_err(v, v_ref) < 1e-2

    delta = torch.zeros(x.shape[0], offsets[-1], device=DEVICE)
    for s in range(3):
        lo, hi = offsets[s], offsets[s + 1]
        vs = v.float()[:, s * 16:(s + 1) * 16]
        delta[:, lo:hi] = torch.einsum("tor,tr->to", b.float()[idx, lo:hi], vs) * scaling[idx, s:s + 1]
    y_ref = y0.float() + delta * has
    y = y0.clone()
    smlm_triton.expand_(y, v, b, scaling, offsets, seg_cu, seg_slot, token_slot, max_len)
    assert rel_err(y - y0.float(), y_ref - y0.float()) < 2e-2
    assert torch.equal(y[token_slot < 0], y0[token_slot < 0])


@needs_gpu
@pytest.mark.parametrize("batch,max_ctx,num_splits", [(1, 4000, None), (32, 2048, None), (64, 1500, 1), (8, 3000, 4)])
def test_paged_decode_attention_bf16_realistic(batch, max_ctx, num_splits):
    torch.manual_seed(0)
    lens = torch.randint(1, max_ctx + 1, (batch,)).tolist()
    k_cache, v_cache, block_tables, lens_t = make_paged_kv(lens, 8, 128, 16, dtype=torch.bfloat16)
    q = torch.randn(batch, 32, 128, device=DEVICE, dtype=torch.bfloat16)
    got = attention_triton.paged_decode_attention(q, k_cache, v_cache, block_tables, lens_t, 128**-0.5,
                                                  num_splits=num_splits)
    want = attention_triton.paged_decode_attention_ref(q.float(), k_cache.float(), v_cache.float(), block_tables,
                                                       lens_t, 128**-0.5)
    assert rel_err(got, want) < 2e-2
