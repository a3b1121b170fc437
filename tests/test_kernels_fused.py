"""Fused RMSNorm and SiLU-and-mul Triton kernels (forward and backward) against the PyTorch references.

On a machine without a GPU the kernels run under the Triton interpreter (set below, before
triton is imported); with a GPU they run compiled, and the bf16 tests at realistic sizes run too.
"""

import pytest
import torch

pytest.importorskip("triton")

# conftest.py sets TRITON_INTERPRET=1 on a machine without CUDA before this module imports triton
from helpers import DEVICE, needs_gpu  # noqa: E402
from loquetier.kernels import fused, fused_triton  # noqa: E402


EPS = 1e-5


def _grads(fn, inputs, dy):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    return out, torch.autograd.grad(out, inputs, dy)


def _mismatch(out, ref):
    """Fraction of elements not bit-equal to the same-dtype reference. Rounding where it rounds
    leaves only last-bit flips from a different reduction order; rounding once instead flips ~25%."""
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
    return (out != ref).float().mean().item()


def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# --------------------------------------------------------------------------- RMSNorm


def _strided_heads(n, heads, dim):
    """[n, heads, dim] slice of a wider fused buffer, as Qwen3's q norm sees it."""
    buf = torch.randn(n, heads * dim + 3 * dim, device=DEVICE)
    return buf[:, dim:dim + heads * dim].reshape(n, heads, dim)


NORM_SHAPES = {
    "rows_odd_width_48": lambda: torch.randn(7, 48, device=DEVICE),
    "width_100": lambda: torch.randn(3, 100, device=DEVICE),
    "one_row": lambda: torch.randn(1, 64, device=DEVICE),
    "leading_dims_3d": lambda: torch.randn(5, 3, 40, device=DEVICE),
    "strided_heads": lambda: _strided_heads(4, 3, 32),
    "transposed_heads": lambda: torch.randn(3, 5, 40, device=DEVICE).transpose(0, 1),  # head stride != D
}


@pytest.mark.parametrize("name", list(NORM_SHAPES))
def test_rms_norm_forward_backward_match_reference(name, poisoned_empty):
    torch.manual_seed(0)
    x = NORM_SHAPES[name]() * 3 + 0.5
    weight = torch.randn(x.shape[-1], device=DEVICE)
    dy = torch.randn_like(x)  # strided like x where x is dense

    out, (dx,) = _grads(lambda x: fused.rms_norm(x, weight, EPS, backend="triton"), [x], dy)
    ref, (dx_ref,) = _grads(lambda x: fused.rms_norm_ref(x, weight, EPS), [x], dy)
    assert out.shape == ref.shape and dx.shape == x.shape
    assert not out.isnan().any() and not dx.isnan().any()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["rows_odd_width_48", "strided_heads", "transposed_heads"])
def test_rms_norm_weight_grad_when_asked(name, poisoned_empty):
    torch.manual_seed(1)
    x = NORM_SHAPES[name]()
    weight = torch.randn(x.shape[-1], device=DEVICE)
    dy = torch.randn_like(x)  # strided like x where x is dense

    _, (dx, dw) = _grads(lambda x, w: fused.rms_norm(x, w, EPS, backend="triton"), [x, weight], dy)
    _, (dx_ref, dw_ref) = _grads(lambda x, w: fused.rms_norm_ref(x, w, EPS), [x, weight], dy)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-5, atol=1e-5)

    # weight only (x frozen): no dx is returned, dweight is still right
    w = weight.clone().requires_grad_()
    (dw_only,) = torch.autograd.grad(fused.rms_norm(x, w, EPS, backend="triton"), [w], dy)
    torch.testing.assert_close(dw_only, dw_ref, rtol=1e-5, atol=1e-5)


def test_rms_norm_rounds_like_reference_in_half():
    # fp16, not bf16: the interpreter casts to bf16 by truncation where the GPU rounds to nearest
    torch.manual_seed(2)
    x = torch.randn(64, 72, device=DEVICE).half()
    weight = (torch.rand(72, device=DEVICE) + 0.5).half()
    out = fused.rms_norm(x, weight, EPS, backend="triton")
    assert out.dtype == torch.float16
    assert _mismatch(out, fused.rms_norm_ref(x, weight, EPS)) < 0.01
    # mixed dtypes promote like the reference: fp32 weight on fp16 x gives fp32
    mixed = fused.rms_norm(x, weight.float(), EPS, backend="triton")
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, fused.rms_norm_ref(x, weight.float(), EPS), rtol=1e-5, atol=1e-5)


