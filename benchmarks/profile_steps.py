"""GPU-busy fraction of each kind of engine step, under the torch profiler.

Kinds (Llama-3-8B shape, random bf16, LoRA r16 all-linear; training on Alpaca-like examples packed
into `--micro-batch-tokens`):
- train-graph: training alone, steps replayed from captured (bucketed) CUDA graphs;
- train-eager: the same steps with graphs off;
- mixed: `--decode-batch` decoding requests plus up to `--mixed-train-tokens` training tokens a step
  (several sizes, comma-separated, give one row each: how training beside decode rows scales);
- decode: the same requests alone (decode graphs).
For each kind, K consecutive steps run under the profiler with no sync between them. busy = the
union of the GPU's kernel and copy intervals over the window from the first step's start to the last
kernel's end. Also: wall time and host (CPU) time per step. A busy fraction far below 1 means the
GPU waits for the host. A window starts once `--warmup-quiet` steps in a row captured no graph and
ran no layout eagerly, and its row counts the window's replays, captures and eager steps.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import alpaca_like  # noqa: E402
from common import table, write_json  # noqa: E402

from loquetier import LLM, SamplingParams  # noqa: E402
from loquetier.lora.adapter import LoraSpec  # noqa: E402
from loquetier.training.job import JobStatus, TrainingJob  # noqa: E402
from loquetier.training.spec import TrainSpec  # noqa: E402
from loquetier.training.trainer import Trainer  # noqa: E402


TOP_KERNELS_OF: set[str] = set()


def busy_fraction(prof, steps: int) -> dict:
    """Union of device intervals over [first step start, last device end]; per-step wall and host."""
    from torch.autograd import DeviceType
    events = prof.events()
    marks = sorted((e.time_range.start, e.time_range.end) for e in events if e.name == "engine.step")
    # device intervals of kernels and copies; a user annotation (the step marker) also has a GPU
    # range spanning its whole step, which is not work
    dev = sorted((e.time_range.start, e.time_range.end) for e in events
                 if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start
                 and e.name != "engine.step" and not getattr(e, "is_user_annotation", False))
    if not marks:
        return {}
    start = marks[0][0]
    dev = [(max(a, start), b) for a, b in dev if b > start]
    end = max([marks[-1][1]] + [b for _, b in dev])
    busy, cur_a, cur_b = 0.0, None, None
    for a, b in dev:
        if cur_b is None or a > cur_b:
            if cur_b is not None:
                busy += cur_b - cur_a
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    if cur_b is not None:
        busy += cur_b - cur_a
    wall = end - start
    return {"steps": steps, "wall_ms_per_step": wall / steps / 1e3,
            "host_ms_per_step": sum(b - a for a, b in marks) / steps / 1e3,
            "gpu_ms_per_step": busy / steps / 1e3, "gpu_busy": busy / wall if wall else float("nan"),
            "device_events_per_step": len(dev) / steps}


def _graph_counts(graphs) -> dict:
    names = ("replays", "captures", "eager")
    return {f"graph_{n}": getattr(graphs, n) if graphs is not None else 0 for n in names}


def warm_up(eng, quiet_steps: int = 16, max_steps: int = 300) -> None:
    """Step until `quiet_steps` steps in a row neither captured a graph nor saw a layout for the
    first time: a profiled window must not hold those (each costs several replays). Steps that
    never go through the training graphs (mixed graphs off) are quiet from the start."""
    graphs, quiet = eng.runner.train_graphs, 0
    for _ in range(max_steps):
        before = _graph_counts(graphs)
        eng.step()
        after = _graph_counts(graphs)
        settled = after["graph_captures"] == before["graph_captures"] and after["graph_eager"] == before["graph_eager"]
        quiet = quiet + 1 if settled else 0
        if quiet >= quiet_steps:
            return


def profile(eng, kind: str, steps: int, rows: list, trainer=None) -> None:
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile
    torch.cuda.synchronize()
    tok0 = trainer.scheduled_tokens if trainer else 0
    graphs = eng.runner.train_graphs
    counts0 = _graph_counts(graphs)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            with record_function("engine.step"):
                eng.step()
        torch.cuda.synchronize()
    row = {"kind": kind, **busy_fraction(prof, steps)}
    if kind in TOP_KERNELS_OF:
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=70))
    if trainer is not None:
        row["train_tokens_per_step"] = (trainer.scheduled_tokens - tok0) / steps
        # what the window's steps were: replays of graphs captured before it, captures, eager runs
        if graphs is not None:   # (train-eager runs with the graphs taken away)
            after = _graph_counts(graphs)
            row.update({k: after[k] - counts0[k] for k in after})
    rows.append(row)
    print(row, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="random:llama3-8b")
    ap.add_argument("--kinds", default="train-graph,train-eager,mixed,decode")
    ap.add_argument("--micro-batch-tokens", type=int, default=4096)
    ap.add_argument("--decode-batch", type=int, default=32)
    ap.add_argument("--mixed-train-tokens", type=lambda s: [int(x) for x in s.split(",")], default=[1024])
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup-quiet", type=int, default=16,
                    help="before a window, step until this many steps in a row captured nothing and ran nothing eagerly")
    ap.add_argument("--no-mixed-graphs", action="store_true", help="mixed steps run eagerly")
    ap.add_argument("--top", default="", help="print the top kernels of these kinds")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    kinds = args.kinds.split(",")
    TOP_KERNELS_OF.update(args.top.split(","))
    llm = LLM(args.model, dtype="bfloat16", max_loras=4, max_lora_rank=16, max_model_len=2048,
              kv_cache_memory=8 << 30, max_num_batched_tokens=8192, mixed_cuda_graphs=not args.no_mixed_graphs)
    eng = llm.engine
    trainer = Trainer(eng)
    spec = TrainSpec(name="p", train_file="", output_dir="/tmp/profile-steps", max_steps=100_000,
                     lora=LoraSpec(r=16, lora_alpha=32, lora_dropout=args.dropout, target_modules="all-linear"),
                     micro_batch_tokens=args.micro_batch_tokens, learning_rate=1e-5)
    job = TrainingJob("j0", spec, alpaca_like(4000, eng.args.vocab_size, seed=0), [], eng)
    trainer.jobs["j0"] = job
    rows: list[dict] = []
    warm_up(eng, args.warmup_quiet)
    if "train-graph" in kinds:
        profile(eng, "train-graph", args.steps, rows, trainer)
    if "train-eager" in kinds:
        graphs, eng.runner.train_graphs = eng.runner.train_graphs, None
        eng.step()
        profile(eng, "train-eager", args.steps, rows, trainer)
        eng.runner.train_graphs = graphs
    rng = np.random.default_rng(1)
    if "mixed" in kinds or "decode" in kinds:
        eng.add_adapter("serve", eng.adapters.snapshot("p@train"))
        for i in range(args.decode_batch):
            eng.add_request(rng.integers(10, 1000, 256).tolist(),
                            SamplingParams(max_tokens=1500, temperature=0, ignore_eos=True), "serve" if i % 2 else None)
        job.status = JobStatus.PAUSED
        while any(not s.output_token_ids for s in eng.scheduler.running) or eng.scheduler.waiting:
            eng.step()
        # the step budget leaves `--mixed-train-tokens` to training beside the decode rows
        eng.config.scheduler.max_num_batched_tokens = args.decode_batch + args.mixed_train_tokens[0]
        if "decode" in kinds:
            for _ in range(3):
                eng.step()
            profile(eng, "decode", args.steps, rows)
        if "mixed" in kinds:
            job.status = JobStatus.RUNNING
            for size in args.mixed_train_tokens:
                eng.config.scheduler.max_num_batched_tokens = args.decode_batch + size
                warm_up(eng, args.warmup_quiet)
                profile(eng, "mixed" if len(args.mixed_train_tokens) == 1 else f"mixed-{size}", args.steps, rows,
                        trainer)
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "argv": sys.argv}
    write_json(args.out, {"info": info, "rows": rows})
    print(table(rows, ["kind", "wall_ms_per_step", "host_ms_per_step", "gpu_ms_per_step", "gpu_busy",
                       "train_tokens_per_step", "graph_replays", "graph_captures", "graph_eager",
                       "device_events_per_step"]))


if __name__ == "__main__":
    main()
