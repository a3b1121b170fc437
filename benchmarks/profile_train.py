"""Profile one training step of the engine (Llama-3-8B shape, random bf16, 4x512 tokens): top CUDA ops."""

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from loquetier import LLM  # noqa: E402
from loquetier.lora.adapter import LoraSpec  # noqa: E402
from loquetier.training.data import TokenizedExample  # noqa: E402
from loquetier.training.job import TrainingJob  # noqa: E402
from loquetier.training.spec import TrainSpec  # noqa: E402
from loquetier.training.trainer import Trainer  # noqa: E402

import argparse  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="random:llama3-8b")
ap.add_argument("--jobs", type=int, default=1)
ap.add_argument("--seq", type=int, default=512, help="tokens per example (fixed) unless --mean-len")
ap.add_argument("--mean-len", type=int, default=0, help="lognormal example lengths with this mean (as bench_unified)")
ap.add_argument("--dropout", type=float, default=0.0)
ap.add_argument("--rank", type=int, default=16)
ap.add_argument("--steps", type=int, default=10)
ap.add_argument("--no-graphs", action="store_true", help="training steps run eagerly (no captured graphs)")
ap.add_argument("--gc-compare", action="store_true",
                help="time synced steps with Python's garbage collector on, off, on again (host jitter)")
ap.add_argument("--cprofile", action="store_true",
                help="also run 3 steps under cProfile: where the host's time goes (the step is host-bound)")
args = ap.parse_args()
llm = LLM(args.model, dtype="bfloat16" if torch.cuda.is_available() else "float32", max_loras=4, max_lora_rank=16, max_model_len=2048,
          kv_cache_memory=256 << 20, max_num_batched_tokens=2048, train_cuda_graphs=not args.no_graphs)
eng = llm.engine
trainer = Trainer(eng)
rng = np.random.default_rng(0)
for j in range(args.jobs):
    lens = ([args.seq] * 256 if not args.mean_len else
            np.clip(rng.lognormal(np.log(args.mean_len) - 0.18, 0.6, 256), 8, 1024).astype(int).tolist())
    exs = [TokenizedExample(t, t) for t in (rng.integers(10, eng.args.vocab_size - 1, n).tolist() for n in lens)]
    spec = TrainSpec(name=f"p{j}", train_file="", output_dir=f"/tmp/prof{j}",
                     lora=LoraSpec(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=args.dropout, target_modules="all-linear"),
                     micro_batch_size=4, max_steps=1000)
    trainer.jobs[f"j{j}"] = TrainingJob(f"j{j}", spec, exs, [], eng)
for _ in range(3 * args.jobs + 1):   # past the capture of each job's layout (train_graphs.py)
    eng.step()
torch.cuda.synchronize() if torch.cuda.is_available() else None
tok0 = trainer.scheduled_tokens
t0 = time.perf_counter()
for _ in range(args.steps):
    eng.step()
torch.cuda.synchronize() if torch.cuda.is_available() else None
dt = time.perf_counter() - t0
print(f"step {dt / args.steps * 1e3:.1f} ms, {(trainer.scheduled_tokens - tok0) / args.steps:.0f} tokens/step "
      f"-> {(trainer.scheduled_tokens - tok0) / dt:.0f} tok/s")
if args.gc_compare:
    import gc
    import statistics

    def synced_steps(n):
        times = []
        for _ in range(n):
            t = time.perf_counter()
            eng.step()
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            times.append((time.perf_counter() - t) * 1e3)
        return times

    for label, enabled in (("gc on", True), ("gc off", False), ("gc on", True), ("gc off", False)):
        gc.enable() if enabled else gc.disable()
        ts = synced_steps(args.steps)
        print(f"{label}: median {statistics.median(ts):.1f} ms, min {min(ts):.1f}, max {max(ts):.1f}  "
              f"({' '.join(f'{t:.0f}' for t in ts)})", flush=True)
    gc.enable()
if args.cprofile:
    import cProfile
    import pstats
    prof_py = cProfile.Profile()
    prof_py.enable()
    for _ in range(3):
        eng.step()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    prof_py.disable()
    stats = pstats.Stats(prof_py)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(40)
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    eng.step()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
# kernels only: a CPU op's entry also carries the device time of the kernels it launched
kernel_ms = sum(e.self_device_time_total for e in prof.key_averages() if e.device_type == DeviceType.CUDA) / 1e3
print(f"profiled step: GPU kernel time {kernel_ms:.1f} ms (if far under the step time, the step is host-bound)")
print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=60))
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))
