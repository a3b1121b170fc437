"""Segmented Multi-LoRA Multiplication (SMLM): every segment's LoRA delta for one layer in one op.

Layout of one (possibly fused) virtual layer's adapter table, shared with the Triton kernels:
  lora_a  [L, S*R, d_in]        slot l, slice s uses rows s*R .. s*R+r (rank r <= R, rest zero)
  lora_b  [L, d_out, R]         rows slice_offsets[s] .. slice_offsets[s+1] belong to slice s
  scaling [L, S] float32        alpha/r (or alpha/sqrt(r)); 0 where the adapter skips that module
The flat token batch is cut into segments (`seg_cu`, `seg_slot`, -1 = base only). Training
segments come first, so the tokens that need a backward are the prefix `[:num_train_tokens]`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from .backend import use_triton
from .lora_dropout import lora_dropout


@dataclass
class LoraBatchMeta:
    """Per-step segment metadata for SMLM, built once per step on the host and copied once."""

    seg_cu: torch.Tensor        # int32 [G+1] on device
    seg_slot: torch.Tensor      # int32 [G] on device, -1 = no adapter
    token_slot: torch.Tensor    # int32 [N] on device, -1 = no adapter
    seg_cu_host: list[int]
    seg_slot_host: list[int]
    max_seg_len: int
    num_train_tokens: int = 0   # training segments are the prefix [0, num_train_tokens)
    num_train_segments: int = 0
    train_slots: tuple[int, ...] = ()   # adapter slots with training tokens this step
    # LoRA dropout of training tokens (see lora_dropout.py): per-token keys [num_train_tokens] and
    # each slot's probability [L] (a persistent table of the adapter manager)
    any_dropout: bool = False
    dropout_keys: torch.Tensor | None = None
    slot_dropout: torch.Tensor | None = None
    # a leaf that requires grad: SMLM nodes hang off it, so the backward reaches them even where
    # the layer's input needs no gradient (the first layer); it never receives one itself
    grad_anchor: torch.Tensor | None = None
    _masks: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        # read by every virtual layer: computed once per step, not re-scanned in each layer
        self.any_adapter = any(s >= 0 for s in self.seg_slot_host)

    def train_mask(self, slot: int, dtype: torch.dtype) -> torch.Tensor:
        """[num_train_tokens, 1]: 1 for the training tokens of `slot`; made once per step."""
        mask = self._masks.get((slot, dtype))
        if mask is None:
            mask = (self.token_slot[:self.num_train_tokens] == slot).to(dtype).unsqueeze(1)
            self._masks[(slot, dtype)] = mask
        return mask


# ----------------------------------------------------------------------------- reference path
def shrink_ref(x: torch.Tensor, lora_a: torch.Tensor, meta: LoraBatchMeta) -> torch.Tensor:
    """v[t] = lora_a[slot(t)] @ x[t]; zero for tokens without an adapter. Returns [N, S*R]."""
    v = x.new_zeros(x.shape[0], lora_a.shape[1])
    cu = meta.seg_cu_host
    for g, slot in enumerate(meta.seg_slot_host):
        if slot >= 0 and cu[g + 1] > cu[g]:
            v[cu[g]:cu[g + 1]] = x[cu[g]:cu[g + 1]] @ lora_a[slot].t()
    return v


def expand_ref_(y: torch.Tensor, v: torch.Tensor, lora_b: torch.Tensor, scaling: torch.Tensor,
                slice_offsets: tuple[int, ...], meta: LoraBatchMeta, v_slot_stride: int = 0) -> torch.Tensor:
    """In place: y[t, slice s] += scaling[l, s] * v[t, l*V + s*R : l*V + (s+1)*R] @ lora_b[l, slice s].T
    (V = `v_slot_stride`: 0 when v holds only each token's own slot, S*R when it holds every slot's)."""
    rank = lora_b.shape[2]
    cu = meta.seg_cu_host
    for g, slot in enumerate(meta.seg_slot_host):
        if slot < 0 or cu[g + 1] == cu[g]:
            continue
        for s in range(len(slice_offsets) - 1):
            lo, hi = slice_offsets[s], slice_offsets[s + 1]
            col = slot * v_slot_stride + s * rank
            vs = v[cu[g]:cu[g + 1], col:col + rank]
            y[cu[g]:cu[g + 1], lo:hi] += (vs @ lora_b[slot, lo:hi].t()) * scaling[slot, s].to(y.dtype)
    return y


def shrink(x, lora_a, meta: LoraBatchMeta, backend: str = "auto", slot_rank: torch.Tensor | None = None,
           table_rank: int = 0):
    """`slot_rank` (int32 [L], with the table's rank R): the kernels skip each slot's zero padding."""
    if use_triton(x, backend):
        from .smlm_triton import shrink as shrink_triton
        return shrink_triton(x, lora_a, meta.seg_cu, meta.seg_slot, meta.token_slot, meta.max_seg_len,
                             slot_rank=slot_rank, table_rank=table_rank)
    return shrink_ref(x, lora_a, meta)


def expand_(y, v, lora_b, scaling, slice_offsets, meta: LoraBatchMeta, backend: str = "auto",
            v_slot_stride: int = 0, slot_rank: torch.Tensor | None = None):
    if use_triton(y, backend):
        from .smlm_triton import expand_ as expand_triton
        return expand_triton(y, v, lora_b, scaling, slice_offsets, meta.seg_cu, meta.seg_slot,
                             meta.token_slot, meta.max_seg_len, v_slot_stride, slot_rank)
    return expand_ref_(y, v, lora_b, scaling, slice_offsets, meta, v_slot_stride)


@dataclass
class LoraDelta:
    """A folded layer's LoRA delta, not yet added to its base output `y`:
    y[t, slice s] += scaling[l, s] * lora_b[l, slice s] @ v[t, l*V + s*R : l*V + (s+1)*R], l = slot(t).

    `v` [N, L*V] holds every slot's shrink (the folded GEMM's extra columns). The consumer of `y`
    (the next residual-add + RMSNorm, or SiLU-and-mul) adds it inside its own kernel, which saves
    the expand's launch and its pass over `y`; `apply_` is the stand-alone expand.
    """

    v: torch.Tensor
    lora_b: torch.Tensor        # [L, d_out, R]
    scaling: torch.Tensor       # [L, S] fp32
    slice_offsets: tuple[int, ...]
    meta: LoraBatchMeta
    backend: str = "auto"
    slot_rank: torch.Tensor | None = None   # int32 [L]: each slot's rank; B's padding past it is not read

    @property
    def slot_stride(self) -> int:
        return self.v.shape[1] // self.lora_b.shape[0]

    def apply_(self, y: torch.Tensor) -> torch.Tensor:
        return expand_(y, self.v, self.lora_b, self.scaling, self.slice_offsets, self.meta, self.backend,
                       v_slot_stride=self.slot_stride, slot_rank=self.slot_rank)


# ----------------------------------------------------------------------------- autograd
@dataclass
class TrainSlot:
    """What the SMLM backward needs of one adapter slot that trains, in one virtual layer: its
    weights in the training layout (slice s of A is rows s*r..(s+1)*r) and the gradient buffers
    it accumulates into (views of the adapter's one flat buffer, see lora/trainable.py)."""

    rank: int                  # r, at most the slot table's rank R
    weight_a: torch.Tensor     # [S*r, d_in]
    weight_b: torch.Tensor     # [d_out, r]
    grad_a: torch.Tensor       # [S*r, d_in]
    grad_b: torch.Tensor       # [d_out, r]


class _SMLMFunction(torch.autograd.Function):
    """out = y + SMLM(x). The backward adds the LoRA gradients of the training tokens into each
    trained slot's buffers (no per-parameter autograd) and returns dx for the training rows."""

    @staticmethod
    def forward(ctx, x, y, lora_a, lora_b, scaling, slice_offsets, meta, train, salt, backend, anchor,
                shrink_reduce, col_offset, slot_rank):
        n_train = meta.num_train_tokens
        x_lora = x
        if meta.any_dropout:
            x_lora = lora_dropout(x, n_train, meta.dropout_keys, meta.token_slot, meta.slot_dropout, salt, backend,
                                  col_offset)
        v = shrink(x_lora, lora_a, meta, backend, slot_rank, lora_b.shape[2])
        if shrink_reduce is not None:
            shrink_reduce(v)
        # y is the base GEMM's fresh output (its own backward does not need it): add in place
        expand_(y, v, lora_b, scaling, slice_offsets, meta, backend, slot_rank=slot_rank)
        ctx.mark_dirty(y)
        ctx.save_for_backward(x_lora[:n_train], v[:n_train], scaling)
        ctx.meta, ctx.train, ctx.slice_offsets, ctx.salt, ctx.backend = meta, train, slice_offsets, salt, backend
        ctx.col_offset = col_offset
        ctx.num_rows = x.shape[0]
        return y

    @staticmethod
    def backward(ctx, dout):
        x_train, v_train, scaling = ctx.saved_tensors
        meta, offs = ctx.meta, ctx.slice_offsets
        n = meta.num_train_tokens
        dy = dout[:n]
        slice_mask = _slice_mask(offs, dy.device)
        # several trained slots: their rows are picked by a mask, not by host-side segment
        # boundaries, so shapes depend only on the token count (graph-friendly)
        if len(ctx.train) > 1:
            dx = _backward_slots_together(dy, x_train, v_train, scaling, ctx.train, meta, offs, slice_mask,
                                          ctx.needs_input_grad[0])
        else:
            dx = _backward_one_slot(dy, x_train, v_train, scaling, ctx.train[0], offs, slice_mask,
                                    ctx.needs_input_grad[0])
        if dx is not None:
            if meta.any_dropout:   # the same mask again: the op is linear in x
                dx = lora_dropout(dx, n, meta.dropout_keys, meta.token_slot, meta.slot_dropout, ctx.salt, ctx.backend,
                                  ctx.col_offset)
            if ctx.num_rows > n:   # inference / evaluation rows get no gradient
                dx = torch.nn.functional.pad(dx, (0, 0, 0, ctx.num_rows - n))
        return dx, dout, None, None, None, None, None, None, None, None, None, None, None, None


def _backward_one_slot(dy, x_train, v_train, scaling, slot_train, offs, slice_mask, needs_dx):
    """The LoRA gradients of one trained slot, whose rows are every training row."""
    n, num_slices, d_out = dy.shape[0], len(offs) - 1, offs[-1]
    table_rank = v_train.shape[1] // num_slices
    slot, ts = slot_train
    r = ts.rank
    scale = scaling[slot]                                                         # [S] fp32
    block_scale = slice_mask * scale                                              # [d_out, S]
    # B laid out block-diagonally with its scales folded in ([d_out, S*r]): dv for every slice is
    # one GEMM; cuBLAS accumulates the gradients in fp32 (addmm into the buffers)
    b_block = (ts.weight_b.unsqueeze(1) * block_scale.unsqueeze(2)).to(dy.dtype).reshape(d_out, -1)
    dv = dy @ b_block                                                             # [n, S*r]
    ts.grad_a.addmm_(dv.t(), x_train)
    vs = (v_train.view(n, num_slices, table_rank)[:, :, :r] * scale[:, None]).to(dy.dtype).reshape(n, -1)
    for s in range(num_slices):
        lo, hi = offs[s], offs[s + 1]
        ts.grad_b[lo:hi].addmm_(dy[:, lo:hi].t(), vs[:, s * r:(s + 1) * r])
    return dv @ ts.weight_a if needs_dx else None


def _backward_slots_together(dy, x_train, v_train, scaling, train, meta, offs, slice_mask, needs_dx):
    """The LoRA gradients of K trained slots in the GEMMs of one: every slot's B (and A) side by side,
    padded to the largest rank, and a [rows, K] mask that keeps each row's own slot. A pass per slot
    would read the step's activations K times; here they are read once, for the cost of wider GEMMs.
    Shapes depend only on the token count and the slots' ranks (graph-friendly)."""
    n, num_slices, d_out = dy.shape[0], len(offs) - 1, offs[-1]
    table_rank = v_train.shape[1] // num_slices
    K, r_max = len(train), max(ts.rank for _, ts in train)
    slots = [slot for slot, _ in train]
    mask = torch.cat([meta.train_mask(slot, dy.dtype) for slot in slots], 1)       # [n, K]
    # rows picked one by one (views), not `scaling[slots]`: indexing with a host list copies the
    # index to the device, which CUDA graph capture refuses (the step would then run eagerly)
    scale = torch.stack([scaling[slot] for slot in slots])                        # [K, S] fp32
    b_all = dy.new_zeros(d_out, K, num_slices, r_max)
    a_all = dy.new_zeros(K, num_slices, r_max, x_train.shape[1]) if needs_dx else None
    for k, (_, ts) in enumerate(train):
        r = ts.rank
        b_all[:, k, :, :r] = ts.weight_b.unsqueeze(1) * (slice_mask * scale[k]).unsqueeze(2)
        if needs_dx:
            a_all[k, :, :r] = ts.weight_a.view(num_slices, r, -1)
    dv = (dy @ b_all.view(d_out, -1)).view(n, K, -1) * mask.unsqueeze(2)          # [n, K, S*r_max]
    dv = dv.view(n, -1)
    grad_a = (dv.t() @ x_train).view(K, num_slices, r_max, -1)
    # each row's shrink output is its own slot's: masked and scaled per slot, [n, S, K, r_max]
    v = v_train.view(n, num_slices, table_rank)
    v = v[:, :, :r_max] if table_rank >= r_max else torch.nn.functional.pad(v, (0, r_max - table_rank))
    vs = (v.unsqueeze(2) * scale.t().unsqueeze(0).unsqueeze(3) * mask.view(n, 1, K, 1)).to(dy.dtype)
    for s in range(num_slices):
        lo, hi = offs[s], offs[s + 1]
        grad_b = (dy[:, lo:hi].t() @ vs[:, s].reshape(n, -1)).view(hi - lo, K, r_max)
        for k, (_, ts) in enumerate(train):
            ts.grad_b[lo:hi].add_(grad_b[:, k, :ts.rank])
    for k, (_, ts) in enumerate(train):
        ts.grad_a.view(num_slices, ts.rank, -1).add_(grad_a[k, :, :ts.rank])
    return dv @ a_all.view(-1, x_train.shape[1]) if needs_dx else None


@functools.lru_cache(maxsize=64)
def _slice_mask(slice_offsets: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[d_out, S] float32, 1 where output row belongs to slice s: made once per layer shape."""
    mask = torch.zeros(slice_offsets[-1], len(slice_offsets) - 1, dtype=torch.float32)
    for s in range(len(slice_offsets) - 1):
        mask[slice_offsets[s]:slice_offsets[s + 1], s] = 1
    return mask.to(device)


def smlm(x: torch.Tensor, y: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
         scaling: torch.Tensor, slice_offsets: tuple[int, ...], meta: LoraBatchMeta,
         train: tuple[tuple[int, TrainSlot], ...] = (), salt: int = 0, backend: str = "auto",
         shrink_reduce=None, col_offset: int = 0, slot_rank: torch.Tensor | None = None) -> torch.Tensor:
    """Return y + each segment's `scale * (x A^T) B^T`.

    Without trained slots (or with grad disabled) the delta is added into `y` in place and no
    graph is recorded. With `train` ((slot, TrainSlot) pairs trained this step), an autograd node
    gives dx for the training rows and accumulates every trained slot's A/B gradients into its
    buffers; LoRA dropout (if any) applies to the training rows' LoRA input.

    Tensor parallelism (row-parallel layers): `shrink_reduce` sums the shrink over ranks in place;
    `col_offset` is this rank's first input column (dropout masks hash global columns).
    `slot_rank` (int32 [L], optional): each slot's rank; the kernels read no padding past it.
    """
    if not train or not torch.is_grad_enabled():
        v = shrink(x, lora_a, meta, backend, slot_rank, lora_b.shape[2])
        if shrink_reduce is not None:
            shrink_reduce(v)
        return expand_(y, v, lora_b, scaling, slice_offsets, meta, backend, slot_rank=slot_rank)
    assert meta.grad_anchor is not None, "a training step needs LoraBatchMeta.grad_anchor"
    return _SMLMFunction.apply(x, y, lora_a, lora_b, scaling, slice_offsets, meta, train, salt, backend,
                               meta.grad_anchor, shrink_reduce, col_offset, slot_rank)
