"""LoRA fine-tuning throughput through the public `Trainer`/`TrainSpec` API, beside HF + PEFT on
the same examples, in one process.

Workloads (Llama-3-8B shape, random bf16 weights, LoRA r16 alpha 32 on all seven projections):
- `alpaca`: Alpaca-like examples (lognormal lengths, mean 80 tokens, sigma 0.6, capped at 1024; loss
  on the last three quarters), packed first-fit into micro-batches of `--micro-batch-tokens`.
  PEFT runs the same examples in padded batches of `--peft-batch` (as a PEFT user would).
- `fixed`: fixed-length examples, micro-batch 4 x 512; `--jobs` concurrent jobs (each its own adapter).
tok/s counts real tokens (no padding) over the timed steps. Prints a table last, writes JSON.
CPU smoke test: `--model random:tiny --device cpu --quick`.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import LORA_TARGETS, device_ceilings, hf_base_model, lognormal_lengths, sync, table, write_json  # noqa: E402

from loquetier import LLM  # noqa: E402
from loquetier.lora.adapter import LoraSpec  # noqa: E402
from loquetier.training.data import TokenizedExample  # noqa: E402
from loquetier.training.job import TrainingJob  # noqa: E402
from loquetier.training.spec import TrainSpec  # noqa: E402
from loquetier.training.trainer import Trainer  # noqa: E402



def alpaca_like(n: int, vocab: int, seed: int, mean: int = 80) -> list[TokenizedExample]:
    rng = np.random.default_rng(seed)
    out = []
    for length in lognormal_lengths(n, mean, 1024, rng, sigma=0.6):
        length = max(length, 8)
        ids = rng.integers(10, vocab - 10, length).tolist()
        out.append(TokenizedExample(ids, [-100] * (length // 4) + ids[length // 4:]))
    return out


def fixed_length(n: int, length: int, vocab: int, seed: int) -> list[TokenizedExample]:
    rng = np.random.default_rng(seed)
    return [TokenizedExample(t, t) for t in (rng.integers(10, vocab - 10, length).tolist() for _ in range(n))]


def flops_per_token(args_model, n_params: int, mean_attn_len: float) -> float:
    """LoRA training: forward 2N + input-gradient 2N per token (frozen base), plus causal attention."""
    a = args_model
    attn = 3 * 2 * 2 * a.num_layers * mean_attn_len * a.num_heads * a.head_dim / 2
    return 4 * n_params + attn


def mean_causal_len(lengths) -> float:
    """Average attended length per token of causal attention within each example."""
    lengths = np.asarray(lengths, dtype=np.float64)
    return float((lengths * lengths).sum() / lengths.sum())


def run_ours(args, name: str, jobs_examples: list[list[TokenizedExample]], spec_kw: dict, ceil, results) -> None:
    llm = LLM(args.model, dtype="bfloat16" if args.device == "cuda" else "float32", device=args.device,
              max_loras=max(4, len(jobs_examples)), max_lora_rank=16, max_model_len=2048,
              kv_cache_memory=256 << 20, max_num_batched_tokens=args.step_budget,
              train_cuda_graphs=not args.no_train_graphs, tensor_parallel_size=args.tensor_parallel_size)
    eng = llm.engine
    trainer = Trainer(eng)
    for j, exs in enumerate(jobs_examples):
        spec = TrainSpec(name=f"{name}{j}", train_file="", output_dir=f"/tmp/bench-train-{name}-{j}",
                         lora=LoraSpec(r=16, lora_alpha=32, lora_dropout=args.dropout, target_modules="all-linear"),
                         max_steps=100_000, learning_rate=1e-5, seed=j, **spec_kw)
        trainer.jobs[f"j{j}"] = TrainingJob(f"j{j}", spec, exs, [], eng)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup_steps):   # past the capture of every bucket seen so far (train_graphs.py)
        eng.step()
    sync(args.device)
    tokens0, t0 = trainer.scheduled_tokens, time.perf_counter()
    for _ in range(args.steps):
        eng.step()
    sync(args.device)
    dt = time.perf_counter() - t0
    tokens = trainer.scheduled_tokens - tokens0
    n_params = sum(p.numel() for n, p in eng.model.named_parameters() if "embed_tokens" not in n or eng.args.tie_word_embeddings)
    lengths = [len(e.input_ids) for exs in jobs_examples for e in exs]
    graphs = eng.runner.train_graphs
    row = {"workload": name, "engine": "loquetier", "jobs": len(jobs_examples), "tok_per_s": tokens / dt,
           "step_ms": dt / args.steps * 1e3, "tokens_per_step": tokens / args.steps,
           # split over GPUs: one GPU's parameters and heads, so MFU per GPU
           "mfu": tokens * flops_per_token(eng.model.args, n_params, mean_causal_len(lengths)) / dt / 1e12 / ceil["bf16_TFLOPs"],
           "graphs_captured": 0 if graphs is None else len(graphs.entries),
           "peak_GiB": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan")}
    results.append(row)
    print(row, flush=True)
    for job in list(trainer.jobs.values()):
        job.cancel()
    llm.close()
    del llm, eng, trainer
    gc.collect()
    torch.cuda.empty_cache() if args.device == "cuda" else None


def run_peft(args, name: str, examples: list[TokenizedExample], batch: int, ceil, results) -> None:
    """HF transformers + PEFT + AdamW, padded batches of `batch` examples in order."""
    from peft import LoraConfig, get_peft_model

    base = hf_base_model(args.model, args.device)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS, lora_dropout=args.dropout))
    model.train()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)
    batches = []
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        width = max(len(e.input_ids) for e in chunk)
        ids = torch.tensor([e.input_ids + [0] * (width - len(e.input_ids)) for e in chunk], device=args.device)
        labels = torch.tensor([e.labels + [-100] * (width - len(e.labels)) for e in chunk], device=args.device)
        mask = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in chunk], device=args.device)
        batches.append((ids, labels, mask, sum(len(e.input_ids) for e in chunk)))

    def step(k):
        ids, labels, mask, _ = batches[k % len(batches)]
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for k in range(3):
        step(k)
    sync(args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for k in range(3, 3 + args.peft_steps):
        step(k)
    sync(args.device)
    dt = time.perf_counter() - t0
    tokens = sum(batches[k % len(batches)][3] for k in range(3, 3 + args.peft_steps))
    row = {"workload": name, "engine": "peft", "jobs": 1, "tok_per_s": tokens / dt, "step_ms": dt / args.peft_steps * 1e3,
           "tokens_per_step": tokens / args.peft_steps,
           "peak_GiB": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan")}
    results.append(row)
    print(row, flush=True)
    del model, base, opt, batches
    gc.collect()
    torch.cuda.empty_cache() if args.device == "cuda" else None


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="random:llama3-8b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workloads", default="alpaca,fixed,peft-alpaca,peft-fixed")
    ap.add_argument("--micro-batch-tokens", type=int, default=4096)
    ap.add_argument("--step-budget", type=int, default=8192, help="max_num_batched_tokens of the engine")
    ap.add_argument("--jobs", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4],
                    help="concurrent jobs of the fixed-length workload")
    ap.add_argument("--peft-batch", type=int, default=8)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup-steps", type=int, default=12)
    ap.add_argument("--peft-steps", type=int, default=20)
    ap.add_argument("--no-train-graphs", action="store_true")
    ap.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs the model is split over")
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="tiny sizes for a CPU smoke test")
    args = ap.parse_args()
    n_examples, seq = 4000, 512
    if args.quick:
        args.micro_batch_tokens, args.step_budget, args.steps, args.warmup_steps, args.peft_steps = 256, 512, 2, 1, 2
        n_examples, seq = 200, 32
    info = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "model": args.model,
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "argv": sys.argv,
            "tensor_parallel_size": args.tensor_parallel_size}
    ceil = device_ceilings(args.device)
    info.update(ceil)
    print(info, flush=True)
    from loquetier.models.loader import preset_args
    vocab = preset_args(args.model).vocab_size
    results: list[dict] = []
    work = args.workloads.split(",")
    alpaca = alpaca_like(n_examples, vocab, seed=0)
    if "alpaca" in work:
        run_ours(args, "alpaca", [alpaca], {"micro_batch_tokens": args.micro_batch_tokens}, ceil, results)
    if "fixed" in work:
        for n_jobs in args.jobs:
            exs = [fixed_length(256, seq, vocab, seed=j) for j in range(n_jobs)]
            run_ours(args, "fixed", exs, {"micro_batch_size": 4}, ceil, results)
    if "peft-alpaca" in work:
        run_peft(args, "alpaca", alpaca, args.peft_batch, ceil, results)
    if "peft-fixed" in work:
        run_peft(args, "fixed", fixed_length(256, seq, vocab, seed=0), 4, ceil, results)
    write_json(args.out, {"info": info, "results": results})
    print(table(results, ["workload", "engine", "jobs", "tok_per_s", "step_ms", "tokens_per_step", "mfu",
                          "graphs_captured", "peak_GiB"]))


if __name__ == "__main__":
    main()
