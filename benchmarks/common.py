"""Shared pieces of the GPU benchmarks: device ceilings, random adapters, synthetic requests."""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch

SHAREGPT = dict(prompt_mean=161, output_mean=338, cap=1024)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats=1):
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def start_decoding(engine, settle: int = 3) -> None:
    """Step until every queued request has its first token, then `settle` steps more, so the next
    steps are decode-only."""
    while any(not s.output_token_ids for s in list(engine.scheduler.running) + list(engine.scheduler.waiting)):
        engine.step()
    for _ in range(settle):
        engine.step()


def steady_step_seconds(engine, steps: int, device) -> float:
    """Wall time of `steps` consecutive `Engine.step()` calls over their number: a device sync
    before and after, none between, so asynchronous scheduling can overlap host and GPU."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(device)
    return (time.perf_counter() - t0) / steps


def device_ceilings(device) -> dict:
    """Measured in this run: copy bandwidth (read + write bytes) and bf16 matmul rate."""
    if torch.device(device).type != "cuda":
        return {"bandwidth_GBps": float("nan"), "bf16_TFLOPs": float("nan")}
    from triton.testing import do_bench
    n = 1 << 30  # 2 GiB of bf16 each way
    src = torch.randn(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    bw = 2 * src.numel() * 2 / (ms * 1e-3) / 1e9
    del src, dst
    m = 8192
    a = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    b = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    tflops = 2 * m ** 3 / (ms * 1e-3) / 1e12
    return {"bandwidth_GBps": bw, "bf16_TFLOPs": tflops}


def random_adapter(engine, seed: int, r: int = 16, alpha: float = 32):
    """Rank-r adapter on all seven projections with non-zero A and B."""
    from loquetier.lora.adapter import LoraSpec, new_adapter
    w = new_adapter(LoraSpec(r=r, lora_alpha=alpha, target_modules="all-linear"), engine.args,
                    engine.config.lora.max_lora_rank, seed)
    g = torch.Generator().manual_seed(seed)
    for a, b in w.modules.values():
        b.normal_(0, 0.01, generator=g)
    return w


def lognormal_lengths(n: int, mean: float, cap: int, rng: np.random.Generator, sigma: float = 1.0) -> list[int]:
    mu = math.log(mean) - sigma ** 2 / 2
    return [int(min(cap, max(1, round(x)))) for x in rng.lognormal(mu, sigma, n)]



def graph_replay_us(fn, rep_ms: int = 40) -> float:
    """Median GPU time of `fn` in microseconds, replayed from a CUDA graph (launch costs out). On a
    machine without CUDA (a smoke test of the calling script), one call's wall time instead."""
    if not torch.cuda.is_available():
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e6
    from triton.testing import do_bench_cudagraph
    return do_bench_cudagraph(fn, rep=rep_ms, return_mode="median") * 1e3

def write_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=1, default=str))


def table(rows: list[dict], cols: list[str]) -> str:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    line = " | ".join(c.ljust(w) for c, w in zip(cols, widths))
    out = [line, "-+-".join("-" * w for w in widths)]
    for r in rows:
        out.append(" | ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(cols, widths)))
    return "\n".join(out)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hf_base_model(model: str, device: str):
    """HF transformers' Llama with the shape of a `random:PRESET` model, random weights on `device`
    (bf16 on CUDA): the PEFT side of the benchmarks."""
    import transformers as tf

    from loquetier.models.loader import PRESETS
    p = PRESETS[model.split(":", 1)[1]]
    cfg = tf.LlamaConfig(vocab_size=p["vocab_size"], hidden_size=p["hidden_size"], intermediate_size=p["intermediate_size"],
                         num_hidden_layers=p["num_layers"], num_attention_heads=p["num_heads"],
                         num_key_value_heads=p["num_kv_heads"], max_position_embeddings=4096, rope_theta=500000.0)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    with torch.device(device):
        return tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
