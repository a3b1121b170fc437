"""GPU benchmark of the engine against HF transformers + PEFT, side by side in one run.

Model: Llama-3-8B shape with random bf16 weights made on the GPU (no download). Adapters: rank 16,
alpha 32, all seven projections. Sections: ceilings, decode, e2e, peft (training: bench_train.py),
and on a GPU replays (decode-graph replay time against step time inside this engine, `--replay-windows`).
Prints a table last
and writes JSON (`--out`). CPU smoke test: `--model random:tiny --device cpu --quick`.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    LORA_TARGETS,
    SHAREGPT,
    device_ceilings,
    hf_base_model,
    lognormal_lengths,
    random_adapter,
    start_decoding,
    steady_step_seconds,
    sync,
    table,
    write_json,
)

from loquetier import LLM, SamplingParams  # noqa: E402


def make_llm(args, kv_bytes, max_batched=8192, max_seqs=256):
    return LLM(args.model, dtype="bfloat16" if args.device == "cuda" else "float32", device=args.device,
               max_loras=4, max_lora_rank=16, max_model_len=2048, kv_cache_memory=kv_bytes,
               max_num_batched_tokens=max_batched, max_num_seqs=max_seqs,
               train_cuda_graphs=not args.no_train_graphs, tensor_parallel_size=args.tensor_parallel_size)


def add_adapters(llm, n=4):
    names = []
    for i in range(n):
        llm.engine.add_adapter(f"a{i}", random_adapter(llm.engine, seed=100 + i))
        names.append(f"a{i}")
    return names


def param_bytes(model) -> int:
    total = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name and model.lm_head is not None:
            continue  # an untied embedding table is only gathered, not streamed
        total += p.numel() * p.element_size()
    return total


def adapter_bytes(engine, r=16) -> int:
    a = engine.model.args   # split over GPUs: one GPU's shapes (replicated A/B slightly undercounted)
    per_layer = sum(r * (i + o) for i, o in [(a.hidden_size, a.q_size), (a.hidden_size, a.kv_size),
                                             (a.hidden_size, a.kv_size), (a.q_size, a.hidden_size),
                                             (a.hidden_size, a.intermediate_size), (a.hidden_size, a.intermediate_size),
                                             (a.intermediate_size, a.hidden_size)])
    return per_layer * a.num_layers * 2


def bench_decode(args, llm, names, ceil, results):
    """Decode steps at a fixed batch. A window is `--decode-steps` consecutive `Engine.step()` calls
    (a device sync before and after, none between, so asynchronous scheduling can overlap the host's
    work with the GPU), timed by wall clock over their number. Each batch runs `--decode-rounds`
    rounds; a round takes one window of each adapter count (0, 1, 4) on fresh requests, in the
    reverse order every other round, so that the GPU's clock drift falls on all of them alike.
    `step_ms` is the median over the rounds. The same steps with asynchronous scheduling off run in
    the same process for the A/B."""
    eng = llm.engine
    a = eng.args
    kv_per_token = a.num_layers * 2 * eng.model.args.kv_size * 2   # one GPU's KV heads
    wbytes = param_bytes(eng.model)
    rng = np.random.default_rng(0)
    modes = [True, False] if not args.no_async_ab else [True]
    for batch in args.batches:
        windows: dict[tuple[int, bool], list[float]] = {}
        synced: dict[tuple[int, bool], list[float]] = {}   # steps each waited for (host work not overlapped)
        for rnd in range(args.decode_rounds):
            counts = (0, 1, 4) if rnd % 2 == 0 else (4, 1, 0)
            for n_ad in counts:
                for asynchronous in modes:
                    eng.config.async_scheduling = asynchronous
                    adapters = [None if n_ad == 0 else names[i % n_ad] for i in range(batch)]
                    for ad in adapters:
                        eng.add_request(rng.integers(10, a.vocab_size - 10, args.context).tolist(),
                                        SamplingParams(max_tokens=2 * args.decode_steps + 8,
                                                       temperature=0, ignore_eos=True), ad)
                    start_decoding(eng)
                    windows.setdefault((n_ad, asynchronous), []).append(
                        steady_step_seconds(eng, args.decode_steps, args.device))
                    for _ in range(args.decode_steps):
                        t1 = time.perf_counter()
                        eng.step()
                        sync(args.device)
                        synced.setdefault((n_ad, asynchronous), []).append(time.perf_counter() - t1)
                    for rid in list(eng.requests):
                        eng.abort(rid)
                    while eng.has_unfinished():
                        eng.step()
        for (n_ad, asynchronous), steps in windows.items():
            step = statistics.median(steps)
            moved = (wbytes + n_ad * adapter_bytes(eng)
                     + batch * (args.context + args.decode_steps) * kv_per_token)
            row = {"section": "decode", "batch": batch, "adapters": n_ad, "async": asynchronous,
                   "step_ms": step * 1e3, "step_ms_rounds": [t * 1e3 for t in steps],
                   "step_ms_synced": statistics.median(synced[(n_ad, asynchronous)]) * 1e3,
                   "tok_per_s": batch / step, "bw_util": moved / step / 1e9 / ceil["bandwidth_GBps"]}
            results.append(row)
            print(row, flush=True)
    eng.config.async_scheduling = True


def bench_e2e(args, llm, names, results):
    eng = llm.engine
    rng = np.random.default_rng(1)
    n = args.e2e_requests
    p_lens = lognormal_lengths(n, SHAREGPT["prompt_mean"], SHAREGPT["cap"], rng)
    o_lens = lognormal_lengths(n, SHAREGPT["output_mean"], SHAREGPT["cap"], rng)
    if args.device != "cuda":
        o_lens = [min(8, x) for x in o_lens]
    prompts = [rng.integers(10, eng.args.vocab_size - 10, p).tolist() for p in p_lens]
    # a short warm-up run first, so that neither timed run pays first-use costs (cuBLAS / Triton)
    warm = prompts[:8]
    llm.generate(warm, [SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)] * len(warm),
                 adapters=[names[i % 4] for i in range(len(warm))])
    # the first `--peft-e2e-requests` requests again: PEFT runs exactly these in its e2e part
    subset = min(args.peft_e2e_requests, n) if "peft" in args.sections.split(",") or args.e2e_subset else 0
    runs = [(n, n_ad) for n_ad in (1, 4)] * args.e2e_repeat + [(subset, n_ad) for n_ad in (1, 4) if subset]
    for run, (k, n_ad) in enumerate(runs):
        params = [SamplingParams(max_tokens=o, temperature=0, ignore_eos=True) for o in o_lens[:k]]
        profiler = None
        if args.e2e_profile_first and run == 0:   # where the first run's extra time goes (host side)
            import cProfile
            profiler = cProfile.Profile()
            profiler.enable()
        # every run starts with an empty prefix cache: the runs repeat the same prompts (request i of
        # the 4-adapter run has the 1-adapter run's adapter when i % 4 == 0), which would hit it
        assert llm.reset_prefix_cache()
        cache0 = eng.stats.prefix_cache.copy()
        sync(args.device)
        t0 = time.perf_counter()
        outs = llm.generate(prompts[:k], params, adapters=[names[i % n_ad] for i in range(k)])
        sync(args.device)
        dt = time.perf_counter() - t0
        if profiler is not None:
            import pstats
            profiler.disable()
            print(f"--- cProfile of the first e2e run ({dt:.1f} s with the profiler on)")
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        gen = sum(len(o.token_ids) for o in outs)
        row = {"section": "e2e", "adapters": n_ad, "requests": k, "gen_tokens": gen, "seconds": dt,
               "tok_per_s": gen / dt,
               "prefix_hit_rate": eng.stats.prefix_cache.since(cache0).hit_rate}
        results.append(row)
        print(row, flush=True)
    return prompts, o_lens


def bench_peft(args, results, prompts, o_lens):
    """HF transformers + PEFT on the same shapes: decode at batch and an e2e subset (training: bench_train.py)."""
    from peft import LoraConfig, get_peft_model

    base = hf_base_model(args.model, args.device)
    base.eval()
    targets = LORA_TARGETS
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=targets, lora_dropout=0.0), adapter_name="a0")
    for i in range(1, 4):
        model.add_adapter(f"a{i}", LoraConfig(r=16, lora_alpha=32, target_modules=targets, lora_dropout=0.0))
    model.eval()
    rng = np.random.default_rng(3)
    vocab = base.config.vocab_size

    def gen(batch, n_ad, new):
        ids = torch.tensor(rng.integers(10, vocab - 10, (batch, args.context)), device=args.device)
        names = [f"a{i % n_ad}" for i in range(batch)]
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names,
                                  max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

    for batch in (args.peft_batches if "decode" in args.peft_parts else []):
        for n_ad in (1, 4):
            gen(batch, n_ad, 2)
            sync(args.device)
            t0 = time.perf_counter(); gen(batch, n_ad, 1); sync(args.device); t1 = time.perf_counter() - t0
            n_new = 33
            t0 = time.perf_counter(); gen(batch, n_ad, n_new); sync(args.device); tn = time.perf_counter() - t0
            step = (tn - t1) / (n_new - 1)
            row = {"section": "peft_decode", "batch": batch, "adapters": n_ad, "step_ms": step * 1e3, "tok_per_s": batch / step}
            results.append(row)
            print(row, flush=True)
    # e2e subset: one padded batch of the first requests, as a PEFT user would run it
    k = min(args.peft_e2e_requests, len(prompts))
    for n_ad in (args.peft_e2e_adapters if "e2e" in args.peft_parts else ()):
        sub = prompts[:k]
        width = max(len(x) for x in sub)
        ids = torch.tensor([[0] * (width - len(x)) + x for x in sub], device=args.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in sub], device=args.device)
        new = max(o_lens[:k])
        sync(args.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, adapter_names=[f"a{i % n_ad}" for i in range(k)],
                           max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        sync(args.device)
        dt = time.perf_counter() - t0
        useful = sum(o_lens[:k])
        row = {"section": "peft_e2e", "adapters": n_ad, "requests": k, "gen_tokens": useful, "seconds": dt,
               "tok_per_s": useful / dt}
        results.append(row)
        print(row, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="random:llama3-8b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sections", default="ceilings,decode,e2e,peft")
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32, 64, 128])
    ap.add_argument("--peft-batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32])
    ap.add_argument("--peft-parts", default="decode,e2e")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--decode-steps", type=int, default=20)
    ap.add_argument("--decode-rounds", type=int, default=3, help="windows of each adapter count, interleaved")
    ap.add_argument("--e2e-requests", type=int, default=256)
    ap.add_argument("--peft-e2e-requests", type=int, default=32)
    ap.add_argument("--peft-e2e-adapters", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4])
    ap.add_argument("--e2e-repeat", type=int, default=1, help="run the 1- and 4-adapter e2e runs this many times")
    ap.add_argument("--e2e-subset", action="store_true",
                    help="also run the first --peft-e2e-requests requests (PEFT's e2e set) through the engine")
    ap.add_argument("--e2e-profile-first", action="store_true",
                    help="run the first e2e run under cProfile and print its top functions")
    ap.add_argument("--no-train-graphs", action="store_true", help="training steps run eagerly (no captured graphs)")
    ap.add_argument("--no-async-ab", action="store_true",
                    help="decode: measure with asynchronous scheduling only (no run with it off)")
    ap.add_argument("--replay-windows", type=lambda s: [int(x) for x in s.split(",") if x], default=[],
                    help="section replays: windows of this many decode steps at --replay-batch (default 20,40,20), "
                         "each replay bracketed by CUDA events (profile_decode.engine_steps), 0 then 4 adapters")
    ap.add_argument("--replay-batch", type=int, default=64)
    ap.add_argument("--kv-gib", type=float, default=24, help="KV cache per GPU")
    ap.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs the model is split over")
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="tiny sizes for a CPU smoke test")
    args = ap.parse_args()
    if args.quick:
        args.batches, args.peft_batches, args.context, args.decode_steps = [1, 4], [2], 16, 3
        args.e2e_requests, args.peft_e2e_requests = 6, 3
        args.kv_gib = min(args.kv_gib, 0.05)   # the default would allocate 24 GiB of host memory
    sections = args.sections.split(",")
    results: list[dict] = []
    info = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "model": args.model,
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "argv": sys.argv,
            "tensor_parallel_size": args.tensor_parallel_size}
    ceil = device_ceilings(args.device) if "ceilings" in sections else {"bandwidth_GBps": float("nan"), "bf16_TFLOPs": float("nan")}
    info.update(ceil)
    print(info, flush=True)
    prompts, o_lens = [], []
    if "decode" in sections or "e2e" in sections or "replays" in sections:
        llm = make_llm(args, kv_bytes=int(args.kv_gib * 2**30))
        names = add_adapters(llm)
        if "decode" in sections:
            bench_decode(args, llm, names, ceil, results)
        if "replays" in sections:
            from profile_decode import engine_steps
            rng = np.random.default_rng(0)
            for steps in args.replay_windows or [20, 40, 20]:
                results += engine_steps(llm.engine, names, args.replay_batch, args.context, steps, rng)
        if "e2e" in sections:
            prompts, o_lens = bench_e2e(args, llm, names, results)
        llm.close()
        del llm
        gc.collect()
        torch.cuda.empty_cache() if args.device == "cuda" else None
    if "peft" in sections:
        if not prompts:
            rng = np.random.default_rng(1)
            p_l = lognormal_lengths(args.e2e_requests, SHAREGPT["prompt_mean"], SHAREGPT["cap"], rng)
            o_lens = lognormal_lengths(args.e2e_requests, SHAREGPT["output_mean"], SHAREGPT["cap"], rng)
            from loquetier.models.loader import preset_args
            top = min(1000, preset_args(args.model).vocab_size)
            prompts = [rng.integers(10, top, p).tolist() for p in p_l]
        bench_peft(args, results, prompts, o_lens)
    write_json(args.out, {"info": info, "results": results})
    print(table(results, ["section", "batch", "adapters", "async", "step_ms", "step_ms_synced", "tok_per_s", "bw_util", "mfu", "peak_GiB",
                          "requests", "gen_tokens", "seconds"]))


if __name__ == "__main__":
    main()
