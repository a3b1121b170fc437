"""What folding every slot's LoRA shrink into a base GEMM costs the GEMM itself (Llama-3-8B
shapes, bf16): the base projection's GEMM against the same GEMM with the slots' A rows appended
(as `LoraLinear.weight_aug` holds them), and against other ways to get the same outputs: the folded
rows in a buffer of exactly their size (as the engine allocates it), padded to a whole 256-row
tile, the weight stored transposed (a different cuBLAS kernel), and the base GEMM followed by a
separate shrink GEMM. CUDA-graph replays, median; each variant's
outputs are checked against the plain computation first.

    python benchmarks/bench_folded_gemm.py --batches 1,64,128,256
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import graph_replay_us, table, write_json  # noqa: E402

# projection -> (d_in, d_out, LoRA slices); the slots add slots * slices * rank rows (4 * 16: 64 a slice)
PROJECTIONS = {"qkv": (4096, 6144, 3), "o": (4096, 4096, 1), "gate_up": (4096, 28672, 2), "down": (14336, 4096, 1)}


def gpu_us(fn) -> float:
    return graph_replay_us(fn, rep_ms=60)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 64, 128, 256])
    ap.add_argument("--projections", default=",".join(PROJECTIONS))
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--scale", type=int, default=1, help="divide every width by this (CPU smoke test)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for name in args.projections.split(","):
        d_in, d_out, slices = PROJECTIONS[name]
        d_in, d_out = d_in // args.scale, d_out // args.scale
        extra = args.slots * slices * args.rank
        padded = -(-(d_out + extra) // 256) * 256
        w_aug = torch.randn(padded, d_in, device=dev, dtype=dtype, generator=g) / d_in ** 0.5
        w, w_fold = w_aug[:d_out], w_aug[:d_out + extra]     # views of one buffer, as weight_aug
        a = w_aug[d_out:d_out + extra]
        w_fold_t = w_fold.t().contiguous()                    # [d_in, d_out + extra]
        a_copy = a.contiguous()
        w_exact = w_fold.clone()   # a buffer of exactly the folded rows, as `weight_aug` is allocated
        for batch in args.batches:
            x = torch.randn(batch, d_in, device=dev, dtype=dtype, generator=g)
            linear = torch.nn.functional.linear
            variants = {   # label -> (the GEMM(s), weight rows the main GEMM reads)
                "base GEMM alone": (lambda: linear(x, w), d_out),
                "folded: A rows appended": (lambda: linear(x, w_fold), d_out + extra),
                "folded, its own buffer of exactly those rows": (lambda: linear(x, w_exact), d_out + extra),
                "folded, padded to a 256-row tile": (lambda: linear(x, w_aug), padded),
                "folded, weight stored transposed": (lambda: x @ w_fold_t, d_out + extra),
                "base GEMM, then the shrink GEMM": (lambda: (linear(x, w), linear(x, a_copy)), d_out),
            }
            ref = linear(x.float(), w_fold.float())
            for label, (fn, weight_rows) in variants.items():
                out = fn()
                got = torch.cat(out, dim=1) if isinstance(out, tuple) else out
                got = got[:, :ref.shape[1]] if got.shape[1] >= ref.shape[1] else got
                if got.shape[1] == ref.shape[1]:
                    err = ((got.float() - ref).norm() / ref.norm()).item()
                else:   # the base GEMM alone: its columns only
                    err = ((got.float() - ref[:, :d_out]).norm() / ref[:, :d_out].norm()).item()
                assert err < 2e-2, (name, label, err)
                row = {"projection": name, "batch": batch, "variant": label, "us": gpu_us(fn), "rel_err": err,
                       "rows": weight_rows}
                rows.append(row)
                print(row, flush=True)
    print(table(rows, ["projection", "batch", "variant", "rows", "us"]))
    write_json(args.out, {"slots": args.slots, "rank": args.rank, "rows": rows})


if __name__ == "__main__":
    main()
