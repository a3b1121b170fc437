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
    # LoRA dropout probability of each slot trained this step (applied to training segments only)
    train_dropout: dict[int, float] = field(default_factory=dict)
    # per trained slot, the job's own RNG for dropout masks (resumable, independent of serving)
    dropout_generators: dict[int, torch.Generator] = field(default_factory=dict)

    def __post_init__(self):
        # read by every virtual layer: computed once per step, not re-scanned in each layer
        self.any_adapter = any(s >= 0 for s in self.seg_slot_host)


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


def shrink(x, lora_a, meta: LoraBatchMeta, backend: str = "auto"):
    if use_triton(x, backend):
        from .smlm_triton import shrink as shrink_triton
        return shrink_triton(x, lora_a, meta.seg_cu, meta.seg_slot, meta.token_slot, meta.max_seg_len)
    return shrink_ref(x, lora_a, meta)


def expand_(y, v, lora_b, scaling, slice_offsets, meta: LoraBatchMeta, backend: str = "auto",
            v_slot_stride: int = 0):
    if use_triton(y, backend):
        from .smlm_triton import expand_ as expand_triton
        return expand_triton(y, v, lora_b, scaling, slice_offsets, meta.seg_cu, meta.seg_slot,
                             meta.token_slot, meta.max_seg_len, v_slot_stride)
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

    @property
    def slot_stride(self) -> int:
        return self.v.shape[1] // self.lora_b.shape[0]

    def apply_(self, y: torch.Tensor) -> torch.Tensor:
        return expand_(y, self.v, self.lora_b, self.scaling, self.slice_offsets, self.meta, self.backend,
                       v_slot_stride=self.slot_stride)


# ----------------------------------------------------------------------------- autograd
@dataclass(frozen=True)
class TrainParamRef:
    """Where a trainable parameter lives in the slot table: slot, slice, 'A' or 'B', its rank."""

    slot: int
    slice: int
    kind: str
    rank: int


class _SMLMFunction(torch.autograd.Function):
    """out = y + SMLM(x). Backward: grads only from training segments, only for trainable slots."""

    @staticmethod
    def forward(ctx, x, y, lora_a, lora_b, scaling, slice_offsets, meta, refs, backend, shrink_reduce, x_cols,
                *params):
        n_train = meta.num_train_tokens
        x_lora = x
        masks: dict[int, torch.Tensor] = {}
        if meta.train_dropout and any(p > 0 for p in meta.train_dropout.values()):
            x_lora = x.clone()
            cu = meta.seg_cu_host
            for g in range(meta.num_train_segments):
                p = meta.train_dropout.get(meta.seg_slot_host[g], 0.0)
                if p > 0:
                    gen = meta.dropout_generators.get(meta.seg_slot_host[g])
                    keep = _dropout_keep(x[cu[g]:cu[g + 1]], p, gen, x_cols)
                    x_lora[cu[g]:cu[g + 1]] *= keep
                    masks[g] = keep
        v = shrink(x_lora, lora_a, meta, backend)
        if shrink_reduce is not None:
            shrink_reduce(v)
        # y is the base GEMM's fresh output (its own backward does not need it): add in place
        expand_(y, v, lora_b, scaling, slice_offsets, meta, backend)
        ctx.mark_dirty(y)
        ctx.save_for_backward(x_lora[:n_train], v[:n_train], lora_a, lora_b, scaling)
        ctx.meta, ctx.refs, ctx.slice_offsets, ctx.masks = meta, refs, slice_offsets, masks
        ctx.x_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, dout):
        x_train, v_train, lora_a, lora_b, scaling = ctx.saved_tensors
        meta, refs, offs = ctx.meta, ctx.refs, ctx.slice_offsets
        rank = lora_b.shape[2]
        num_slices = len(offs) - 1
        d_out = lora_b.shape[1]
        mask = _slice_mask(offs, lora_b.device)
        runs = _train_runs(meta)
        single = len(runs) == 1 and runs[0][1] == 0 and runs[0][2] == ctx.x_shape[0]
        dx = None
        if ctx.needs_input_grad[0] and not single:
            dx = torch.zeros(ctx.x_shape, dtype=dout.dtype, device=dout.device)
        dA: dict[int, torch.Tensor] = {}
        dB: dict[int, torch.Tensor] = {}
        # Consecutive training segments of one slot form one run. Each run costs a fixed handful
        # of GEMMs whatever the number of slices: B is laid out block-diagonally with its scale
        # folded in ([d_out, S*R], slice s's rows only in columns s*R..), so dv for every slice
        # is one GEMM, and dB for every slice is one GEMM masked back to its block. The scales
        # stay on the device (no host round trip); cuBLAS accumulates in fp32.
        for slot, a, b, segs in runs:
            dy, v, x = dout[a:b], v_train[a:b], x_train[a:b]
            block_scale = mask * scaling[slot]                                   # [d_out, S] fp32
            b_block = (lora_b[slot].unsqueeze(1) * block_scale.unsqueeze(2)).to(dy.dtype).reshape(d_out, -1)
            dv = dy @ b_block                                                    # [n, S*R]
            gB = ((dy.t() @ v).view(d_out, num_slices, rank) * block_scale.unsqueeze(2)).sum(1).to(lora_b.dtype)
            gA = dv.t() @ x
            dA[slot] = gA if slot not in dA else dA[slot] + gA
            dB[slot] = gB if slot not in dB else dB[slot] + gB
            if ctx.needs_input_grad[0]:
                dxr = dv @ lora_a[slot]
                for g in segs:
                    if g in ctx.masks:
                        ga, gb = meta.seg_cu_host[g] - a, meta.seg_cu_host[g + 1] - a
                        dxr[ga:gb] *= ctx.masks[g]
                if single:
                    dx = dxr
                else:
                    dx[a:b] = dxr
        param_grads = []
        for ref in refs:
            if ref.kind == "A":
                g = dA.get(ref.slot)
                param_grads.append(None if g is None else g[ref.slice * rank:ref.slice * rank + ref.rank])
            else:
                g = dB.get(ref.slot)
                lo, hi = offs[ref.slice], offs[ref.slice + 1]
                param_grads.append(None if g is None else g[lo:hi, :ref.rank])
        return (dx, dout, None, None, None, None, None, None, None, None, None, *param_grads)


