"""Many adapters at once, swapping, and loading: what multi-LoRA serving costs beyond one adapter.

Sections (Llama-3-8B shape, random bf16 weights; adapters on all seven projections):
- `many`: a batch-64 decode step with 16 or 64 distinct adapters in the batch (ranks cycling
  through 8, 16, 32, 64; every adapter in a device slot), against the base-only step of the same
  engine; base and adapter windows alternate over `--rounds`, medians reported.
- `swap`: adapters registered beyond the device slots live in the CPU cache; the time to bring one
  into a slot (CPU -> GPU copy of its A/B into every layer's slot table), median of `--swaps`.
- `load`: `load_adapter` of a rank-16 adapter saved to disk in PEFT format (safetensors), then the
  time to its first token for a 16-token prompt.
Prints a table last, writes JSON. CPU smoke test: `--model random:tiny --device cpu --quick`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import random_adapter, start_decoding, steady_step_seconds, sync, table, write_json  # noqa: E402

from loquetier import LLM, SamplingParams  # noqa: E402
from loquetier.lora.adapter import save_peft_adapter  # noqa: E402

RANKS = (8, 16, 32, 64)


def make_llm(args, max_loras: int, max_rank: int) -> LLM:
    return LLM(args.model, dtype="bfloat16" if args.device == "cuda" else "float32", device=args.device,
               max_loras=max_loras, max_lora_rank=max_rank, max_cpu_loras=128, max_model_len=2048,
               kv_cache_memory=int(args.kv_gib * 2**30), max_num_batched_tokens=8192)


def top_kernels(eng, steps: int, limit: int) -> list[dict]:
    """GPU time by kernel over `steps` engine steps (torch.profiler): name, calls a step, us a step."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            eng.step()
        torch.cuda.synchronize()
    rows = [{"kernel": e.key[:90], "calls_per_step": e.count / steps,
             "us_per_step": e.self_device_time_total / steps} for e in prof.key_averages()]
    rows = sorted((r for r in rows if r["us_per_step"] > 0), key=lambda r: -r["us_per_step"])
    return rows[:limit] + [{"kernel": "(all kernels)", "calls_per_step": sum(r["calls_per_step"] for r in rows),
                            "us_per_step": sum(r["us_per_step"] for r in rows)}]


def decode_step(eng, adapters: list, context: int, steps: int, device, profile_rows: list | None = None,
                profile_limit: int = 0) -> float:
    """Steady decode step time of a batch with these adapters; with `profile_limit`, the top kernels of
    a few more steps go to `profile_rows`."""
    rng = np.random.default_rng(0)
    for ad in adapters:
        eng.add_request(rng.integers(10, min(1000, eng.args.vocab_size), context).tolist(),
                        SamplingParams(max_tokens=steps + 24, temperature=0, ignore_eos=True), ad)
    start_decoding(eng)
    graphs = eng.runner.graphs
    replays = 0
    if graphs is not None:   # count replays: a step that misses the graphs runs eagerly, far slower
        real_run = graphs.run

        def counted_run(*a, **k):
            nonlocal replays
            replays += 1
            return real_run(*a, **k)
        graphs.run = counted_run
    try:
        dt = steady_step_seconds(eng, steps, device)
    finally:
        if graphs is not None:
            graphs.run = real_run
    if graphs is not None and replays < steps:
        print(f"warning: {steps - replays} of {steps} steps ran without a CUDA graph", flush=True)
    if profile_limit and device == "cuda":
        profile_rows.extend(top_kernels(eng, 5, profile_limit))
    for rid in list(eng.requests):
        eng.abort(rid)
    while eng.has_unfinished():
        eng.step()
    return dt


