"""Diagnose GPU memory across training steps with several concurrent jobs (prints allocated GiB per step)."""

import sys

import numpy as np
import torch

from loquetier import LLM
from loquetier.lora.adapter import LoraSpec
from loquetier.training.data import TokenizedExample
from loquetier.training.job import TrainingJob
from loquetier.training.spec import TrainSpec
from loquetier.training.trainer import Trainer

n_jobs, dropout = int(sys.argv[1]), float(sys.argv[2])
llm = LLM("random:llama3-8b", dtype="bfloat16", max_loras=4, max_lora_rank=16, max_model_len=2048,
          kv_cache_memory=256 << 20, max_num_batched_tokens=2048)
eng = llm.engine
tr = Trainer(eng)
rng = np.random.default_rng(0)
for j in range(n_jobs):
    exs = [TokenizedExample(t, t) for t in (rng.integers(10, 100000, 512).tolist() for _ in range(64))]
    spec = TrainSpec(name=f"t{j}", train_file="", output_dir=f"/tmp/m{j}",
                     lora=LoraSpec(r=16, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear"),
                     micro_batch_size=4, max_steps=1000)
    tr.jobs[f"j{j}"] = TrainingJob(f"j{j}", spec, exs, [], eng)
print("after setup", torch.cuda.memory_allocated() / 2**30, flush=True)
for i in range(8):
    try:
        eng.step()
    except torch.OutOfMemoryError as e:
        print("OOM at step", i, str(e)[:200])
        break
    torch.cuda.synchronize()
    print(i, f"{torch.cuda.memory_allocated() / 2**30:.2f} GiB, peak {torch.cuda.max_memory_allocated() / 2**30:.2f}",
          [j.step for j in tr.jobs.values()], [j.status.value for j in tr.jobs.values()],
          [j.error for j in tr.jobs.values() if j.error][:1], flush=True)
