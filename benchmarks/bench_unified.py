"""Unified fine-tuning + serving under a BurstGPT arrival trace (the paper's dynamic-load run).

The first `--requests` arrivals of the trace, time-compressed to each load of `--loads` (requests
per second); request i goes to inference adapter i mod 4. Prompt/output lengths: ShareGPT-like
lognormal (means 161 / 338 tokens, outputs capped at `--max-output`). Two fine-tuning jobs train
throughout on Alpaca-like examples (lognormal, mean 80 tokens) packed into micro-batches of
`--micro-batch-tokens`. Policies: SLO-aware, fixed (N inference steps per training step), serving
alone and training alone. `--tpot-slos` also sweeps the TPOT SLO at `--sweep-load` (SLO-aware).
One engine serves every configuration in turn, as a server would. Prints a table last, writes
JSON and a PNG plot. Parts that each run within 10 minutes on one GPU: `--policies slo,serve-only,train-only`
over the three loads, then `--policies fixed --tpot-slos ...`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import alpaca_like  # noqa: E402
from common import SHAREGPT, lognormal_lengths, random_adapter, table, write_json  # noqa: E402

from loquetier import LLM, SamplingParams  # noqa: E402
from loquetier.lora.adapter import LoraSpec  # noqa: E402
from loquetier.training.job import TrainingJob  # noqa: E402
from loquetier.training.spec import TrainSpec  # noqa: E402
from loquetier.training.trainer import Trainer  # noqa: E402

DEFAULT_TRACE = Path(__file__).parents[1].parent / "shared" / "data" / "burstgpt_arrivals.txt"


def pct(xs, q):
    xs = sorted(x for x in xs if x is not None)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def make_engine(args):
    """One engine for every configuration, as a long-running server would be (the base model,
    the KV pool and the compiled kernels are shared; the step-cost model keeps learning)."""
    llm = LLM(args.model, dtype="bfloat16" if args.device == "cuda" else "float32", device=args.device,
              max_loras=8, max_lora_rank=16, max_model_len=2048, kv_cache_memory=int(args.kv_gib * 2**30),
              max_num_batched_tokens=args.budget, max_num_seqs=256, mixed_cuda_graphs=not args.no_mixed_graphs)
    eng = llm.engine
    eng.config.scheduler.slo_ttft, eng.config.scheduler.slo_tpot = args.slo_ttft, args.slo_tpot
    eng.stats.slo_ttft, eng.stats.slo_tpot = args.slo_ttft, args.slo_tpot
    for i in range(4):
        eng.add_adapter(f"infer{i}", random_adapter(eng, seed=i))
    return eng


def run_one(args, eng, policy: str, load: float | None, serve: bool, train: bool, slo_tpot: float,
            sweep: bool = False) -> dict:
    from loquetier.engine.train_budget import make_policy
    eng.config.scheduler.train_policy = policy if policy in ("slo", "fixed") else "slo"
    eng.config.scheduler.slo_tpot = eng.stats.slo_tpot = slo_tpot
    eng.train_policy = make_policy(eng.config.scheduler, eng.cost_model)
    trainer = Trainer(eng)
    rng = np.random.default_rng(0)
    jobs = []
    if train:
        for j in range(2):
            spec = TrainSpec(name=f"ft{j}", train_file="", output_dir=f"/tmp/unified-{j}",
                             lora=LoraSpec(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                           init_lora_weights="gaussian"),
                             micro_batch_tokens=args.micro_batch_tokens, learning_rate=2e-5, max_steps=100_000, seed=j)
            job = TrainingJob(f"job{j}", spec, alpaca_like(4000, eng.args.vocab_size, seed=10 + j), [], eng)
            trainer.jobs[job.id] = job
            jobs.append(job)
    arrivals = []
    if serve:
        trace = [int(x) for x in Path(args.trace).read_text().split()][:args.requests]
        span = max(1, trace[-1] - trace[0])
        speedup = load * span / len(trace)      # compress the trace to `load` requests per second
        arrivals = [(t - trace[0]) / speedup for t in trace]
    n = len(arrivals)
    p_lens = lognormal_lengths(n, SHAREGPT["prompt_mean"], SHAREGPT["cap"], rng)
    o_lens = lognormal_lengths(n, SHAREGPT["output_mean"], args.max_output, rng)
    duration = (arrivals[-1] + args.drain) if serve else args.train_only_seconds
    # warm-up before the clock, with the jobs training (they capture their graphs anew): waves of
    # 8, 48 and 160 requests of the replay's lengths, whose outputs end at varied lengths, so that
    # the steps pass through every decode bucket beside training and kernels meet their shapes
    warm = np.random.default_rng(1)
    for wave in (8, 48, 160) if args.warmup else ():
        for i, p_len in enumerate(lognormal_lengths(wave, SHAREGPT["prompt_mean"], SHAREGPT["cap"], warm)):
            eng.add_request(warm.integers(10, eng.args.vocab_size - 10, p_len).tolist(),
                            SamplingParams(max_tokens=int(warm.integers(4, 48)), ignore_eos=True), f"infer{i % 4}")
        while eng.has_unfinished():
            eng.step()
    for _ in range(args.train_warmup_steps if train else 0):
        eng.step()
    for job in jobs:
        job.flush_logs(wait=True)
    eng.stats.finished.clear()
    # every replay draws the same prompts (rng seeded alike): the cache of an earlier replay in this
    # process must not serve them, so each replay starts as cold as the first
    if not args.keep_prefix_cache:
        assert eng.reset_prefix_cache()
    cache0 = eng.stats.prefix_cache.copy()
    tok0 = sum(j.trained_tokens for j in jobs)
    step_log: list[list] = []
    graphs0 = len(eng.runner.train_graphs.entries) if eng.runner.train_graphs is not None else 0
    t0 = time.monotonic()
    eng.step_observers.append(lambda info: _log_step(step_log, info, t0))
    nxt = 0
    while True:
        now = time.monotonic() - t0
        while nxt < n and arrivals[nxt] <= now:
            prompt = rng.integers(10, eng.args.vocab_size - 10, p_lens[nxt]).tolist()
            rid = eng.add_request(prompt, SamplingParams(max_tokens=o_lens[nxt], temperature=0, ignore_eos=True),
                                  f"infer{nxt % 4}")
            eng.requests[rid].arrival_time = t0 + arrivals[nxt]
            nxt += 1
        if nxt >= n and not eng.has_unfinished() and (serve or now >= duration):
            break
        if not serve and now >= duration:
            break
        if eng.has_unfinished() or (train and any(j.active for j in jobs)):
            eng.step()
        elif nxt < n:
            time.sleep(max(0.0, min(0.01, arrivals[nxt] - now)))
    for job in jobs:
        job.flush_logs(wait=True)
    wall = time.monotonic() - t0
    done = [s for s in eng.stats.finished if s.finish_reason != "abort"]
    row = {"policy": policy if train and serve else ("serve-only" if serve else "train-only"),
           "load": load, "req_per_s": n / arrivals[-1] if serve and arrivals[-1] > 0 else None,
           "slo_tpot": slo_tpot, "sweep": sweep, "requests": len(done), "slo_attain": eng.stats.slo_attainment(),
           "admit_6s": eng.stats.admitted_attainment(),
           "ttft_p50": pct([s.ttft for s in done], 0.5), "ttft_p99": pct([s.ttft for s in done], 0.99),
           "tpot_p50": pct([s.tpot for s in done], 0.5), "tpot_p99": pct([s.tpot for s in done], 0.99),
           "train_tok_s": (sum(j.trained_tokens for j in jobs) - tok0) / wall if train else 0.0, "wall_s": wall,
           # why requests miss: each SLO on its own; what the steps carried; graphs captured meanwhile
           "ttft_misses": sum(s.ttft is not None and s.ttft > (eng.stats.slo_ttft or float("inf")) for s in done),
           "tpot_misses": sum(s.tpot is not None and s.tpot > slo_tpot for s in done),
           "train_graphs_new": (len(eng.runner.train_graphs.entries) - graphs0) if eng.runner.train_graphs else 0,
           # share of the replay's prompt tokens whose K/V came from the prefix cache
           "prefix_hit_rate": eng.stats.prefix_cache.since(cache0).hit_rate,
           **_steps_by_kind(step_log)}
    eng.step_observers.pop()
    for job in jobs:
        job.cancel()   # frees the job's slot and optimizer state for the next configuration
    print(row, flush=True)
    if args.step_log:
        row["step_log"] = step_log
        row["request_log"] = [[round(s.arrival - t0, 4), s.queue_delay, s.ttft, s.tpot, s.prompt_tokens,
                               s.output_tokens] for s in done]
    return row


def _log_step(step_log: list, info: dict, t0: float) -> None:
    step_log.append([round(time.monotonic() - t0, 4), info["num_decode_tokens"], info["num_prefill_tokens"],
                     info["num_train_tokens"], round(info["time"], 5)])


def _step_kind(decode: int, prefill: int, train: int) -> str:
    return "prefill" if prefill else "mixed" if decode and train else "train_only" if train else "decode_only"


def _steps_by_kind(step_log: list) -> dict:
    """Steps, seconds and training tokens of each kind of step.

    With asynchronous scheduling a step call launches its step, then waits for the previous step's
    tokens: its host time is mostly the previous step's GPU time. So `s_<kind>` gives each step the
    host time of the call after it (the last step keeps its own), and `s_call_<kind>` the calls' own
    host times, which charge a short prefill step with the long mixed step before it."""
    kinds = [_step_kind(decode, prefill, train) for _, decode, prefill, train, _ in step_log]
    out = {"steps": len(step_log), "steps_train": sum(1 for x in step_log if x[3]),
           "steps_prefill": kinds.count("prefill"), "steps_decode_only": kinds.count("decode_only")}
    for kind in ("train_only", "mixed", "prefill", "decode_only"):
        out[f"s_{kind}"], out[f"s_call_{kind}"], out[f"tok_{kind}"] = 0.0, 0.0, 0
    for i, (kind, (_, _, _, train, seconds)) in enumerate(zip(kinds, step_log)):
        out[f"s_{kind}"] += step_log[i + 1][4] if i + 1 < len(step_log) else seconds
        out[f"s_call_{kind}"] += seconds
        out[f"tok_{kind}"] += train
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sweep = [r for r in rows if r["sweep"]]
    fig, axes = plt.subplots(1, 3 if sweep else 2, figsize=(15 if sweep else 10, 4))
    a1, a2 = axes[:2]
    solo = [r for r in rows if r["policy"] == "train-only"]
    for pol in ("slo", "fixed", "serve-only"):
        pts = sorted((r["req_per_s"], r) for r in rows if r["policy"] == pol and r["req_per_s"] and not r["sweep"])
        if pts:
            a1.plot([p for p, _ in pts], [r["slo_attain"] for _, r in pts], "o-", label=pol)
            if pol != "serve-only":
                a2.plot([p for p, _ in pts], [r["train_tok_s"] for _, r in pts], "o-", label=pol)
    if sweep:   # with the row of the default TPOT SLO at the same load, if it ran
        sweep += [r for r in rows if r["policy"] == "slo" and not r["sweep"] and r["load"] == sweep[0]["load"]]
        sweep.sort(key=lambda r: r["slo_tpot"])
        a3 = axes[2]
        a3.plot([r["slo_tpot"] * 1e3 for r in sweep], [r["train_tok_s"] for r in sweep], "o-", label="training tok/s")
        a3b = a3.twinx()
        a3b.plot([r["slo_tpot"] * 1e3 for r in sweep], [r["slo_attain"] for r in sweep], "s--", c="tab:red")
        a3b.set(ylabel="SLO attainment (dashed)", ylim=(0, 1.05))
        a3.set(title=f"SLO-aware at {sweep[0]['load']:g} req/s", xlabel="TPOT SLO (ms)", ylabel="training tokens/s")
    for ax in axes[1:]:
        if solo:
            ax.axhline(solo[0]["train_tok_s"], ls="--", c="gray", label="train-only")
    a1.set(xlabel="load (requests/s)", ylabel="SLO attainment (TTFT and TPOT)", ylim=(0, 1.05))
    a2.set(xlabel="load (requests/s)", ylabel="training tokens/s")
    a1.legend(); a2.legend()
    if sweep:
        axes[2].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="random:llama3-8b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--trace", default=str(DEFAULT_TRACE))
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--loads", type=lambda s: [float(x) for x in s.split(",")], default=[3.4, 8.0, 15.0],
                    help="requests per second the trace is compressed to")
    ap.add_argument("--policies", default="slo,fixed,serve-only,train-only")
    ap.add_argument("--tpot-slos", type=lambda s: [float(x) for x in s.split(",")], default=[],
                    help="also sweep the TPOT SLO (s) for the SLO-aware policy at --sweep-load")
    ap.add_argument("--sweep-load", type=float, default=8.0)
    ap.add_argument("--max-output", type=int, default=384)
    ap.add_argument("--slo-ttft", type=float, default=1.5)
    ap.add_argument("--slo-tpot", type=float, default=0.08)
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--micro-batch-tokens", type=int, default=4096)
    ap.add_argument("--kv-gib", type=float, default=12)
    ap.add_argument("--drain", type=float, default=0.0)
    ap.add_argument("--train-only-seconds", type=float, default=20)
    ap.add_argument("--train-warmup-steps", type=int, default=12)
    ap.add_argument("--no-mixed-graphs", action="store_true",
                    help="run mixed (training + decode) steps eagerly (EngineConfig.mixed_cuda_graphs=False)")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="skip the waves of requests that warm the engine up before each replay's clock")
    ap.add_argument("--keep-prefix-cache", action="store_true",
                    help="let a replay hit the prefix cache that earlier replays of the same prompts left "
                         "(by default each replay starts with an empty cache)")
    ap.add_argument("--step-log", action="store_true",
                    help="keep every step's [time, decode rows, prefill tokens, training tokens, seconds] in the JSON")
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--plot-from", nargs="+", default=None, metavar="JSON",
                    help="run nothing: plot the rows of earlier --out files (parts run in separate GPU calls) "
                         "into --plot")
    args = ap.parse_args()
    if args.plot_from:
        rows = [r for path in args.plot_from for r in json.load(open(path))["rows"]]
        plot(rows, args.plot or "unified.png")
        print(table(rows, ["policy", "load", "slo_tpot", "slo_attain", "tpot_p50", "train_tok_s"]))
        return
    rows = []
    eng = make_engine(args)
    pols = args.policies.split(",")
    info = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "argv": sys.argv}

    def save(partial: bool):
        write_json(args.out, {"args": vars(args), "info": info, "rows": rows, "partial": partial})

    if "train-only" in pols:   # first: the reference the co-served rows are divided by
        rows.append(run_one(args, eng, "slo", None, False, True, args.slo_tpot))
        save(True)
    for load in args.loads:
        for pol in pols:
            if pol in ("slo", "fixed"):
                rows.append(run_one(args, eng, pol, load, True, True, args.slo_tpot))
            elif pol == "serve-only":
                rows.append(run_one(args, eng, "slo", load, True, False, args.slo_tpot))
            save(True)
    for tpot in args.tpot_slos:
        rows.append(run_one(args, eng, "slo", args.sweep_load, True, True, tpot, sweep=True))
        save(True)
    save(False)
    if args.plot:
        plot(rows, args.plot)
    print(table(rows, ["policy", "load", "req_per_s", "slo_tpot", "requests", "slo_attain", "admit_6s", "ttft_p50",
                       "ttft_p99", "tpot_p50", "tpot_p99", "train_tok_s", "wall_s", "ttft_misses", "tpot_misses",
                       "steps", "steps_train", "steps_prefill"]))


if __name__ == "__main__":
    main()