def bench_many(args, rows):
    for n in args.many:
        llm = make_llm(args, max_loras=n, max_rank=max(RANKS))
        eng = llm.engine
        names = []
        for i in range(n):
            eng.add_adapter(f"m{i}", random_adapter(eng, seed=200 + i, r=RANKS[i % len(RANKS)]))
            names.append(f"m{i}")
        kernels_base, kernels_lora = [], []
        mix = [names[i % n] for i in range(args.batch)]
        # base and adapter windows alternate over the rounds (the order reversed every other round), as
        # the same graph can replay a few % faster or slower from one window of steps to the next
        windows = {"base": [], "lora": []}
        for r in range(args.rounds):
            for kind in (("base", "lora") if r % 2 == 0 else ("lora", "base")):
                profile = args.profile_kernels if r == 0 else 0
                windows[kind].append(decode_step(eng, [None] * args.batch if kind == "base" else mix, args.context,
                                                 args.steps, args.device,
                                                 kernels_base if kind == "base" else kernels_lora, profile))
        base, lora = statistics.median(windows["base"]), statistics.median(windows["lora"])
        for label, ks in (("base", kernels_base), (f"{n} adapters", kernels_lora)):
            if ks:
                print(f"--- top kernels a step, batch {args.batch}, {label}")
                print(table(ks, ["kernel", "calls_per_step", "us_per_step"]), flush=True)
        # A/B in the same process: every slot's rank set to the table's, so the SMLM kernels read the
        # zero padding too, as they did before they took slot ranks (outputs unchanged: padding is zero)
        layers = [vl for per_layer in eng.model.virtual_layers() for vl in per_layer.values()]
        kept = [vl.slot_rank.clone() for vl in layers]
        for vl in layers:
            vl.slot_rank.fill_(max(RANKS))
        padded = decode_step(eng, mix, args.context, args.steps, args.device)
        for vl, r in zip(layers, kept):
            vl.slot_rank.copy_(r)
        row = {"section": "many", "adapters": n, "batch": args.batch, "base_ms": base * 1e3, "lora_ms": lora * 1e3,
               "ratio": lora / base, "padded_reads_ms": padded * 1e3, "padded_ratio": padded / base,
               "base_windows_ms": [w * 1e3 for w in windows["base"]], "lora_windows_ms": [w * 1e3 for w in windows["lora"]],
               "kernels_base": kernels_base, "kernels_lora": kernels_lora}
        rows.append(row)
        print(row, flush=True)
        del llm, eng


def bench_swap_and_load(args, rows):
    llm = make_llm(args, max_loras=4, max_rank=16)
    eng = llm.engine
    for i in range(4 + args.swaps):
        eng.add_adapter(f"s{i}", random_adapter(eng, seed=300 + i))
    if "swap" in args.sections:
        times = []
        for i in range(args.swaps):   # each one is in the CPU cache; the slot's last owner goes back there
            sync(args.device)
            t0 = time.perf_counter()
            eng.adapters.activate({f"s{4 + i}"})
            sync(args.device)
            times.append(time.perf_counter() - t0)
        row = {"section": "swap", "adapters": args.swaps, "swap_ms": statistics.median(times) * 1e3}
        rows.append(row)
        print(row, flush=True)
    if "load" in args.sections:
        decode_step(eng, [None] * 4, 16, 4, args.device)   # warm kernels for a short prompt
        with tempfile.TemporaryDirectory() as tmp:
            save_peft_adapter(random_adapter(eng, seed=999), Path(tmp), args.model)
            sync(args.device)
            t0 = time.perf_counter()
            llm.load_adapter("fresh", tmp)
            t_load = time.perf_counter() - t0
            eng.add_request(list(range(10, 26)), SamplingParams(max_tokens=1, temperature=0), "fresh")
            while eng.has_unfinished():
                eng.step()
            sync(args.device)
            t_first = time.perf_counter() - t0
        row = {"section": "load", "adapters": 1, "load_ms": t_load * 1e3, "load_to_first_token_ms": t_first * 1e3}
        rows.append(row)
        print(row, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="random:llama3-8b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sections", default="many,swap,load")
    ap.add_argument("--many", type=lambda s: [int(x) for x in s.split(",")], default=[16, 64])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3, help="windows of base and of adapter steps (medians reported)")
    ap.add_argument("--swaps", type=int, default=8)
    ap.add_argument("--kv-gib", type=float, default=16)
    ap.add_argument("--profile-kernels", type=int, default=0,
                    help="print this many top kernels (GPU time a step) of the base and many-adapter steps")
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="tiny sizes for a CPU smoke test")
    args = ap.parse_args()
    if args.quick:
        args.many, args.batch, args.context, args.steps, args.swaps, args.kv_gib = [4], 4, 16, 2, 2, 0.05
    info = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "model": args.model,
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "argv": sys.argv}
    print(info, flush=True)
    rows: list[dict] = []
    if "many" in args.sections:
        bench_many(args, rows)
    if "swap" in args.sections or "load" in args.sections:
        bench_swap_and_load(args, rows)
    write_json(args.out, {"info": info, "rows": rows})
    print(table(rows, ["section", "adapters", "batch", "base_ms", "lora_ms", "ratio", "padded_ratio", "swap_ms", "load_ms",
                       "load_to_first_token_ms"]))


if __name__ == "__main__":
    main()
