"""Counter-based LoRA dropout: the Triton kernel against the reference, the masks' statistics, and
their independence of where a token sits in the batch."""

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from helpers import DEVICE  # noqa: E402

from loquetier.kernels.lora_dropout import dropout_keys, layer_salt, lora_dropout_ref  # noqa: E402


def _case(device, dtype=torch.float32):
    torch.manual_seed(0)
    lengths = np.asarray([37, 5, 64, 1])
    keys = torch.from_numpy(dropout_keys(np.asarray([7, 2**31 + 3, 11, 99]), lengths)).to(device)
    n = int(lengths.sum())
    token_slot = torch.repeat_interleave(torch.tensor([0, 2, 1, 0], dtype=torch.int32), torch.from_numpy(lengths))
    token_slot = torch.cat([token_slot, torch.tensor([1, 1, 1], dtype=torch.int32)]).to(device)
    slot_p = torch.tensor([0.1, 0.5, 0.0], device=device)
    x = torch.randn(n + 3, 1500, device=device).to(dtype)
    return x, n, keys, token_slot, slot_p


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference(dtype):
    from loquetier.kernels.lora_dropout_triton import lora_dropout
    x, n, keys, token_slot, slot_p = _case(DEVICE, dtype)
    out = lora_dropout(x, n, keys, token_slot, slot_p, layer_salt(5))
    ref = lora_dropout_ref(x, n, keys, token_slot, slot_p, layer_salt(5))
    assert torch.equal(out == 0, ref == 0)                     # the same mask, bit for bit
    torch.testing.assert_close(out, ref, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=0)
    assert torch.equal(out[n:], x[n:])                          # rows past the training rows: copied


def test_masks_have_the_asked_rate_and_depend_only_on_key_salt_and_column():
    x, n, keys, token_slot, slot_p = _case("cpu")
    ones = torch.ones_like(x)
    out = lora_dropout_ref(ones, n, keys, token_slot, slot_p, layer_salt(1))
    for slot, p in enumerate(slot_p.tolist()):
        rows = (token_slot[:n] == slot).nonzero().flatten()
        dropped = (out[rows] == 0).float().mean().item()
        assert abs(dropped - p) < 0.02, (slot, dropped, p)
        kept = out[rows][out[rows] != 0]
        torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - p)))
    # a token's mask is the same wherever it sits in the batch (packing, other jobs)...
    perm = torch.randperm(n)
    moved = lora_dropout_ref(ones[:n][perm], n, keys[perm], token_slot[:n][perm], slot_p, layer_salt(1))
    assert torch.equal(moved, out[:n][perm])
    # ...and differs between layers
    other = lora_dropout_ref(ones, n, keys, token_slot, slot_p, layer_salt(2))
    assert not torch.equal(other[:n] == 0, out[:n] == 0)


def test_a_column_shard_draws_its_columns_of_the_full_mask():
    """A tensor-parallel rank holding columns [lo, hi) of the input (`col_offset` = lo) gets exactly
    those columns of the full input's mask, in the kernel and in the reference."""
    from loquetier.kernels.lora_dropout_triton import lora_dropout
    x, n, keys, token_slot, slot_p = _case(DEVICE)
    full = lora_dropout_ref(x, n, keys, token_slot, slot_p, layer_salt(3))
    lo, hi = 600, 1100
    shard = x[:, lo:hi].contiguous()
    for out in (lora_dropout(shard, n, keys, token_slot, slot_p, layer_salt(3), lo),
                lora_dropout_ref(shard, n, keys, token_slot, slot_p, layer_salt(3), lo)):
        assert torch.equal(out == 0, full[:, lo:hi] == 0)
        torch.testing.assert_close(out, full[:, lo:hi], rtol=1e-6, atol=0)
    assert not torch.equal(lora_dropout_ref(shard, n, keys, token_slot, slot_p, layer_salt(3)) == 0,
                           full[:, lo:hi] == 0)