def test_rms_norm_without_grad_records_no_graph():
    x = torch.randn(4, 48, device=DEVICE, requires_grad=True)
    weight = torch.randn(48, device=DEVICE)
    with torch.no_grad():
        out = fused.rms_norm(x, weight, EPS, backend="triton")
    assert out.grad_fn is None and not out.requires_grad
    torch.testing.assert_close(out, fused.rms_norm_ref(x.detach(), weight, EPS), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- SiLU-and-mul

SILU_SHAPES = {"rows_7_inter_40": (7, 40), "one_row": (1, 24), "inter_over_block": (2, fused_triton.SILU_BLOCK + 9),
               "leading_dims_3d": (2, 3, 20)}


@pytest.mark.parametrize("name", list(SILU_SHAPES))
def test_silu_and_mul_forward_backward_match_reference(name, poisoned_empty):
    torch.manual_seed(3)
    *lead, inter = SILU_SHAPES[name]
    gate_up = torch.randn(*lead, 2 * inter, device=DEVICE) * 4
    dy = torch.randn(*lead, inter, device=DEVICE)

    out, (dx,) = _grads(lambda t: fused.silu_and_mul(t, backend="triton"), [gate_up], dy)
    ref, (dx_ref,) = _grads(fused.silu_and_mul_ref, [gate_up], dy)
    assert out.shape == ref.shape and dx.shape == gate_up.shape
    assert not out.isnan().any() and not dx.isnan().any()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)


def test_silu_and_mul_reads_strided_rows_and_rounds_like_reference_in_half():
    torch.manual_seed(4)
    gate_up = (torch.randn(64, 2 * 36 + 8, device=DEVICE) * 3).half()[:, 8:]  # row stride != 2 * inter
    out = fused.silu_and_mul(gate_up, backend="triton")
    assert out.dtype == torch.float16
    assert _mismatch(out, fused.silu_and_mul_ref(gate_up)) < 0.01


def test_auto_backend_keeps_reference_on_cpu(monkeypatch):
    def fail(*args):
        raise AssertionError("Triton kernel called for a CPU tensor")

    monkeypatch.setattr(fused_triton, "rms_norm", fail)
    monkeypatch.setattr(fused_triton, "silu_and_mul", fail)
    x = torch.randn(3, 16)
    weight = torch.randn(16)
    assert torch.equal(fused.rms_norm(x, weight, EPS), fused.rms_norm_ref(x, weight, EPS))
    assert torch.equal(fused.silu_and_mul(x), fused.silu_and_mul_ref(x))


# --------------------------------------------------------------------------- GPU, bf16, realistic sizes


@needs_gpu
@pytest.mark.parametrize("shape", [(2048, 4096), (2048, 5120), (2048, 32, 128)])
def test_rms_norm_bf16_realistic(shape):
    torch.manual_seed(5)
    x = torch.randn(shape, device=DEVICE).bfloat16()
    weight = (torch.rand(shape[-1], device=DEVICE) + 0.5).bfloat16()
    dy = torch.randn(shape, device=DEVICE).bfloat16()

    out, (dx, dw) = _grads(lambda x, w: fused.rms_norm(x, w, EPS), [x, weight], dy)
    ref, (dx_ref, dw_ref) = _grads(lambda x, w: fused.rms_norm_ref(x, w, EPS),
                                   [x.float(), weight.float()], dy.float())
    assert out.dtype == dx.dtype == dw.dtype == torch.bfloat16
    assert _rel_err(out, ref) <= 1e-2
    assert _rel_err(dx, dx_ref) <= 1e-2
    assert _rel_err(dw, dw_ref) <= 1e-2
    assert _mismatch(out, fused.rms_norm_ref(x, weight, EPS)) < 0.01


@needs_gpu
def test_silu_and_mul_bf16_realistic():
    torch.manual_seed(6)
    inter = 14336
    gate_up = (torch.randn(2048, 2 * inter, device=DEVICE) * 2).bfloat16()
    dy = torch.randn(2048, inter, device=DEVICE).bfloat16()

    out, (dx,) = _grads(fused.silu_and_mul, [gate_up], dy)
    ref, (dx_ref,) = _grads(fused.silu_and_mul_ref, [gate_up.float()], dy.float())
    assert out.dtype == dx.dtype == torch.bfloat16
    assert _rel_err(out, ref) <= 1e-2
    assert _rel_err(dx, dx_ref) <= 1e-2
    assert _mismatch(out, fused.silu_and_mul_ref(gate_up)) < 0.01
