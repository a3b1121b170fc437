"""Where a decode step's time goes: CUDA-graph replay times of the base and LoRA decode forwards
(Llama-3-8B shape, random bf16, context 512) for each SMLM layout, then the top kernels of one
replay. Variants: the shrink folded into the base GEMM or not; segment arrays as long as the
bucket (the old layout) or capped at slots + 2; the base add + RMSNorm as two kernels like the
LoRA one; the q/k/v delta added by its own expand rather than inside the rotary kernel, or inside
it at every batch (by default batches of one-token segments keep the expand); the base graph
running the folded GEMMs too (their slot columns unused: whether a folded GEMM costs more than the
base one inside the graph because of its shape or because of the LoRA kernels around it); any
kernel-module constants named by --constants. Each variant's base and LoRA graphs are replayed in turn.

    python benchmarks/profile_decode.py --batches 1,64
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import random_adapter, start_decoding, steady_step_seconds  # noqa: E402

from loquetier import SamplingParams  # noqa: E402
from loquetier.config import CacheConfig, EngineConfig, LoraConfig, SchedulerConfig  # noqa: E402
from loquetier.engine.cuda_graphs import DecodeGraphs  # noqa: E402
from loquetier.engine.engine import Engine  # noqa: E402
from loquetier.kernels import fused_triton, rotary, rotary_triton, smlm_triton  # noqa: E402
from loquetier.lora.layer import VirtualLoraLinear  # noqa: E402

_forward_deferred = VirtualLoraLinear.forward_deferred
BASE_FOLDED = "folded, the base graph runs the folded GEMMs too"   # the variant that runs the one below


def _folded_without_adapters(self, x, meta):
    """VirtualLoraLinear.forward_deferred, but a forward without adapters also runs the folded GEMM
    (base rows and slot rows) and returns its base columns, a strided view as in a LoRA forward."""
    if self.fold_shrink and (meta is None or not meta.any_adapter) and not torch.is_grad_enabled():
        return F.linear(x, self.weight_aug, self.bias_aug)[:, :self.base.out_features], None
    return _forward_deferred(self, x, meta)


def paired_replay_ms(graphs, n=50) -> list[float]:
    """Median replay time of each graph, the graphs replayed in turn (A, B, A, B, ...) so that the
    GPU's clock and temperature drift lands on all of them alike."""
    times = [[] for _ in graphs]
    for _ in range(n):
        for graph, out in zip(graphs, times):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
    return [statistics.median(t) for t in times]


