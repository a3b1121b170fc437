"""Does PyTorch's SDPA pay a per-shape cost on its first call? (The first e2e run spent ~10 s in
per-prompt SDPA calls that later runs do not pay.) Times the first and second call of causal GQA
attention on prompt-shaped inputs [1, 32, n, 128] bf16 (k/v expanded from 8 heads, as the per-prompt
path does), for new lengths n, with the default backends and with cuDNN attention excluded.

    python benchmarks/probe_sdpa_first_call.py
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def call(n: int, g: torch.Generator) -> float:
    q = torch.randn(n, 32, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(n, 8, 128, device="cuda", dtype=torch.bfloat16, generator=g).repeat_interleave(4, dim=1)
    v = torch.randn(n, 8, 128, device="cuda", dtype=torch.bfloat16, generator=g).repeat_interleave(4, dim=1)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                   is_causal=True, scale=128 ** -0.5)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def main():
    g = torch.Generator(device="cuda").manual_seed(0)
    print("cudnn_sdp_enabled", torch.backends.cuda.cudnn_sdp_enabled(), "flash", torch.backends.cuda.flash_sdp_enabled())
    call(77, g)   # CUDA context, handles
    for label, lengths, backends in (
            ("default backends", range(100, 140), None),
            ("no cuDNN", range(200, 240), [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]),
            ("cuDNN only", range(300, 340), [SDPBackend.CUDNN_ATTENTION])):
        first, second = [], []
        for n in lengths:
            try:
                if backends is None:
                    first.append(call(n, g))
                    second.append(call(n, g))
                else:
                    with sdpa_kernel(backends):
                        first.append(call(n, g))
                        second.append(call(n, g))
            except RuntimeError as e:
                print(label, "failed:", str(e)[:120])
                break
        if first:
            print(f"{label}: first call median {statistics.median(first):.2f} ms (max {max(first):.1f}), "
                  f"second call median {statistics.median(second):.3f} ms, over {len(first)} new lengths")


if __name__ == "__main__":
    main()
