"""GPU micro-benchmark of the SMLM kernels (shrink + expand) against torch baselines.

Cases: decode batches (every token its own segment) with 1 and 4 adapters, and prefill 4x512,
for one fused q/k/v LoRA layer (d=4096, R=16, S=3, outputs 4096+1024+1024 by default).
Methods:
    triton          shrink + expand_ as the engine calls them (path picked from max_seg_len)
    triton_segment  the tiled segment path forced (decode only: shows what the gather path buys)
    triton_runs     decode tokens ordered by adapter, one segment per run of equal adapter (what
                    an engine gets by sorting its decode batch by adapter: tiles share weights)
    torch_loop      one x@A^T / addmm per segment and slice (what a naive multi-LoRA layer does)
    torch_grouped   tokens gathered per adapter, then the loop above (one group per adapter)
    torch_bmm       per-token gathered weights, two bmm (punica-style without a kernel)
With --attention it also times paged decode attention (Llama-3-8B heads) against SDPA on a
contiguous cache of the same length.

Usage: python benchmarks/bench_kernels.py [results.json] [--dtype bf16] [--rank 16] ...
Prints tables of median microseconds, eager (triton.testing.do_bench: includes Python and launch
overhead, which dominates small decode cases) and replayed from a CUDA graph
(do_bench_cudagraph: GPU time, what a graph-captured decode step pays), and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default="bench_kernels.json", help="where to write the JSON results")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--slices", default="4096,1024,1024", help="output widths of the fused slices")
    p.add_argument("--decode-batches", default="1,8,32,64,128")
    p.add_argument("--adapters", default="1,4")
    p.add_argument("--prefill", default="4x512", help="SEQSxLEN for the prefill case")
    p.add_argument("--num-slots", type=int, default=8, help="slots allocated in the weight buffers")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    p.add_argument("--skip-slow", action="store_true", help="skip torch_loop for decode batches > 32")
    p.add_argument("--attention", action="store_true", help="also time paged decode attention")
    return p.parse_args(argv)


def make_case(num_tokens_per_seg, slots, args, dtype, device):
    widths = [int(w) for w in args.slices.split(",")]
    offsets = [0]
    for w in widths:
        offsets.append(offsets[-1] + w)
    num_slices, rank, d_in = len(widths), args.rank, args.hidden
    lengths = num_tokens_per_seg
    n = sum(lengths)
    seg_cu_host = [0]
    for length in lengths:
        seg_cu_host.append(seg_cu_host[-1] + length)
    token_slot_host = [s for s, length in zip(slots, lengths) for _ in range(length)]
    gen = torch.Generator(device="cpu").manual_seed(0)
    case = dict(
        x=torch.randn(n, d_in, generator=gen).to(device, dtype),
        y=torch.randn(n, offsets[-1], generator=gen).to(device, dtype),
        a=(torch.randn(args.num_slots, num_slices * rank, d_in, generator=gen) / d_in**0.5).to(device, dtype),
        b=(torch.randn(args.num_slots, offsets[-1], rank, generator=gen) / rank**0.5).to(device, dtype),
        scaling=torch.full((args.num_slots, num_slices), 2.0, device=device),
        offsets=tuple(offsets),
        seg_cu=torch.tensor(seg_cu_host, dtype=torch.int32, device=device),
        seg_slot=torch.tensor(slots, dtype=torch.int32, device=device),
        token_slot=torch.tensor(token_slot_host, dtype=torch.int32, device=device),
        max_seg_len=max(lengths),
        seg_cu_host=seg_cu_host,
        slots_host=list(slots),
        token_slot_host=token_slot_host,
        rank=rank,
    )
    # per-adapter token groups, built once (an engine would build them with the batch)
    groups = {}
    for t, s in enumerate(token_slot_host):
        if s >= 0:
            groups.setdefault(s, []).append(t)
    case["groups"] = [(s, torch.tensor(idx, device=device)) for s, idx in groups.items()]
    return case


def run_triton(c, max_seg_len=None):
    from loquetier.kernels.smlm_triton import expand_, shrink

    m = c["max_seg_len"] if max_seg_len is None else max_seg_len
    v = shrink(c["x"], c["a"], c["seg_cu"], c["seg_slot"], c["token_slot"], m)
    expand_(c["y"], v, c["b"], c["scaling"], c["offsets"], c["seg_cu"], c["seg_slot"], c["token_slot"], m)


def _lora_rows(y_rows, x_rows, c, slot):
    """Returns the LoRA delta for rows that all use ``slot``."""
    a, b, offsets, rank = c["a"][slot], c["b"][slot], c["offsets"], c["rank"]
    v = x_rows @ a.t()  # [n, S*R]
    for s in range(len(offsets) - 1):
        lo, hi = offsets[s], offsets[s + 1]
        y_rows[:, lo:hi].addmm_(v[:, s * rank:(s + 1) * rank], b[lo:hi].t(), alpha=2.0)


def run_torch_loop(c):
    for g, slot in enumerate(c["slots_host"]):
        lo, hi = c["seg_cu_host"][g], c["seg_cu_host"][g + 1]
        if slot >= 0 and hi > lo:
            _lora_rows(c["y"][lo:hi], c["x"][lo:hi], c, slot)


def run_torch_grouped(c):
    for slot, idx in c["groups"]:
        rows = torch.zeros(idx.numel(), c["y"].shape[1], device=c["y"].device, dtype=c["y"].dtype)
        _lora_rows(rows, c["x"][idx], c, slot)
        c["y"].index_add_(0, idx, rows)


def run_torch_bmm(c):
    slot = c["token_slot"].long()
    has = (slot >= 0).to(c["x"].dtype)[:, None]
    idx = slot.clamp(min=0)
    v = torch.bmm(c["a"][idx], c["x"][:, :, None])[:, :, 0] * has  # [N, S*R]
    offsets, rank = c["offsets"], c["rank"]
    for s in range(len(offsets) - 1):
        lo, hi = offsets[s], offsets[s + 1]
        d = torch.bmm(c["b"][idx, lo:hi], v[:, s * rank:(s + 1) * rank, None])[:, :, 0]
        c["y"][:, lo:hi].add_(d, alpha=2.0)


def bench(fn, args):
    """(eager, graph) median microseconds: eager includes Python/launch overhead, graph is GPU time."""
    import triton.testing

    fn()  # compile / warm caches
    torch.cuda.synchronize()
    eager = triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median") * 1e3
    try:
        graph = triton.testing.do_bench_cudagraph(fn, rep=args.rep, return_mode="median") * 1e3
    except Exception as e:  # a baseline that cannot be captured still gets its eager time
        print(f"  (graph capture failed: {type(e).__name__}: {e})", file=sys.stderr)
        graph = float("nan")
    return eager, graph


def smlm_rows(args, dtype, device):
    rows = []
    cases = []
    for num_adapters in [int(a) for a in args.adapters.split(",")]:
        for batch in [int(b) for b in args.decode_batches.split(",")]:
            cases.append((f"decode b={batch} a={num_adapters}", [1] * batch, [i % num_adapters for i in range(batch)],
                          True))
    seqs, length = (int(v) for v in args.prefill.split("x"))
    for num_adapters in [int(a) for a in args.adapters.split(",")]:
        cases.append((f"prefill {seqs}x{length} a={num_adapters}", [length] * seqs,
                      [i % num_adapters for i in range(seqs)], False))
    for name, lengths, slots, is_decode in cases:
        c = make_case(lengths, slots, args, dtype, device)
        methods = {"triton": lambda: run_triton(c)}
        if is_decode:
            methods["triton_segment"] = lambda: run_triton(c, max_seg_len=2)
            run_slots = sorted(set(slots))
            runs = make_case([slots.count(s) for s in run_slots], run_slots, args, dtype, device)
            methods["triton_runs"] = lambda: run_triton(runs, max_seg_len=max(2, runs["max_seg_len"]))
        if not (args.skip_slow and is_decode and len(lengths) > 32):
            methods["torch_loop"] = lambda: run_torch_loop(c)
        methods["torch_grouped"] = lambda: run_torch_grouped(c)
        methods["torch_bmm"] = lambda: run_torch_bmm(c)
        for method, fn in methods.items():
            try:
                eager, graph = bench(fn, args)
            except torch.OutOfMemoryError:
                eager = graph = float("nan")
                torch.cuda.empty_cache()
            rows.append(dict(case=name, tokens=sum(lengths), segments=len(lengths), method=method,
                             median_us=eager, graph_us=graph))
            print(f"{name:<26} {method:<15} eager {eager:10.1f} us   graph {graph:10.1f} us", flush=True)
        del c
        torch.cuda.empty_cache()
    return rows


def attention_rows(args, dtype, device):
    import torch.nn.functional as F

    from loquetier.kernels.attention_triton import paged_decode_attention

    rows = []
    heads, kv_heads, head_dim, block_size = 32, 8, 128, 16
    for batch, ctx in [(1, 1024), (1, 8192), (8, 2048), (32, 1024), (64, 2048), (128, 1024)]:
        pages = ctx // block_size
        k_cache = torch.randn(batch * pages, block_size, kv_heads, head_dim, device=device, dtype=dtype)
        v_cache = torch.randn_like(k_cache)
        block_tables = torch.randperm(batch * pages, device=device, dtype=torch.int32).view(batch, pages)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
        q = torch.randn(batch, heads, head_dim, device=device, dtype=dtype)
        kd = torch.randn(batch, kv_heads, ctx, head_dim, device=device, dtype=dtype)
        vd = torch.randn_like(kd)
        methods = {
            "triton_paged": lambda: paged_decode_attention(q, k_cache, v_cache, block_tables, lens, head_dim**-0.5),
            "triton_paged_nosplit": lambda: paged_decode_attention(q, k_cache, v_cache, block_tables, lens,
                                                                   head_dim**-0.5, num_splits=1),
            "sdpa_contiguous": lambda: F.scaled_dot_product_attention(q[:, :, None], kd, vd, enable_gqa=True),
        }
        name = f"attn b={batch} ctx={ctx}"
        for method, fn in methods.items():
            eager, graph = bench(fn, args)
            rows.append(dict(case=name, tokens=batch, segments=batch, method=method, median_us=eager, graph_us=graph))
            print(f"{name:<26} {method:<22} eager {eager:10.1f} us   graph {graph:10.1f} us", flush=True)
        del k_cache, v_cache, kd, vd
        torch.cuda.empty_cache()
    return rows


def print_table(rows, key, title):
    cases = list(dict.fromkeys(r["case"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["case"], r["method"]): r[key] for r in rows}
    width = max(12, *(len(m) + 2 for m in methods))
    print("\n" + f"{title:<26}" + "".join(f"{m:>{width}}" for m in methods))
    for case in cases:
        cells = [by.get((case, m)) for m in methods]
        print(f"{case:<26}" + "".join(f"{'-':>{width}}" if v is None else f"{v:>{width}.1f}" for v in cells))


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU", file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    device = torch.device("cuda")
    rows = smlm_rows(args, dtype, device)
    if args.attention:
        rows += attention_rows(args, dtype, device)
    smlm = [r for r in rows if not r["case"].startswith("attn")]
    attn = [r for r in rows if r["case"].startswith("attn")]
    for part in [smlm, attn]:
        if part:
            print_table(part, "graph_us", "CUDA graph, median us")
            print_table(part, "median_us", "eager, median us")
    import triton

    meta = dict(
        gpu=torch.cuda.get_device_name(device), torch=torch.__version__, triton=triton.__version__,
        python=platform.python_version(), dtype=args.dtype, hidden=args.hidden, rank=args.rank,
        slices=args.slices, num_slots=args.num_slots,
    )
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