def engine_steps(eng, names, batch: int, context: int, steps: int, rng) -> list[dict]:
    """Steady decode through `Engine.step()` (asynchronous scheduling, the engine's own graphs) with
    0 and 4 adapters, each replay bracketed by CUDA events: how long a step takes, how much of it is
    the metadata copy + replay, and how long the GPU spends between replays (sampling, the token
    copies, and any time it waits for the host)."""
    graphs = eng.runner.graphs
    marks = []
    real_run = graphs.run

    def timed_run(*a, **k):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = real_run(*a, **k)
        end.record()
        marks.append((start, end))
        return out

    graphs.run = timed_run
    out = []
    try:
        for n_ad in (0, 4):
            for i in range(batch):
                eng.add_request(rng.integers(10, eng.args.vocab_size - 10, context).tolist(),
                                SamplingParams(max_tokens=steps + 16, temperature=0, ignore_eos=True),
                                None if n_ad == 0 else names[i % n_ad])
            start_decoding(eng)
            marks.clear()
            began = time.strftime("%H:%M:%S", time.gmtime())   # to line windows up with GPU clock logs
            wall = steady_step_seconds(eng, steps, "cuda")
            replay = [a.elapsed_time(b) for a, b in marks]
            between = [b0.elapsed_time(a1) for (_, b0), (a1, _) in zip(marks, marks[1:])]
            row = {"section": "engine-steps", "batch": batch, "adapters": n_ad, "steps": steps,
                   "replays": len(marks), "step_ms": wall * 1e3, "replay_ms": statistics.median(replay),
                   "between_replays_ms": statistics.median(between), "utc": [began, time.strftime("%H:%M:%S", time.gmtime())]}
            out.append(row)
            print(row, flush=True)
            for rid in list(eng.requests):
                eng.abort(rid)
            while eng.has_unfinished():
                eng.step()
    finally:
        graphs.run = real_run
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 64])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--profile-batch", type=int, default=64)
    ap.add_argument("--norm-configs", default="",
                    help="also time the folded variant with these launch configs of the base add + RMSNorm, CHUNKxWARPS,... "
                         "(e.g. 1024x8,512x4,4096x16)")
    ap.add_argument("--tile-configs", default="",
                    help="also time the row-tile kernels with these tile sizes, MxNORM_NxSILU_N[xSILU_WARPS],... "
                         "(e.g. 16x256x128,16x128x64x4)")
    ap.add_argument("--constants", default="",
                    help="also time the folded variant with these kernel-module constants, variants separated by ';' "
                         "(e.g. 'ADD_NORM_TILE_N=256;rotary_triton.LORA_NUM_WARPS=2,rotary_triton.LORA_TILE_M=32')")
    ap.add_argument("--variants", default="", help="time only the variants whose label this regex matches")
    ap.add_argument("--kernel-tables", default=r"^folded \(the default\)",
                    help="print the top kernels of the base and LoRA graphs of the variants whose label this regex matches")
    ap.add_argument("--engine-batches", type=lambda s: [int(x) for x in s.split(",") if x], default=[64],
                    help="then time Engine.step() at these batches with the engine's own graphs ('' for none)")
    ap.add_argument("--engine-steps", type=int, default=40)
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
        scheduler=SchedulerConfig(max_num_batched_tokens=8192, max_num_seqs=max(args.batches + args.engine_batches))))
    names = []
    for i in range(4):
        eng.add_adapter(f"a{i}", random_adapter(eng, seed=100 + i))
        names.append(f"a{i}")
    rng = np.random.default_rng(0)
    kv = eng.kv
    max_blocks = -(-eng.max_model_len // kv.block_size)
    # label -> (fold_shrink, max segments, kernel-module constants to set); constants not named keep
    # their defaults
    variants = {"unfolded, bucket-long segments": ("never", None, {}),
                "unfolded, slots+2 segments": ("never", 6, {}),
                "folded (the default), slots+2 segments": ("always", 6, {}),
                "folded, base norm split too": ("always", 6, {"ADD_NORM_SPLIT_BASE": True}),
                "folded, q/k/v expand apart from the rotary kernel": ("always", 6, {"rotary.QKV_DELTA_FUSE_MIN_SEG_LEN": 1 << 30}),
                "folded, q/k/v delta in the rotary kernel at every batch": ("always", 6, {"rotary.QKV_DELTA_FUSE_MIN_SEG_LEN": 0}),
                BASE_FOLDED: ("always", 6, {})}
    for cfg in filter(None, args.norm_configs.split(",")):
        chunk, warps = (int(x) for x in cfg.split("x"))
        variants[f"folded, base add-norm {chunk}x{warps}"] = ("always", 6, {"ADD_NORM_CHUNK": chunk,
                                                                             "ADD_NORM_NUM_WARPS": warps})
    for cfg in filter(None, args.tile_configs.split(",")):
        m, n_norm, n_silu, *warps = (int(x) for x in cfg.split("x"))
        variants[f"folded, row tiles {cfg}"] = ("always", 6, {
            "LORA_TILE_M": m, "ADD_NORM_TILE_N": n_norm, "SILU_LORA_TILE_N": n_silu,
            **({"SILU_LORA_NUM_WARPS": warps[0], "SILU_LORA_NUM_WARPS_SMALL_RANK": warps[0]} if warps else {})})
    for cfg in filter(None, args.constants.split(";")):
        consts = {name: int(value) for name, value in (c.split("=") for c in cfg.split(","))}
        variants["folded, " + " ".join(f"{k}={v}" for k, v in consts.items())] = ("always", 6, consts)
    if args.variants:
        variants = {label: v for label, v in variants.items() if re.search(args.variants, label)}
    modules = {"fused_triton": fused_triton, "smlm_triton": smlm_triton, "rotary": rotary,
               "rotary_triton": rotary_triton}

    def target(name):   # "NAME" is a fused_triton constant, "module.NAME" one of that module
        module, _, attr = name.rpartition(".")
        return modules[module or "fused_triton"], attr

    defaults = {name: getattr(*target(name)) for _, _, consts in variants.values() for name in consts}
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
        for label, (fold, max_segments, consts) in variants.items():
            eng.model.set_lora_fold_shrink(fold)
            for name, value in {**defaults, **consts}.items():
                setattr(*target(name), value)
            VirtualLoraLinear.forward_deferred = _folded_without_adapters if label == BASE_FOLDED else _forward_deferred
            graphs = DecodeGraphs(eng.model, kv.scratch_block, kv.block_size, max_blocks, batch, kv.pool.device,
                                  max_segments=max_segments or batch, resolve_ids=eng.runner.resolve_ids)
            graphs.buckets = [batch]
            if not cuda:
                graphs.run_eager(*base_arrays, with_lora=False)
                graphs.run_eager(*arrays, with_lora=True)
                VirtualLoraLinear.forward_deferred = _forward_deferred
                continue
            graphs.capture()
            graphs.run(*base_arrays, with_lora=False)   # copies each graph's inputs into its buffers
            graphs.run(*arrays, with_lora=True)
            base, lora = paired_replay_ms([graphs.graphs[(batch, False)][0], graphs.graphs[(batch, True)][0]])
            row = {"batch": batch, "variant": label, "base_ms": base, "lora_ms": lora, "ratio": lora / base}
            rows.append(row)
            print(row, flush=True)
            if batch == args.profile_batch and re.search(args.kernel_tables, label):
                from torch.profiler import ProfilerActivity, profile
                for with_lora in (False, True):
                    graph = graphs.graphs[(batch, with_lora)][0]
                    with profile(activities=[ProfilerActivity.CUDA]) as prof:
                        for _ in range(5):
                            graph.replay()
                        torch.cuda.synchronize()
                    print(f"--- top kernels, 5 replays, batch {batch}, {'4 adapters' if with_lora else 'base'}, {label}")
                    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=22,
                                                    max_name_column_width=70))
            del graphs
            VirtualLoraLinear.forward_deferred = _forward_deferred
            torch.cuda.synchronize()
        for rid in list(eng.requests):
            eng.abort(rid)
        eng.step()
    if cuda and args.engine_batches:
        eng.model.set_lora_fold_shrink("auto")
        for name, value in defaults.items():
            setattr(*target(name), value)
        eng.runner.enable_graphs(eng.kv, eng.max_model_len, max(args.engine_batches), eng.config.lora.max_loras)
        for batch in args.engine_batches:
            rows += engine_steps(eng, names, batch, args.context, args.engine_steps, rng)
    print("\nbatch | variant | base ms | 4 adapters ms | ratio")
    for r in rows:
        if "variant" in r:
            print(f"{r['batch']} | {r['variant']} | {r['base_ms']:.2f} | {r['lora_ms']:.2f} | {r['ratio']:.3f}")
    print("\nbatch | adapters | Engine.step ms | copy + replay ms | GPU between replays ms")
    for r in rows:
        if r.get("section") == "engine-steps":
            print(f"{r['batch']} | {r['adapters']} | {r['step_ms']:.2f} | {r['replay_ms']:.2f} | {r['between_replays_ms']:.2f}")


if __name__ == "__main__":
    main()
