"""The virtualized LoRA layer: a thin view over one shared base linear plus a table of adapter slots.

The base weight exists once. Each slot holds one adapter's A/B for every slice of the (possibly
fused) layer, e.g. q/k/v of a fused QKV projection. The `AdapterManager` writes the slots; the
layer only reads them (policy vs mechanism).

Memory layout: the A table lives in the rows right under the base weight, in one buffer
`[d_out + L*S*R, d_in]`; `base.weight` and `lora_a` are views of it. So an inference forward can
"fold" the SMLM shrink into the base GEMM: one GEMM gives the base output and every slot's
`x A^T`, and each token's own slot's delta is added later (`LoraDelta`: by the expand kernel, or
inside the consumer's kernel — residual add + RMSNorm, SiLU-and-mul). Decode is bound by launches
and weight bytes, not FLOPs, so computing the L-1 unused shrinks costs only reading the A table
(which the shrink kernel reads anyway) and saves one or two launches per layer.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.smlm import LoraBatchMeta, LoraDelta, TrainSlot, smlm

# "auto" folds the shrink into the base GEMM when the stacked A table adds at most this share of
# the base weight's rows (L=4 slots of rank 16 on Llama-3-8B: 1.6-3%); beyond that the GEMM
# would spend more on unused slots than the separate shrink launch costs.
FOLD_MAX_EXTRA_ROWS = 0.25


class _TrainPrefixLinear(torch.autograd.Function):
    """y = x W^T + b over every token; the backward (frozen W) only for the training prefix
    [0, n_train), so inference tokens riding in a training step cost no backward GEMM."""

    @staticmethod
    def forward(ctx, x, weight, bias, n_train):
        ctx.save_for_backward(weight)
        ctx.n_train = n_train
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        (weight,) = ctx.saved_tensors
        dx = dy.new_zeros(dy.shape[0], weight.shape[1])
        dx[:ctx.n_train] = dy[:ctx.n_train] @ weight
        return dx, None, None, None


class VirtualLoraLinear(nn.Module):
    """y = base(x) + SMLM(x) over a table of `max_loras` adapter slots."""

    def __init__(self, base: nn.Linear, slice_names: tuple[str, ...], slice_sizes: tuple[int, ...],
                 max_loras: int, max_rank: int, backend: str = "auto"):
        super().__init__()
        assert sum(slice_sizes) == base.out_features
        self.base = base
        self.slice_names = slice_names
        offsets = [0]
        for size in slice_sizes:
            offsets.append(offsets[-1] + size)
        self.slice_offsets = tuple(offsets)
        self.max_rank = max_rank
        self.backend = backend
        self.num_slots = max_loras
        # allocated by `allocate` once the base weight is on its device (the model is built on meta)
        self.lora_a: torch.Tensor | None = None   # [L, S*R, d_in]
        self.lora_b: torch.Tensor | None = None   # [L, d_out, R]
        self.scaling: torch.Tensor | None = None  # [L, S] float32
        # each slot's rank (the largest of its slices'): the unfolded SMLM kernels read no A row or B
        # column past it, so an adapter of rank 8 in a rank-64 table costs its own bytes, not 64's
        self.slot_rank: torch.Tensor | None = None  # [L] int32
        self.slice_ranks: list[list[int]] = []      # host copy, per slot and slice (slot_writes.py)
        self.weight_aug: torch.Tensor | None = None  # [d_out + L*S*R, d_in]: base weight, then lora_a
        self.bias_aug: torch.Tensor | None = None
        self.fold_shrink = False
        # slot -> its training state (weights in the training layout, gradient buffers), written by
        # the adapter's `AdapterTrainState`; `dropout_salt` keys this layer's dropout masks
        self.train_slots: dict[int, TrainSlot] = {}
        self.dropout_salt = 0
        # tensor parallelism (set by the model): this rank's shard of a column-parallel layer (split by
        # output) or, with tp_row, of a row-parallel one (split by input: partial outputs are summed)
        self.tp = None
        self.tp_row = False

    def allocate(self) -> None:
        """Allocate the (empty) slot table in the base weight's dtype and device, the A table in
        one buffer with the base weight (the base weight moves in; its old storage is freed)."""
        w = self.base.weight
        num_slices = len(self.slice_names)
        d_out, d_in, rows = self.base.out_features, self.base.in_features, num_slices * self.max_rank
        self.weight_aug = torch.zeros(d_out + self.num_slots * rows, d_in, dtype=w.dtype, device=w.device)
        self.weight_aug[:d_out].copy_(w.detach())
        self.base.weight = nn.Parameter(self.weight_aug[:d_out], requires_grad=False)
        self.lora_a = self.weight_aug[d_out:].view(self.num_slots, rows, d_in)
        if self.base.bias is not None:
            self.bias_aug = torch.zeros(self.weight_aug.shape[0], dtype=w.dtype, device=w.device)
            self.bias_aug[:d_out].copy_(self.base.bias.detach())
            self.base.bias = nn.Parameter(self.bias_aug[:d_out], requires_grad=False)
        self.set_fold_shrink("auto")
        self.lora_b = torch.zeros(self.num_slots, self.base.out_features, self.max_rank,
                                  dtype=w.dtype, device=w.device)
        self.scaling = torch.zeros(self.num_slots, num_slices, dtype=torch.float32, device=w.device)
        self.slot_rank = torch.zeros(self.num_slots, dtype=torch.int32, device=w.device)
        self.slice_ranks = [[0] * num_slices for _ in range(self.num_slots)]

    def set_fold_shrink(self, policy: str) -> None:
        """"auto" | "always" | "never": whether inference forwards fold the shrink into the base GEMM."""
        if policy not in ("auto", "always", "never"):
            raise ValueError(f"fold_shrink must be auto, always or never, not {policy!r}")
        extra = self.weight_aug.shape[0] - self.base.out_features
        self.fold_shrink = policy == "always" or (policy == "auto" and extra <= FOLD_MAX_EXTRA_ROWS * self.base.out_features)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    def slice_index(self, name: str) -> int:
        return self.slice_names.index(name)

    # ------------------------------------------------------------------ slot tables
    # written by the manager through slot_writes.py (many layers at once); read here
    def read_slice(self, slot: int, name: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of one module's A [r, d_in] and B [d_out, r] in the slot."""
        s = self.slice_index(name)
        lo, hi = self.slice_offsets[s], self.slice_offsets[s + 1]
        R = self.max_rank
        return self.lora_a[slot, s * R:s * R + rank], self.lora_b[slot, lo:hi, :rank]

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, meta: LoraBatchMeta | None) -> torch.Tensor:
        y, delta = self.forward_deferred(x, meta)
        return y if delta is None else delta.apply_(y)

    def forward_deferred(self, x: torch.Tensor, meta: LoraBatchMeta | None) -> tuple[torch.Tensor, LoraDelta | None]:
        """(y, delta): when the shrink folds into the base GEMM (inference only), the LoRA delta is
        returned for the consumer of y to add in its own kernel; otherwise y is complete."""
        if (self.fold_shrink and meta is not None and meta.any_adapter
                and (meta.num_train_tokens == 0 or not torch.is_grad_enabled())):
            # base output and every slot's shrink in one GEMM
            d_out = self.base.out_features
            y_aug = F.linear(x, self.weight_aug, self.bias_aug)
            if self.tp_row:   # partial sums of the output and of every slot's shrink: one all-reduce
                self.tp.all_reduce_(y_aug)
            return y_aug[:, :d_out], LoraDelta(y_aug[:, d_out:], self.lora_b, self.scaling, self.slice_offsets,
                                               meta, self.backend, self.slot_rank)
        return self._forward_unfolded(x, meta), None

    def _forward_unfolded(self, x: torch.Tensor, meta: LoraBatchMeta | None) -> torch.Tensor:
        if self.tp is not None and not self.tp_row:
            x = self.tp.copy_to(x)   # training: the input's gradient is summed over the column shards
        if meta is not None and 0 < meta.num_train_tokens < x.shape[0] and x.requires_grad:
            y = _TrainPrefixLinear.apply(x, self.base.weight, self.base.bias, meta.num_train_tokens)
        else:
            y = F.linear(x, self.base.weight, self.base.bias)
        if self.tp_row:
            y = self.tp.reduce_from(y)
        if meta is None or not meta.any_adapter:
            return y
        train = ()
        if meta.num_train_tokens and self.train_slots:
            train = tuple((s, self.train_slots[s]) for s in meta.train_slots if s in self.train_slots)
        if self.tp_row:   # the shrink of an input shard is partial: summed over ranks before the expand
            return smlm(x, y, self.lora_a, self.lora_b, self.scaling, self.slice_offsets, meta, train,
                        self.dropout_salt, self.backend, self.tp.all_reduce_, self.tp.rank * x.shape[1],
                        slot_rank=self.slot_rank)
        return smlm(x, y, self.lora_a, self.lora_b, self.scaling, self.slice_offsets, meta,
                    train, self.dropout_salt, self.backend, slot_rank=self.slot_rank)
