"""Host time of a decode step on the decode-graph path, with the replay itself stubbed out. CPU only.

On the GPU a decode step replays a captured graph, and everything else in `Engine.step()` is host
work: scheduling, the step's metadata, sampling, settling the previous step's tokens, the step
observers (cost model, stats). With asynchronous scheduling that work overlaps the previous
replay, so it costs GPU time only where it is longer than a replay (about 6 ms at batch 64 on an
H200), or where one step's host work spikes. This measures it apart from the model: the engine runs
the tiny model on the CPU, and the decode graph is replaced by an object that builds the same host
metadata and returns fixed logits.

    python benchmarks/bench_host_decode.py --batch 64 --adapters 4
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import random_adapter  # noqa: E402

from loquetier import LLM, SamplingParams  # noqa: E402
from loquetier.engine.cuda_graphs import DecodeGraphs  # noqa: E402


class StubbedDecodeGraphs(DecodeGraphs):
    """The decode graphs' host side (bucket choice, flat metadata) without a device replay."""

    def __init__(self, engine, max_batch: int):
        kv = engine.kv
        super().__init__(None, kv.scratch_block, kv.block_size, -(-engine.max_model_len // kv.block_size), max_batch,
                         torch.device("cpu"), max_segments=engine.config.lora.max_loras + 2)
        self.logits = torch.randn(max(self.buckets), engine.args.vocab_size)

    def run(self, ids, pos, slot_map, token_slot, ctx_lens, tables, with_lora):
        n = len(ids)
        host = self.host_metadata(ids, pos, slot_map, token_slot, ctx_lens, tables, self.bucket_for(n))
        torch.from_numpy(host)   # the replay copies this array to the device
        return self.logits[:n]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=4, help="adapters round-robin over the batch (0: base only)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--profile", action="store_true", help="also print the top functions under cProfile")
    args = ap.parse_args()
    llm = LLM("random:tiny", device="cpu", max_loras=max(1, args.adapters), max_lora_rank=16, max_model_len=2048,
              num_kv_blocks=4096, max_num_batched_tokens=8192)
    eng = llm.engine
    names = [f"a{i}" for i in range(args.adapters)]
    for i, name in enumerate(names):
        eng.add_adapter(name, random_adapter(eng, seed=i))
    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=1900, temperature=0, ignore_eos=True)
    for i in range(args.batch):
        eng.add_request(rng.integers(10, 200, 64).tolist(), params, names[i % len(names)] if names else None)
    while eng.scheduler.waiting or any(not s.output_token_ids for s in eng.scheduler.running):
        eng.step()   # prefills, eagerly
    eng.runner.graphs = StubbedDecodeGraphs(eng, args.batch)
    for _ in range(20):
        eng.step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t0)
    times = np.array(times) * 1e3
    print(f"batch {args.batch}, {args.adapters} adapters: host time per decode step median {np.median(times):.3f} ms, "
          f"mean {times.mean():.3f} ms, p99 {np.percentile(times, 99):.3f} ms, max {times.max():.3f} ms")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.steps):
            eng.step()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
