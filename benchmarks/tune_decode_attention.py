"""Sweep the paged decode attention kernel's settings (tile, warps, stages, context splits) on the
Llama-3-8B attention shape (32 query / 8 kv heads, head_dim 128, bf16, block size 16) and report
the KV read bandwidth of each against the device copy ceiling measured in the same process.

    python benchmarks/tune_decode_attention.py --batches 1,64,128 --context 512

Each configuration is checked against the first (the current default) before it is timed.
Random data (never zeros), block tables shuffled so pages are scattered as in a busy cache.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).parent))
from common import device_ceilings  # noqa: E402

from loquetier.kernels import attention_triton as at  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 64, 128])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--block-size", type=int, default=16)
    args = ap.parse_args()
    dev = torch.device("cuda")
    bw = device_ceilings("cuda")["bandwidth_GBps"]
    H, KVH, D, bs = 32, 8, 128, args.block_size
    rows = []
    for batch in args.batches:
        blocks_per_seq = -(-args.context // bs)
        num_blocks = batch * blocks_per_seq + 1
        g = torch.Generator(device=dev).manual_seed(batch)
        k_cache = torch.randn(num_blocks, bs, KVH, D, device=dev, dtype=torch.bfloat16, generator=g)
        v_cache = torch.randn(num_blocks, bs, KVH, D, device=dev, dtype=torch.bfloat16, generator=g)
        tables = torch.randperm(num_blocks - 1, device=dev, generator=g)[:batch * blocks_per_seq]
        tables = tables.view(batch, blocks_per_seq).to(torch.int32)
        lens = torch.full((batch,), args.context, dtype=torch.int32, device=dev)
        q = torch.randn(batch, H, D, device=dev, dtype=torch.bfloat16, generator=g)
        kv_bytes = batch * args.context * KVH * D * 2 * 2
        default_splits = at.default_num_splits(batch, KVH, dev)
        ref = at.paged_decode_attention(q, k_cache, v_cache, tables, lens, D ** -0.5).float()
        configs = [(at.BLOCK_N if default_splits == 1 else at.BLOCK_N_SPLIT, at.NUM_WARPS, at.NUM_STAGES,
                    default_splits)]
        splits_options = (4, 8, 16) if batch * KVH < 132 else (1, 2, 4)
        configs += [c for c in itertools.product((32, 64, 128), (4, 8), (2, 3, 4), splits_options)
                    if c != configs[0]]
        # the default is timed again last: the first configuration timed can run slower (clocks still
        # rising after an idle GPU), which would misstate the default against the others
        configs.append(configs[0])
        for i, (block_n, warps, stages, splits) in enumerate(configs):
            if block_n * splits > 4 * args.context:
                continue
            fn = lambda: at.paged_decode_attention(q, k_cache, v_cache, tables, lens, D ** -0.5, splits,  # noqa: E731
                                                   block_n=block_n, num_warps=warps, num_stages=stages)
            try:
                out = fn().float()
            except Exception as e:  # e.g. out of shared memory for this tile
                print(f"batch {batch} {block_n}/{warps}/{stages}/{splits}: {type(e).__name__}", flush=True)
                continue
            err = ((out - ref).norm() / ref.norm()).item()
            if not err < 2e-2:
                print(f"batch {batch} {block_n}/{warps}/{stages}/{splits}: wrong (rel err {err:.2e})", flush=True)
                continue
            us = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
            rows.append({"batch": batch, "block_n": block_n, "warps": warps, "stages": stages, "splits": splits,
                         "us": us, "GBps": kv_bytes / us / 1e3, "of_copy": kv_bytes / us / 1e3 / bw,
                         "default": "default" if i == 0 else "default, timed last" if i == len(configs) - 1 else ""})
    print(f"copy ceiling {bw:.0f} GB/s; per batch: the default (timed first and last), then the 6 fastest")
    print("batch | block_n | warps | stages | splits | us | GB/s | of copy")
    for batch in args.batches:
        mine = [r for r in rows if r["batch"] == batch]
        fastest = sorted((r for r in mine if r["default"] != "default, timed last"), key=lambda r: r["us"])
        for r in [r for r in mine if r["default"]] + fastest[:6]:
            tag = f" ({r['default']})" if r["default"] else ""
            print(f"{r['batch']} | {r['block_n']} | {r['warps']} | {r['stages']} | {r['splits']} | {r['us']:.1f} | "
                  f"{r['GBps']:.0f} | {r['of_copy']:.0%}{tag}")


if __name__ == "__main__":
    main()
