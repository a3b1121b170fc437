"""Collectives as autograd functions (Megatron's f and g), gathered logits, vocab-parallel cross entropy."""

from __future__ import annotations

import torch
import torch.distributed as dist


class _CopyToParallel(torch.autograd.Function):
    """f: identity forward (the input is the same on every rank); the backward sums the input's
    gradient over ranks, since each rank's column shard contributes part of it."""

    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.tp.all_reduce_(grad.clone(memory_format=torch.contiguous_format)), None


class _ReduceFromParallel(torch.autograd.Function):
    """g: sums the ranks' partial outputs (in place); identity backward (the gradient of the sum is
    the same on every rank)."""

    @staticmethod
    def forward(ctx, y, tp):
        tp.all_reduce_(y)
        ctx.mark_dirty(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_parallel(x: torch.Tensor, tp) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return _CopyToParallel.apply(x, tp)
    return x


def reduce_from_parallel(y: torch.Tensor, tp) -> torch.Tensor:
    if torch.is_grad_enabled() and y.requires_grad:
        return _ReduceFromParallel.apply(y, tp)
    return tp.all_reduce_(y)


def gather_last_dim(local: torch.Tensor, tp) -> torch.Tensor:
    """[N, V/size] on each rank -> [N, V] on every rank (rank r's columns at r*V/size)."""
    n, width = local.shape
    out = torch.empty(tp.size * n, width, dtype=local.dtype, device=local.device)
    dist.all_gather_single(out, local.contiguous(), group=tp.group)
    return out.view(tp.size, n, width).permute(1, 0, 2).reshape(n, tp.size * width)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Token cross entropy from vocab-sharded logits without gathering them: two all-reduces of
    [N] vectors (the max, then the sum of exponentials and the target's logit)."""

    @staticmethod
    def forward(ctx, logits, targets, tp):
        width = logits.shape[1]
        local_t = targets - tp.rank * width
        inside = (local_t >= 0) & (local_t < width)
        local_t = local_t.clamp(0, width - 1)
        row_max = logits.detach().amax(1)
        tp.all_reduce_(row_max, dist.ReduceOp.MAX)
        exp = (logits - row_max[:, None]).exp_()
        stats = torch.stack([exp.sum(1), (logits.gather(1, local_t[:, None]).squeeze(1) - row_max) * inside])
        tp.all_reduce_(stats)
        sum_exp, target_logit = stats
        exp /= sum_exp[:, None]   # softmax
        ctx.save_for_backward(exp, local_t, inside)
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad):
        softmax, local_t, inside = ctx.saved_tensors
        d = softmax * grad[:, None]
        d.scatter_add_(1, local_t[:, None], -(grad * inside)[:, None])
        return d, None, None


def vocab_parallel_cross_entropy(local_logits: torch.Tensor, targets: torch.Tensor, tp) -> torch.Tensor:
    """Per-token cross entropy (fp32 logits [N, V/size], targets [N] in [0, V)), as F.cross_entropy."""
    return _VocabParallelCrossEntropy.apply(local_logits, targets, tp)
