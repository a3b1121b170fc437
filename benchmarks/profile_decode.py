"""Where a decode step's time goes: CUDA-graph replay times of the base and LoRA decode forwards
(Llama-3-8B shape, random bf16, context 512) for each SMLM layout, then the top kernels of one
replay. Variants: the shrink folded into the base GEMM or not; segment arrays as long as the
bucket (the old layout) or capped at slots + 2.

    python benchmarks/profile_decode.py --batches 1,64
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import random_adapter  # noqa: E402

from loquetier import SamplingParams  # noqa: E402
from loquetier.config import CacheConfig, EngineConfig, LoraConfig, SchedulerConfig  # noqa: E402
from loquetier.engine.cuda_graphs import DecodeGraphs  # noqa: E402
from loquetier.engine.engine import Engine  # noqa: E402
from loquetier.kernels import fused_triton  # noqa: E402


def replay_ms(graph, n=50) -> float:
    times = []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 64])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--profile-batch", type=int, default=64)
    ap.add_argument("--norm-configs", default="",
                    help="also time the folded variant with these add-RMSNorm launch configs, CHUNKxWARPS,... "
                         "(e.g. 1024x8,512x4,4096x16)")
    ap.add_argument("--model", default="random:llama3-8b")
    ap.add_argument("--device", default="cuda",
                    help="cpu: a smoke test of this script (graphs run eagerly; needs TRITON_INTERPRET=1)")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    eng = Engine(EngineConfig(
        model=args.model, dtype="bfloat16" if cuda else "float32", device=args.device, max_model_len=2048,
        cuda_graphs=False, lora_backend="auto" if cuda else "triton",  # this script captures its own graphs
        cache=CacheConfig(memory_budget_bytes=8 << 30 if cuda else 64 << 20),
        lora=LoraConfig(max_loras=4, max_lora_rank=16),
        scheduler=SchedulerConfig(max_num_batched_tokens=8192, max_num_seqs=max(args.batches))))
    names = []
    for i in range(4):
        eng.add_adapter(f"a{i}", random_adapter(eng, seed=100 + i))
        names.append(f"a{i}")
    rng = np.random.default_rng(0)
    kv = eng.kv
    max_blocks = -(-eng.max_model_len // kv.block_size)
    variants = {"unfolded, bucket-long segments": ("never", None, None),
                "unfolded, slots+2 segments": ("never", 6, None),
                "folded, slots+2 segments": ("always", 6, None)}
    for cfg in filter(None, args.norm_configs.split(",")):
        chunk, warps = (int(x) for x in cfg.split("x"))
        variants[f"folded, add-norm {chunk}x{warps}"] = ("always", 6, (chunk, warps))
    default_norm = (fused_triton.ADD_NORM_CHUNK, fused_triton.ADD_NORM_NUM_WARPS)
    rows = []
    for batch in args.batches:
        adapters = [names[i % 4] for i in range(batch)]
        for ad in adapters:
            eng.add_request(rng.integers(10, eng.args.vocab_size - 10, args.context).tolist(),
                            SamplingParams(max_tokens=64, temperature=0, ignore_eos=True), ad)
        while any(not s.output_token_ids for s in eng.scheduler.running + list(eng.scheduler.waiting)):
            eng.step()
        sched = eng.scheduler.schedule()
        slot_of = {None: -1, **eng.adapters.activate(set(adapters))}
        seqs, arrays = eng.runner.decode_metadata(sched.scheduled, slot_of, kv.block_size)
        base_arrays = arrays[:3] + (np.full_like(arrays[3], -1),) + arrays[4:]
        for label, (fold, max_segments, norm) in variants.items():
            eng.model.set_lora_fold_shrink(fold)
            fused_triton.ADD_NORM_CHUNK, fused_triton.ADD_NORM_NUM_WARPS = norm or default_norm
            graphs = DecodeGraphs(eng.model, kv.scratch_block, kv.block_size, max_blocks, batch, kv.pool.device,
                                  max_segments=max_segments or batch, resolve_ids=eng.runner.resolve_ids)
            graphs.buckets = [batch]
            if not cuda:
                graphs.run_eager(*arrays, with_lora=True)
                continue
            graphs.capture()
            graphs.run(*base_arrays, with_lora=False)
            base = replay_ms(graphs.graphs[(batch, False)][0])
            graphs.run(*arrays, with_lora=True)
            lora = replay_ms(graphs.graphs[(batch, True)][0])
            row = {"batch": batch, "variant": label, "base_ms": base, "lora_ms": lora, "ratio": lora / base}
            rows.append(row)
            print(row, flush=True)
            if batch == args.profile_batch and label in ("unfolded, bucket-long segments", "folded, slots+2 segments"):
                from torch.profiler import ProfilerActivity, profile
                graph = graphs.graphs[(batch, True)][0]
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        graph.replay()
                    torch.cuda.synchronize()
                print(f"--- top kernels, 5 replays, batch {batch}, 4 adapters, {label}")
                print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=22, max_name_column_width=70))
            del graphs
            torch.cuda.synchronize()
        for rid in list(eng.requests):
            eng.abort(rid)
        eng.step()
    print("\nbatch | variant | base ms | 4 adapters ms | ratio")
    for r in rows:
        print(f"{r['batch']} | {r['variant']} | {r['base_ms']:.2f} | {r['lora_ms']:.2f} | {r['ratio']:.3f}")


if __name__ == "__main__":
    main()
