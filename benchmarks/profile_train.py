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

model = sys.argv[1] if len(sys.argv) > 1 else "random:llama3-8b"
llm = LLM(model, dtype="bfloat16" if torch.cuda.is_available() else "float32", max_loras=4, max_lora_rank=16, max_model_len=2048, kv_cache_memory=256 << 20,
          max_num_batched_tokens=2048)
eng = llm.engine
trainer = Trainer(eng)
rng = np.random.default_rng(0)
exs = [TokenizedExample(t, t) for t in (rng.integers(10, eng.args.vocab_size - 1, 512).tolist() for _ in range(256))]
spec = TrainSpec(name="p", train_file="", output_dir="/tmp/prof", lora=LoraSpec(r=16, lora_alpha=32, target_modules="all-linear"),
                 micro_batch_size=4, max_steps=1000)
trainer.jobs["j"] = TrainingJob("j", spec, exs, [], eng)
for _ in range(3):
    eng.step()
torch.cuda.synchronize() if torch.cuda.is_available() else None
t0 = time.perf_counter()
for _ in range(5):
    eng.step()
torch.cuda.synchronize() if torch.cuda.is_available() else None
print(f"step {(time.perf_counter() - t0) / 5 * 1e3:.1f} ms -> {5 * 2048 / (time.perf_counter() - t0):.0f} tok/s")
from torch.profiler import ProfilerActivity, profile  # noqa: E402

with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    eng.step()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
kernel_ms = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
print(f"profiled step: GPU kernel time {kernel_ms:.1f} ms (if far under the step time, the step is host-bound)")
print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=60))
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))