def _dropout_keep(x_seg: torch.Tensor, p: float, gen, x_cols: tuple[int, int] | None) -> torch.Tensor:
    """Inverted-dropout multipliers for x_seg. With `x_cols` (full width, first column) x_seg holds
    columns of a wider input (a tensor-parallel shard): the mask is drawn over the full width and
    cut, so every split of the layer applies the same mask."""
    if x_cols is None:
        return torch.empty_like(x_seg).bernoulli_(1 - p, generator=gen) / (1 - p)
    width, lo = x_cols
    full = x_seg.new_empty(x_seg.shape[0], width).bernoulli_(1 - p, generator=gen)
    return full[:, lo:lo + x_seg.shape[1]] / (1 - p)


@functools.lru_cache(maxsize=64)
def _slice_mask(slice_offsets: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[d_out, S] float32, 1 where output row belongs to slice s: made once per layer shape."""
    mask = torch.zeros(slice_offsets[-1], len(slice_offsets) - 1, dtype=torch.float32)
    for s in range(len(slice_offsets) - 1):
        mask[slice_offsets[s]:slice_offsets[s + 1], s] = 1
    return mask.to(device)


def _train_runs(meta: LoraBatchMeta):
    """(slot, start, end, segment ids) of maximal runs of adjacent training segments sharing a slot."""
    cu, slots = meta.seg_cu_host, meta.seg_slot_host
    runs = []
    for g in range(meta.num_train_segments):
        slot = slots[g]
        if slot < 0 or cu[g + 1] == cu[g]:
            continue
        if runs and runs[-1][0] == slot and runs[-1][2] == cu[g]:
            runs[-1][2] = cu[g + 1]
            runs[-1][3].append(g)
        else:
            runs.append([slot, cu[g], cu[g + 1], [g]])
    return runs


def smlm(x: torch.Tensor, y: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
         scaling: torch.Tensor, slice_offsets: tuple[int, ...], meta: LoraBatchMeta,
         train_refs: tuple[TrainParamRef, ...] = (), train_params: tuple[torch.Tensor, ...] = (),
         backend: str = "auto", shrink_reduce=None, x_cols: tuple[int, int] | None = None) -> torch.Tensor:
    """Return y + each segment's `scale * (x A^T) B^T`.

    Tensor parallelism (row-parallel layers): `shrink_reduce` sums the shrink over ranks in place,
    `x_cols` = (full width, first column) of this rank's input columns (for LoRA dropout masks).

    Without training tokens (or with grad disabled) the delta is added into `y` in place and no
    graph is recorded. With training tokens, an autograd node gives grads for x (training rows)
    and for `train_params` (views of the slot table described by `train_refs`).
    """
    if meta.num_train_tokens == 0 or not torch.is_grad_enabled():
        v = shrink(x, lora_a, meta, backend)
        if shrink_reduce is not None:
            shrink_reduce(v)
        return expand_(y, v, lora_b, scaling, slice_offsets, meta, backend)
    return _SMLMFunction.apply(x, y, lora_a, lora_b, scaling, slice_offsets, meta, train_refs,
                               backend, shrink_reduce, x_cols, *train_params)
