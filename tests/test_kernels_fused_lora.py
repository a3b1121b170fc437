"""Inference-only fused kernels that also add a folded layer's pending LoRA delta: residual add +
RMSNorm, and SiLU-and-mul, against plain-PyTorch math (interpreted on the CPU, compiled on a GPU)."""

import pytest
import torch

pytest.importorskip("triton")

# conftest.py sets TRITON_INTERPRET=1 on a machine without CUDA before this module imports triton
from helpers import DEVICE, needs_gpu  # noqa: E402
from loquetier.kernels import fused, fused_triton, rotary_triton, smlm_triton  # noqa: E402
from loquetier.kernels.attention import write_kv  # noqa: E402
from loquetier.kernels.rotary import apply_rotary_lora_and_cache, apply_rotary_ref  # noqa: E402
from loquetier.kernels.smlm import LoraBatchMeta, LoraDelta  # noqa: E402

EPS = 1e-5
NUM_SLOTS, RANK = 3, 8


def folded_output(token_slots, slice_widths, d_in=24, dtype=torch.float32, device=DEVICE, seed=0, segments=False,
                  slot_ranks=None, table_rank=RANK):
    """A folded layer's GEMM output as the engine makes it: y_aug = [base columns | every slot's
    shrink], returned as (out view, LoraDelta). Slots in a table of rank `table_rank`, scales per slice.
    `slot_ranks`: each slot's own rank, passed to the kernels; B's columns past it are zero up to the
    rank rounded up to `rank_step` (which the kernels may read) and large values past that, which a
    kernel that reads the padding it may skip would add (the engine keeps them zero)."""
    g = torch.Generator().manual_seed(seed)
    offsets = [0]
    for w in slice_widths:
        offsets.append(offsets[-1] + w)
    n, s = len(token_slots), len(slice_widths)
    x = torch.randn(n, d_in, generator=g)
    a = torch.randn(NUM_SLOTS, s * table_rank, d_in, generator=g) / d_in ** 0.5
    b = torch.randn(NUM_SLOTS, offsets[-1], table_rank, generator=g) / table_rank ** 0.5
    scaling = torch.rand(NUM_SLOTS, s, generator=g) + 0.5
    if slot_ranks is not None:
        step = smlm_triton.rank_step(table_rank)
        for slot, r in enumerate(slot_ranks):
            b[slot, :, r:] = 0
            b[slot, :, -(-r // step) * step:] = 1e3
    base = torch.randn(n, offsets[-1], generator=g)
    y_aug = torch.cat([base, x @ a.reshape(-1, d_in).t()], 1).to(dtype).to(device)
    slots = torch.tensor(token_slots, dtype=torch.int32)
    # one segment per token, or (segments=True) one per run of equal slots, as in a sorted decode batch
    starts = [t for t in range(n) if t == 0 or token_slots[t] != token_slots[t - 1]] if segments else list(range(n))
    cu = starts + [n]
    meta = LoraBatchMeta(seg_cu=torch.tensor(cu, dtype=torch.int32).to(device),
                         seg_slot=torch.tensor([token_slots[t] for t in starts], dtype=torch.int32).to(device),
                         token_slot=slots.to(device), seg_cu_host=cu, seg_slot_host=[token_slots[t] for t in starts],
                         max_seg_len=max(b - a for a, b in zip(cu, cu[1:])))
    slot_rank = None if slot_ranks is None else torch.tensor(slot_ranks, dtype=torch.int32, device=device)
    delta = LoraDelta(y_aug[:, offsets[-1]:], b.to(dtype).to(device), scaling.to(device), tuple(offsets), meta,
                      slot_rank=slot_rank)
    return y_aug[:, :offsets[-1]], delta


def delta_ref(out, delta):
    """out + each token's own slot's scaled B @ (A x), in fp32, over the slot's own rank."""
    res = out.float().clone()
    v = delta.v.float()
    rank = delta.lora_b.shape[2]
    width = v.shape[1] // delta.lora_b.shape[0]
    for t, slot in enumerate(delta.meta.token_slot.tolist()):
        if slot < 0:
            continue
        for s in range(len(delta.slice_offsets) - 1):
            lo, hi = delta.slice_offsets[s], delta.slice_offsets[s + 1]
            r = rank if delta.slot_rank is None else int(delta.slot_rank[slot])
            vs = v[t, slot * width + s * rank: slot * width + s * rank + r]
            res[t, lo:hi] += delta.scaling[slot, s] * (delta.lora_b[slot, lo:hi, :r].float() @ vs)
    return res


SLOTS = [0, -1, 2, 1, 1, -1, 0]
SORTED_SLOTS = [-1, -1, 0, 0, 0, 1] + [2] * 19   # runs longer than a 16-token tile


@pytest.fixture(params=["tile", "tile-base"])
def lora_path(request, monkeypatch):
    """"tile-base": add + RMSNorm without a delta through the tiled kernels too (else one program per
    row). The norm's row loop is cut to 1,024 columns so that 2,500 takes three passes."""
    monkeypatch.setattr(fused_triton, "NORM_ROW_CHUNK", 1024)
    monkeypatch.setattr(fused_triton, "ADD_NORM_SPLIT_BASE", request.param == "tile-base")
    return request.param


@pytest.mark.parametrize("width", [40, 2500])   # 2500: three chunks, the last one partial
@pytest.mark.parametrize("with_delta,with_residual", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("slots", [SLOTS, SORTED_SLOTS, [2]], ids=["mixed", "sorted-runs", "one-row"])
def test_add_rms_norm_matches_reference(width, with_delta, with_residual, slots, lora_path, poisoned_empty):
    out, delta = folded_output(slots, [width])
    residual = torch.randn(len(slots), width, device=DEVICE) if with_residual else None
    weight = torch.rand(width, device=DEVICE) + 0.5
    out0 = out.clone()
    y, h = fused_triton.add_rms_norm(out, delta if with_delta else None, residual, weight, EPS)
    h_ref = delta_ref(out0, delta) if with_delta else out0.clone()
    if with_residual:
        h_ref = residual + h_ref
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, fused.rms_norm_ref(h_ref, weight, EPS), rtol=1e-5, atol=1e-5)
    assert torch.equal(out, out0)  # the GEMM output is read, never written


@pytest.mark.parametrize("slots", ["per_token", "segments"])
@pytest.mark.parametrize("inter", [40, 600])
def test_silu_and_mul_lora_matches_reference(inter, slots, lora_path, poisoned_empty):
    segmented = slots == "segments"
    gate_up, delta = folded_output(SORTED_SLOTS if segmented else SLOTS, [inter, inter], segments=segmented)
    assert (delta.meta.max_seg_len > 1) == segmented
    y = fused_triton.silu_and_mul_lora(gate_up, delta)
    torch.testing.assert_close(y, fused.silu_and_mul_ref(delta_ref(gate_up, delta)), rtol=1e-5, atol=1e-5)


@pytest.fixture(params=["registers", "per-slot"])
def rank_table(request, monkeypatch):
    """How the kernels learn a slot's rank: the whole table loaded with the tile's slots (the default)
    or one entry read once a slot is known (tables of more slots than SLOT_RANKS_IN_REGISTERS_MAX)."""
    if request.param == "per-slot":
        monkeypatch.setattr(smlm_triton, "SLOT_RANKS_IN_REGISTERS_MAX", 0)
    return request.param


@pytest.mark.parametrize("slots", [SLOTS, SORTED_SLOTS], ids=["mixed", "sorted-runs"])
@pytest.mark.parametrize("table_rank,ranks", [(32, [32, 3, 17]), (8, [8, 3, 5])], ids=["rank-32", "rank-8"])
def test_fused_lora_kernels_skip_padding_past_slot_rank(slots, table_rank, ranks, rank_table, poisoned_empty):
    """Slots of ranks 32, 3, 17 in a rank-32 table: B's padding past each rank rounded up to 8 holds
    1e3, so reading it would show. A rank-8 table (under SLOT_RANK_MASK_MIN_TABLE_RANK) reads its
    zero padding rather than mask it by each slot's rank: the same result."""
    out, delta = folded_output(slots, [40], slot_ranks=ranks, table_rank=table_rank)
    residual = torch.randn(len(slots), 40, device=DEVICE)
    weight = torch.rand(40, device=DEVICE) + 0.5
    y, h = fused_triton.add_rms_norm(out, delta, residual, weight, EPS)
    torch.testing.assert_close(h, residual + delta_ref(out, delta), rtol=1e-5, atol=1e-5)
    gate_up, delta = folded_output(slots, [40, 40], slot_ranks=ranks, segments=True, table_rank=table_rank)
    y = fused_triton.silu_and_mul_lora(gate_up, delta)
    torch.testing.assert_close(y, fused.silu_and_mul_ref(delta_ref(gate_up, delta)), rtol=1e-5, atol=1e-5)


def test_composite_path_equals_kernels_math_on_cpu():
    """The dispatchers' reference path (expand, then add, then norm) is the same math."""
    out, delta = folded_output(SLOTS, [40], device="cpu")
    residual = torch.randn(len(SLOTS), 40)
    weight = torch.rand(40) + 0.5
    expected = residual + delta_ref(out, delta)
    y, h = fused.add_rms_norm(out.clone(), delta, residual, weight, EPS, backend="torch")
    torch.testing.assert_close(h, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, fused.rms_norm_ref(expected, weight, EPS), rtol=1e-5, atol=1e-5)


def _rotary_tables(head_dim, max_positions=32, dtype=torch.float32, device=DEVICE):
    from loquetier.models.rotary import RotaryEmbedding
    return RotaryEmbedding(head_dim, max_positions, 10000.0, None, dtype, torch.device(device))


def _rotary_lora_reference(qkv, delta, heads, kv_heads, head_dim, rotary, positions, k_cache, v_cache, slots):
    """Expand (fp32 math, rounded once), split, rotate, write the cache: the unfused chain."""
    full = delta_ref(qkv, delta).to(qkv.dtype)
    q, k, v = full.split((heads * head_dim, kv_heads * head_dim, kv_heads * head_dim), dim=-1)
    q, k, v = q.reshape(-1, heads, head_dim), k.reshape(-1, kv_heads, head_dim), v.reshape(-1, kv_heads, head_dim)
    q, k = apply_rotary_ref(q, k, rotary.cos, rotary.sin, positions)
    write_kv(k_cache, v_cache, k, v, slots)
    return q, k, v


# (H, KVH, D): grouped query heads; a half (12) that is not a power of two
ROTARY_HEADS = [(4, 2, 16), (3, 1, 24)]


@pytest.mark.parametrize("heads,kv_heads,head_dim", ROTARY_HEADS)
@pytest.mark.parametrize("slots,slot_ranks", [(SLOTS, None), (SORTED_SLOTS, None), (SORTED_SLOTS, [8, 3, 5]),
                                              (SORTED_SLOTS, [32, 3, 17]), ([2], None)],
                         ids=["mixed", "sorted-runs", "slot-ranks", "slot-ranks-32", "one-row"])
@pytest.mark.parametrize("early_loads", [0, 1, 2])
def test_rotary_lora_cache_kernel_matches_expand_then_rotary(heads, kv_heads, head_dim, slots, slot_ranks,
                                                              early_loads, rank_table, poisoned_empty, monkeypatch):
    """One launch adds the qkv delta, rotates q and k and writes K/V to their (NaN-poisoned) cache
    slots: the same as the expand, the reference rotary and write_kv, and no other slot is touched,
    whatever the kernel loads before the delta."""
    monkeypatch.setattr(rotary_triton, "LORA_EARLY_LOADS", early_loads)
    widths = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    qkv, delta = folded_output(slots, widths, segments=True, slot_ranks=slot_ranks,
                               table_rank=max(slot_ranks) if slot_ranks else RANK)
    n = len(slots)
    rotary = _rotary_tables(head_dim)
    positions = torch.randint(0, 32, (n,), device=DEVICE, dtype=torch.int32)
    pool = torch.full((2, 12, 4, kv_heads, head_dim), float("nan"), device=DEVICE)
    cache_slots = torch.randperm(48, device=DEVICE)[:n]
    ref_pool = pool.clone()
    qkv0 = qkv.clone()
    q, k, v = rotary_triton.rotary_lora_forward_and_cache(qkv, delta, heads, kv_heads, rotary.cos, rotary.sin,
                                                          positions, pool[0], pool[1], cache_slots)
    expected = _rotary_lora_reference(qkv0, delta, heads, kv_heads, head_dim, rotary, positions, ref_pool[0],
                                      ref_pool[1], cache_slots)
    torch.testing.assert_close((q, k, v), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pool, ref_pool, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert torch.isnan(pool.view(2, -1, kv_heads, head_dim)[:, cache_slots]).sum() == 0
    assert torch.equal(qkv, qkv0)   # the GEMM output is read, never written


@pytest.mark.parametrize("segmented", [True, False])
def test_rotary_lora_dispatch_paths_agree(segmented):
    """The dispatcher's Triton path (fused for segmented batches, expand + rotary for one-token
    segments) and its reference path give the same q, k, v and cache."""
    heads, kv_heads, head_dim = ROTARY_HEADS[0]
    slots = SORTED_SLOTS if segmented else SLOTS
    qkv, delta = folded_output(slots, [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim],
                               segments=segmented)
    assert (delta.meta.max_seg_len > 1) == segmented
    rotary = _rotary_tables(head_dim)
    positions = torch.randint(0, 32, (len(slots),), device=DEVICE, dtype=torch.int32)
    cache_slots = torch.randperm(48, device=DEVICE)[:len(slots)]
    results = []
    for backend in ("triton", "torch"):
        pool = torch.zeros(2, 12, 4, kv_heads, head_dim, device=DEVICE)
        out = apply_rotary_lora_and_cache(qkv.clone(), delta, heads, kv_heads, rotary.cos, rotary.sin, positions,
                                          pool[0], pool[1], cache_slots, backend=backend)
        results.append((*out, pool))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- GPU, bf16, decode sizes


@needs_gpu
@pytest.mark.parametrize("sorted_rows", [False, True])   # True: a sorted decode batch, the tiled SiLU path
def test_fused_lora_kernels_bf16_match_separate_kernels(sorted_rows):
    """Against the separate Triton expand + add + norm / SiLU kernels: last-bit differences only."""
    slots = [i % 4 - 1 for i in range(64)]
    slots = sorted(slots) if sorted_rows else slots
    out, delta = folded_output(slots, [4096], d_in=4096, dtype=torch.bfloat16, segments=sorted_rows)
    residual = torch.randn(64, 4096, device=DEVICE).bfloat16()
    weight = (torch.rand(4096, device=DEVICE) + 0.5).bfloat16()
    y, h = fused_triton.add_rms_norm(out, delta, residual, weight, EPS)
    sep = delta.apply_(out.clone())
    h_sep = residual + sep
    torch.testing.assert_close(h, h_sep, rtol=1e-2, atol=1e-2)
    assert (h != h_sep).float().mean().item() < 0.01
    assert (y != fused.rms_norm(h_sep, weight, EPS)).float().mean().item() < 0.01
    gate_up, delta = folded_output(slots, [14336, 14336], d_in=4096, dtype=torch.bfloat16, segments=sorted_rows)
    y = fused_triton.silu_and_mul_lora(gate_up, delta)
    ref = fused.silu_and_mul(delta.apply_(gate_up.clone()))
    torch.testing.assert_close(y, ref, rtol=1e-2, atol=1e-2)
    assert (y != ref).float().mean().item() < 0.01


@needs_gpu
def test_rotary_lora_cache_kernel_bf16_at_decode_size():
    """Llama-3-8B's heads at batch 64, adapters sorted: v and the cached values are the separate
    Triton expand's, bit for bit; q and k are within bf16 rounding of an fp32 rotation of the
    expanded q/k (the rotary kernels round each product, so two kernels may differ in the last bit)."""
    from loquetier.kernels.rotary import apply_rotary_ref
    heads, kv_heads, head_dim = 32, 8, 128
    slots = sorted(i % 4 - 1 for i in range(64))   # base rows and the three slots
    widths = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    qkv, delta = folded_output(slots, widths, d_in=4096, dtype=torch.bfloat16, segments=True)
    rotary = _rotary_tables(head_dim, 1024, torch.bfloat16)
    positions = torch.randint(0, 1024, (64,), device=DEVICE, dtype=torch.int32)
    cache_slots = torch.randperm(64 * 16, device=DEVICE)[:64]
    pool = torch.zeros(2, 64, 16, kv_heads, head_dim, device=DEVICE, dtype=torch.bfloat16)
    q, k, v = rotary_triton.rotary_lora_forward_and_cache(qkv, delta, heads, kv_heads, rotary.cos, rotary.sin,
                                                          positions, pool[0], pool[1], cache_slots)
    q_in, k_in, v_in = delta.apply_(qkv.clone()).split(widths, dim=-1)
    assert torch.equal(v, v_in.reshape(-1, kv_heads, head_dim))
    q32, k32 = apply_rotary_ref(q_in.reshape(-1, heads, head_dim).float(), k_in.reshape(-1, kv_heads, head_dim).float(),
                                rotary.cos.float(), rotary.sin.float(), positions)
    for got, ref in ((q, q32), (k, k32)):
        assert ((got.float() - ref).norm() / ref.norm()).item() <= 1e-2
    cache = pool.view(2, -1, kv_heads, head_dim)[:, cache_slots]
    assert torch.equal(cache[0], k) and torch.equal(cache[1], v)
