"""Packed (varlen) flash attention for training segments against one SDPA call per segment."""

import pytest
import torch

from loquetier.kernels import attention as attn_ops

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="packed flash attention is CUDA-only")


@needs_gpu
@pytest.mark.parametrize("heads,kv_heads", [(32, 8), (8, 8)])
def test_packed_flash_matches_per_segment_sdpa_with_grads(heads, kv_heads):
    torch.manual_seed(0)
    lens = [512, 37, 300, 1, 129]
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    d, scale = 128, 128 ** -0.5
    qkv = torch.randn(cu[-1], (heads + 2 * kv_heads) * d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn(cu[-1], heads, d, device="cuda", dtype=torch.bfloat16)

    def run(packed: bool):
        q, k, v = qkv.split((heads * d, kv_heads * d, kv_heads * d), -1)
        q, k, v = q.reshape(-1, heads, d), k.reshape(-1, kv_heads, d), v.reshape(-1, kv_heads, d)
        cu_t = torch.tensor(cu, device="cuda", dtype=torch.int32) if packed else None
        out = attn_ops.varlen_causal_attention(q, k, v, cu, scale, None, cu_t, max(lens))
        (grad,) = torch.autograd.grad(out, qkv, dout)
        return out.float(), grad.float()

    assert attn_ops._packed_flash() is not None, "this PyTorch has no torch.nn.attention.varlen"
    out_p, grad_p = run(True)
    assert not attn_ops._packed_flash_failed
    out_s, grad_s = run(False)
    assert ((out_p - out_s).norm() / out_s.norm()).item() < 1e-2
    assert ((grad_p - grad_s).norm() / grad_s.norm()).item() < 1e-2
