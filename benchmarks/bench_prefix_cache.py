"""Prefix caching on a chat workload: TTFT and throughput with the cache on against off, one process.

Every request is one shared system prompt (1,000 tokens) + a user turn of ShareGPT-like length, on
one of 4 random rank-16 adapters (round-robin) or the base model. Requests arrive as a Poisson
process at `--rate` per second (default: all at once), run greedily to their sampled output length.
The same engine runs the workload with caching off, then on (the cache starts empty, so the requests
of the first steps miss); a short warm-up first makes both runs start warm. Model: Llama-3-8B shape with random
bf16 weights. CPU smoke test: `--model random:tiny --device cpu` (small sizes unless given).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import SHAREGPT, lognormal_lengths, random_adapter, sync, table, write_json  # noqa: E402

from loquetier import LLM, SamplingParams  # noqa: E402


def workload(args, vocab_size: int):
    """(prompt, max_tokens, adapter, arrival offset in s) of every request; the same for both runs."""
    rng = np.random.default_rng(args.seed)
    system = rng.integers(10, vocab_size - 10, args.system_len).tolist()
    user = lognormal_lengths(args.requests, SHAREGPT["prompt_mean"], SHAREGPT["cap"], rng)
    outputs = lognormal_lengths(args.requests, args.output_mean, SHAREGPT["cap"], rng)
    names = [None] + [f"a{i}" for i in range(args.adapters)]
    gaps = rng.exponential(1.0 / args.rate, args.requests) if args.rate > 0 else np.zeros(args.requests)
    arrivals = np.cumsum(gaps) - gaps[0]
    return [(system + rng.integers(10, vocab_size - 10, u).tolist(), o, names[i % len(names)] if args.adapters else None,
             float(t)) for i, (u, o, t) in enumerate(zip(user, outputs, arrivals))]


def run(llm, requests, device) -> dict:
    """Submit each request at its arrival time between engine steps; TTFT from the engine's stamps."""
    eng = llm.engine
    stats = eng.stats.prefix_cache
    q0, h0 = stats.queries, stats.hits
    pending, done = list(requests), {}
    sync(device)
    t0 = time.perf_counter()
    while pending or eng.has_unfinished():
        now = time.perf_counter() - t0
        while pending and pending[0][3] <= now:
            prompt, n_out, adapter, _ = pending.pop(0)
            eng.add_request(prompt, SamplingParams(max_tokens=n_out, temperature=0, ignore_eos=True), adapter)
        if not eng.has_unfinished():
            time.sleep(max(0.0, min(0.01, pending[0][3] - now)))
            continue
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    sync(device)
    seconds = time.perf_counter() - t0
    ttft = sorted(o.metrics["first_token_time"] - o.metrics["arrival_time"] for o in done.values())
    gen = sum(len(o.token_ids) for o in done.values())
    prompt_tokens = sum(len(o.prompt_token_ids) for o in done.values())
    return {"requests": len(done), "seconds": seconds, "out_tok_per_s": gen / seconds,
            "total_tok_per_s": (gen + prompt_tokens) / seconds,
            "ttft_p50_ms": 1e3 * statistics.median(ttft), "ttft_p99_ms": 1e3 * float(np.percentile(ttft, 99)),
            "hit_rate": (stats.hits - h0) / max(1, stats.queries - q0)}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="random:llama3-8b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--requests", type=int, default=None, help="default: 256 on CUDA, 12 on CPU")
    ap.add_argument("--system-len", type=int, default=1000, help="shared system prompt, tokens")
    ap.add_argument("--output-mean", type=int, default=None, help="mean output tokens (default: ShareGPT's 338; 16 on CPU)")
    ap.add_argument("--adapters", type=int, default=4, help="random rank-16 adapters, round-robin with the base model")
    ap.add_argument("--rate", type=float, default=0.0, help="Poisson arrivals per second (0: all at once)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--kv-gib", type=float, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    args.requests = args.requests or (256 if cuda else 12)
    args.output_mean = args.output_mean or (SHAREGPT["output_mean"] if cuda else 16)
    llm = LLM(args.model, dtype="bfloat16" if cuda else "float32", device=args.device, max_loras=max(1, args.adapters),
              max_lora_rank=16, max_model_len=args.system_len + 2 * SHAREGPT["cap"] + 8,
              kv_cache_memory=int(args.kv_gib * 2**30) if cuda else 256 << 20,
              max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=256)
    for i in range(args.adapters):
        llm.engine.add_adapter(f"a{i}", random_adapter(llm.engine, seed=100 + i))
    requests = workload(args, llm.engine.args.vocab_size)
    info = {"device": torch.cuda.get_device_name() if cuda else "cpu", "model": args.model,
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "argv": sys.argv,
            "kv_blocks": llm.engine.kv.num_blocks}
    print(info, flush=True)
    # warm-up: the first requests, short, cached and not, so that neither timed run pays first-use costs
    for caching in (True, False):
        llm.engine.scheduler.set_prefix_caching(caching)
        run(llm, [(r[0], 4, r[2], 0.0) for r in requests[:8]], args.device)
    rows = []
    for caching in (False, True):
        llm.engine.scheduler.set_prefix_caching(caching)             # each timed run starts with an empty cache
        row = {"prefix_caching": "on" if caching else "off", **run(llm, requests, args.device)}
        rows.append(row)
        print(row, flush=True)
    off, on = rows
    rows.append({"prefix_caching": "on/off", "ttft_p50_ms": on["ttft_p50_ms"] / off["ttft_p50_ms"],
                 "ttft_p99_ms": on["ttft_p99_ms"] / off["ttft_p99_ms"],
                 "out_tok_per_s": on["out_tok_per_s"] / off["out_tok_per_s"],
                 "total_tok_per_s": on["total_tok_per_s"] / off["total_tok_per_s"]})
    write_json(args.out, {"info": info, "args": vars(args), "results": rows})
    print(table(rows, ["prefix_caching", "requests", "seconds", "ttft_p50_ms", "ttft_p99_ms", "out_tok_per_s",
                       "total_tok_per_s", "hit_rate"]))


if __name__ == "__main__":
    main()
