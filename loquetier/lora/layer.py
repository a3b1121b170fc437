"""The virtualized LoRA layer: a thin view over one shared base linear plus a table of adapter slots.

The base weight is referenced, never copied. Each slot holds one adapter's A/B for every slice of
the (possibly fused) layer, e.g. q/k/v of a fused QKV projection. The `AdapterManager` writes the
slots; the layer only reads them (policy vs mechanism).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.smlm import LoraBatchMeta, TrainParamRef, smlm


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
        # slot -> trainable views into lora_a / lora_b, and where each one lives
        self.train_refs: dict[int, tuple[TrainParamRef, ...]] = {}
        self.train_params: dict[int, tuple[nn.Parameter, ...]] = {}

    def allocate(self) -> None:
        """Allocate the (empty) slot table in the base weight's dtype and device."""
        w = self.base.weight
        num_slices = len(self.slice_names)
        self.lora_a = torch.zeros(self.num_slots, num_slices * self.max_rank, self.base.in_features,
                                  dtype=w.dtype, device=w.device)
        self.lora_b = torch.zeros(self.num_slots, self.base.out_features, self.max_rank,
                                  dtype=w.dtype, device=w.device)
        self.scaling = torch.zeros(self.num_slots, num_slices, dtype=torch.float32, device=w.device)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    def slice_index(self, name: str) -> int:
        return self.slice_names.index(name)

    # ------------------------------------------------------------------ slot writes (manager only)
    def clear_slot(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.scaling[slot].zero_()
        self.train_refs.pop(slot, None)
        self.train_params.pop(slot, None)

    def write_slice(self, slot: int, name: str, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """Copy one module's A [r, d_in] and B [d_out, r] into the slot, zero-padded to max_rank."""
        s = self.slice_index(name)
        r = a.shape[0]
        lo, hi = self.slice_offsets[s], self.slice_offsets[s + 1]
        R = self.max_rank
        self.lora_a[slot, s * R:(s + 1) * R].zero_()
        self.lora_a[slot, s * R:s * R + r].copy_(a)
        self.lora_b[slot, lo:hi].zero_()
        self.lora_b[slot, lo:hi, :r].copy_(b)
        self.scaling[slot, s] = scale

    def read_slice(self, slot: int, name: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of one module's A [r, d_in] and B [d_out, r] in the slot."""
        s = self.slice_index(name)
        lo, hi = self.slice_offsets[s], self.slice_offsets[s + 1]
        R = self.max_rank
        return self.lora_a[slot, s * R:s * R + rank], self.lora_b[slot, lo:hi, :rank]

    def make_trainable(self, slot: int, ranks: dict[str, int]) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
        """Expose the slot's A/B of the given slices as Parameters that alias the table."""
        refs, params, out = [], [], {}
        for name, r in ranks.items():
            a, b = self.read_slice(slot, name, r)
            s = self.slice_index(name)
            pa, pb = nn.Parameter(a, requires_grad=True), nn.Parameter(b, requires_grad=True)
            refs += [TrainParamRef(slot, s, "A", r), TrainParamRef(slot, s, "B", r)]
            params += [pa, pb]
            out[name] = (pa, pb)
        self.train_refs[slot] = tuple(refs)
        self.train_params[slot] = tuple(params)
        return out

    def freeze(self, slot: int) -> None:
        self.train_refs.pop(slot, None)
        self.train_params.pop(slot, None)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, meta: LoraBatchMeta | None) -> torch.Tensor:
        if meta is not None and 0 < meta.num_train_tokens < x.shape[0] and x.requires_grad:
            y = _TrainPrefixLinear.apply(x, self.base.weight, self.base.bias, meta.num_train_tokens)
        else:
            y = F.linear(x, self.base.weight, self.base.bias)
        if meta is None or not meta.any_adapter:
            return y
        refs: tuple[TrainParamRef, ...] = ()
        params: tuple[torch.Tensor, ...] = ()
        if meta.num_train_tokens and self.train_refs:
            for slot in meta.train_dropout:  # the slots trained this step
                if slot in self.train_refs:
                    refs += self.train_refs[slot]
                    params += self.train_params[slot]
        return smlm(x, y, self.lora_a, self.lora_b, self.scaling, self.slice_offsets, meta,
                    refs, params, self.backend)
