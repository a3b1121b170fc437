"""Sweep the LoRA kernels' tile settings for a decode batch with many distinct adapters (Llama-3-8B
shapes, batch 64 sorted by adapter, ranks cycling 8/16/32/64 in a rank-64 table unless --ranks), the case that
`bench_adapters.py --sections many` times end to end. Per projection it times, as CUDA-graph
replays (GPU time):

- unfolded: shrink + expand (segment path, as the decode graphs run it, and the per-token gather
  path), for every setting of the expand's tile;
- folded: the consumers that add a folded layer's delta (rotary + KV-cache write for q/k/v,
  SiLU-and-mul for gate/up, residual add + RMSNorm for o and down), for every tile setting, against
  the same consumer without a delta.

With `--sections gather-grid`, the per-token path alone over a grid of its expand's tile and warps
and its shrink's K tile and warps.

Each figure comes with the bandwidth it implies from the bytes that must move (the adapters' real
ranks, not the table's). Each setting's output is checked against the default's before it is timed.

    python benchmarks/tune_many_adapters.py --adapters 16,64
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import device_ceilings, graph_replay_us, table, write_json  # noqa: E402

from loquetier.kernels import fused_triton, rotary_triton, smlm_triton  # noqa: E402
from loquetier.models.rotary import RotaryEmbedding  # noqa: E402
from loquetier.kernels.smlm import LoraBatchMeta, LoraDelta  # noqa: E402

RANKS = (8, 16, 32, 64)   # cycled over the slots; the table's rank is the largest (--ranks changes both)
HIDDEN, INTER, KV = 4096, 14336, 1024
PROJECTIONS = {"qkv": (HIDDEN, (HIDDEN, KV, KV)), "o": (HIDDEN, (HIDDEN,)),
               "gate_up": (HIDDEN, (INTER, INTER)), "down": (INTER, (HIDDEN,))}


def sorted_batch(batch: int, num_slots: int, dev):
    """token_slot of a batch sorted by adapter (round-robin assignment), and the segment arrays the
    decode graphs build from it: one segment per run, padded with empty ones to slots + 2."""
    token_slot = sorted(i % num_slots for i in range(batch))
    starts = [t for t in range(batch) if t == 0 or token_slot[t] != token_slot[t - 1]]
    g = num_slots + 2
    seg_cu = [batch] * (g + 1)
    seg_cu[:len(starts)] = starts
    seg_slot = [-1] * g
    seg_slot[:len(starts)] = [token_slot[s] for s in starts]
    i32 = dict(dtype=torch.int32, device=dev)
    return (torch.tensor(token_slot, **i32), torch.tensor(seg_cu, **i32), torch.tensor(seg_slot, **i32),
            sorted(set(token_slot)))


def adapter_tables(num_slots: int, d_in: int, widths: tuple[int, ...], dev, g, rank_cycle=RANKS):
    s, d_out, table_rank = len(widths), sum(widths), max(rank_cycle)
    ranks = [rank_cycle[i % len(rank_cycle)] for i in range(num_slots)]
    a = torch.randn(num_slots, s, table_rank, d_in, device=dev, generator=g) / d_in ** 0.5
    b = torch.randn(num_slots, d_out, table_rank, device=dev, generator=g) / table_rank ** 0.5
    for slot, r in enumerate(ranks):   # zero padding past each slot's rank, as the adapter manager writes
        a[slot, :, r:] = 0
        b[slot, :, r:] = 0
    scaling = torch.rand(num_slots, s, device=dev, generator=g) + 0.5
    return (a.reshape(num_slots, s * table_rank, d_in).bfloat16(), b.bfloat16(), scaling,
            torch.tensor(ranks, dtype=torch.int32, device=dev), ranks)


def rotary_consumers(batch: int, qkv, delta, dev, g):
    """The folded qkv layer's consumer, rotary + KV-cache write with the delta added (q, k, v
    concatenated, for the checks), and the same kernel of a base layer (q, k, v already apart)."""
    heads, kv_heads, head_dim = HIDDEN // 128, KV // 128, 128
    tables = RotaryEmbedding(head_dim, 2048, 500000.0, None, torch.bfloat16, dev)
    positions = torch.randint(0, 2048, (batch,), device=dev, generator=g)
    k_cache = torch.zeros(batch, 16, kv_heads, head_dim, dtype=torch.bfloat16, device=dev)
    v_cache = torch.zeros_like(k_cache)
    slot_mapping = torch.randperm(batch * 16, device=dev, generator=g)[:batch]

    def fused():
        q, k, v = rotary_triton.rotary_lora_forward_and_cache(qkv, delta, heads, kv_heads, tables.cos, tables.sin,
                                                              positions, k_cache, v_cache, slot_mapping)
        return torch.cat([q.flatten(), k.flatten(), v.flatten()])
    q, k, v = qkv.split([HIDDEN, KV, KV], dim=1)
    q, k, v = q.view(batch, heads, head_dim), k.view(batch, kv_heads, head_dim), v.view(batch, kv_heads, head_dim)
    return fused, lambda: rotary_triton.rotary_forward_and_cache(q, k, v, tables.cos, tables.sin, positions, k_cache,
                                                                  v_cache, slot_mapping)


def gpu_us(fn) -> float:
    return graph_replay_us(fn, rep_ms=40)


MODULES = {"fused_triton": fused_triton, "rotary_triton": rotary_triton, "smlm_triton": smlm_triton}


def sweep(label, fn, settings, module, out_of, rows, common, bytes_moved, bw):
    """Time `fn` under each setting (constants of `module`, or of another kernel module when named
    "module.NAME"), checking each output against the first's."""
    def target(name):
        owner, _, attr = name.rpartition(".")
        return (MODULES[owner] if owner else module), attr
    defaults = {k: getattr(*target(k)) for setting in settings for k in setting}
    ref = None
    for setting in settings:
        for k, v in setting.items():
            setattr(*target(k), v)
        try:
            out = out_of()
            if ref is None:
                ref = out.float().clone()
            else:
                torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
            us = gpu_us(fn)
        except Exception as e:   # a setting that does not compile or run is reported, not fatal
            print(f"{label} {setting}: {type(e).__name__}: {str(e)[:160]}", flush=True)
            continue
        finally:
            for k, v in defaults.items():
                setattr(*target(k), v)
        row = {**common, "kernel": label, "setting": " ".join(f"{k}={v}" for k, v in setting.items()),
               "us": us, "GBps": bytes_moved / us / 1e3, "bw_share": bytes_moved / us / 1e3 / bw}
        rows.append(row)
        print(row, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--adapters", type=lambda s: [int(x) for x in s.split(",")], default=[4, 16, 64])
    ap.add_argument("--sections", default="unfolded,folded")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ranks", type=lambda s: tuple(int(x) for x in s.split(",")), default=RANKS,
                    help="adapter ranks, cycled over the slots (e.g. 16: the engine benchmarks' 4 adapters)")
    ap.add_argument("--projections", default=",".join(PROJECTIONS))
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of this script (needs TRITON_INTERPRET=1)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    bw = device_ceilings(args.device)["bandwidth_GBps"]
    g = torch.Generator(device=dev).manual_seed(0)
    rows: list[dict] = []
    # batches of <= SHORT_BATCH_TOKENS take the SHORT tiles; the first setting of each is the default
    # (SiLU-and-mul's for slot tables of rank above 16; rank 16 or less runs 4 warps)
    expand_settings = [{"EXPAND_SHORT_BLOCK_M": m, "EXPAND_SHORT_BLOCK_N": n, "EXPAND_NUM_WARPS": w}
                       for m, n, w in ((16, 256, 4), (32, 128, 4), (16, 128, 4), (32, 256, 4), (16, 256, 8))]
    # the gather expand's warps: one setting below GATHER_MANY_TOKENS tokens, another from there
    ew_key = ("EXPAND_GATHER_NUM_WARPS_MANY_TOKENS" if args.batch >= smlm_triton.GATHER_MANY_TOKENS
              else "EXPAND_GATHER_NUM_WARPS")
    ew, ew_other = getattr(smlm_triton, ew_key), 4 if getattr(smlm_triton, ew_key) != 4 else 2
    gather_settings = [{"EXPAND_GATHER_BLOCK_N": n, "SHRINK_GATHER_BLOCK_N_MAX": k, "SHRINK_GATHER_BLOCK_K_UNSPLIT": bk,
                        "SHRINK_GATHER_NUM_WARPS": ws, ew_key: we}
                       for n, k, bk, ws, we in ((128, 16, 1024, 4, ew), (128, 16, 512, 4, ew), (128, 32, 1024, 4, ew),
                                                (128, 16, 1024, 2, ew), (128, 16, 2048, 4, ew), (64, 16, 1024, 4, ew),
                                                (128, 32, 1024, 2, ew), (128, 16, 1024, 4, ew_other))]
    gather_settings.append({"SLOT_RANKS_IN_REGISTERS_MAX": 0})   # each token's slot rank read once its slot is known
    # --sections gather-grid: the per-token path's expand tile x warps (shrink at its default), then the
    # shrink's K tile x warps (expand at its default); the first setting of each is the default
    gather_expand_grid = [{"EXPAND_GATHER_BLOCK_N": n, ew_key: w}
                          for n, w in itertools.product((128, 64, 256), dict.fromkeys((ew, 4, 2, 1)))]
    gather_shrink_grid = [{"SHRINK_GATHER_BLOCK_K_UNSPLIT": k, "SHRINK_GATHER_NUM_WARPS": w}
                          for k, w in ((1024, 4), (512, 2), (1024, 2), (512, 4), (2048, 4), (2048, 8), (1024, 8))]
    shrink_settings = [{"SHRINK_SHORT_BLOCK_M": m, "SHRINK_SHORT_BLOCK_N_MAX": n}
                       for m, n in ((16, 64), (64, 32), (16, 128), (32, 64))]
    # how the folded consumers use each slot's rank (the first: the default): tables of rank >= 32 mask
    # B by it, the rank table read whole with the tile's slots; the same with each row's entry read
    # once the slot ids are in; and every table masking by it (rank 16 too)
    rank_settings = [{"smlm_triton.SLOT_RANKS_IN_REGISTERS_MAX": m, "fused_triton.SLOT_RANK_MASK_MIN_TABLE_RANK": t}
                     for m, t in ((1024, 32), (0, 32), (1024, 0))]
    silu_settings = [{"SILU_LORA_TILE_N": n, "SILU_LORA_NUM_WARPS": w, "SILU_LORA_NUM_WARPS_SMALL_RANK": w}
                     for n, w in ((128, 8), (64, 4), (32, 4), (128, 4), (256, 8))] + rank_settings[1:]
    norm_settings = [{"ADD_NORM_TILE_N": n} for n in (128, 64, 256)] + rank_settings[1:]
    rotary_settings = [{"LORA_TILE_M": m, "LORA_NUM_WARPS": w}
                       for m, w in ((16, 4), (16, 2), (16, 1), (16, 8), (32, 4), (32, 8))]
    rotary_settings += [{"LORA_EARLY_LOADS": e, **ranks} for e in (0, 1, 2) for ranks in rank_settings][1:]
    for num_slots in args.adapters:
        token_slot, seg_cu, seg_slot, present = sorted_batch(args.batch, num_slots, dev)
        for name in args.projections.split(","):
            d_in, widths = PROJECTIONS[name]
            d_out = sum(widths)
            offsets = tuple(itertools.accumulate(widths, initial=0))
            a, b, scaling, slot_rank, ranks = adapter_tables(num_slots, d_in, widths, dev, g, args.ranks)
            x = torch.randn(args.batch, d_in, device=dev, generator=g).bfloat16()
            y = torch.randn(args.batch, d_out, device=dev, generator=g).bfloat16()
            live = sum(ranks[s] for s in present)   # the ranks present in the batch
            a_bytes, b_bytes = live * len(widths) * d_in * 2, live * d_out * 2
            act_bytes = args.batch * (d_in + 2 * d_out) * 2
            common = {"adapters": num_slots, "projection": name}

            def unfolded(max_seg_len):
                def run():
                    v = smlm_triton.shrink(x, a, seg_cu, seg_slot, token_slot, max_seg_len, slot_rank=slot_rank,
                                           table_rank=max(args.ranks))
                    return smlm_triton.expand_(y, v, b, scaling, offsets, seg_cu, seg_slot, token_slot, max_seg_len,
                                               slot_rank=slot_rank)
                return run

            y_init = y.clone()

            def result(fn):   # the expand adds into y in place: each check starts from the same y
                def out():
                    y.copy_(y_init)
                    fn()
                    return y.clone()
                return out
            total = a_bytes + b_bytes + act_bytes
            seg, gat = unfolded(args.batch), unfolded(1)
            if "unfolded" in args.sections.split(","):
                sweep("unfolded segment: expand tile", seg, expand_settings, smlm_triton, result(seg), rows, common,
                      total, bw)
                sweep("unfolded segment: shrink tile", seg, shrink_settings, smlm_triton, result(seg), rows, common,
                      total, bw)
                sweep("unfolded gather", gat, gather_settings, smlm_triton, result(gat), rows, common, total, bw)
            if "gather-grid" in args.sections.split(","):
                sweep("gather grid: expand", gat, gather_expand_grid, smlm_triton, result(gat), rows, common, total, bw)
                sweep("gather grid: shrink", gat, gather_shrink_grid, smlm_triton, result(gat), rows, common, total, bw)
            if "folded" not in args.sections.split(","):
                continue
            # folded: every slot's shrink comes out of the base GEMM; the consumer adds each row's delta
            v = (x @ a.reshape(-1, d_in).t()).contiguous()
            meta = LoraBatchMeta(seg_cu=seg_cu, seg_slot=seg_slot, token_slot=token_slot, seg_cu_host=[],
                                 seg_slot_host=[0], max_seg_len=args.batch)
            delta = LoraDelta(v, b, scaling, offsets, meta, slot_rank=slot_rank)
            consumer_bytes = b_bytes + args.batch * live * len(widths) * 2 + act_bytes
            if name == "qkv":
                fn, fn_base = rotary_consumers(args.batch, y, delta, dev, g)
                sweep("folded: rotary + cache + delta", fn, rotary_settings, rotary_triton, fn, rows, common,
                      consumer_bytes, bw)
                base = {**common, "kernel": "rotary + cache, no delta", "setting": "", "us": gpu_us(fn_base)}
                rows.append(base)
                print(base, flush=True)
            elif name == "gate_up":
                fn = lambda: fused_triton.silu_and_mul_lora(y, delta)  # noqa: E731
                sweep("folded: SiLU-and-mul + delta", fn, silu_settings, fused_triton, fn, rows, common,
                      consumer_bytes, bw)
                base = {**common, "kernel": "SiLU-and-mul, no delta", "setting": "",
                        "us": gpu_us(lambda: fused_triton.silu_and_mul(y))}
                rows.append(base)
                print(base, flush=True)
            elif name in ("o", "down"):
                res = torch.randn_like(y)
                w = torch.rand(d_out, device=dev, generator=g).bfloat16() + 0.5
                fn = lambda: fused_triton.add_rms_norm(y, delta, res, w, 1e-5)[0]  # noqa: E731
                sweep("folded: add + RMSNorm + delta", fn, norm_settings, fused_triton, fn, rows, common,
                      consumer_bytes, bw)
                base = {**common, "kernel": "add + RMSNorm, no delta", "setting": "",
                        "us": gpu_us(lambda: fused_triton.add_rms_norm(y, None, res, w, 1e-5))}
                rows.append(base)
                print(base, flush=True)
    print(f"\ncopy bandwidth {bw:.0f} GB/s; bytes: the adapters' real ranks, activations in and out")
    print(table(rows, ["adapters", "projection", "kernel", "setting", "us", "bw_share"]))
    write_json(args.out, {"bandwidth_GBps": bw, "rows": rows})


if __name__ == "__main__":
    main()
