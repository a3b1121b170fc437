"""What structured outputs and logit_bias cost per decode step.

For each batch size, the same decode steps run four ways: plain greedy rows (asynchronous
scheduling, the default), plain rows with asynchronous scheduling off, rows with a 16-token
`logit_bias` each, and rows under a JSON schema (which run synchronously: each row's next mask
needs its previous token on the host). `step_ms` is the wall time of `--decode-steps` consecutive
`Engine.step()` calls (a device sync before and after) over their number; `ms_per_token` divides
it by the batch. Host work of the grammar rows: `mask_ms` (mean) and `mask_ms_p90`, filling one
step's packed bitmask for the whole batch (llguidance; it overlaps the step's forward on the GPU),
and `accept_us`, advancing one matcher over one token (median).

The schema is an array of at least 64 records, so no request can finish inside the timed steps.
The grammar needs a tokenizer: `--tokenizer DIR` (a Hugging Face tokenizer), else the package's
tiny tokenizer when the model's vocabulary is its size (`random:tiny`), else a byte-level BPE
trained here to the model's vocabulary size (a mask's cost follows the vocabulary's size and
token strings, not where they came from).

    python benchmarks/bench_structured.py                                  # GPU: Llama-3-8B shape, bf16
    python benchmarks/bench_structured.py --model random:tiny --device cpu # CPU smoke test
"""

from __future__ import annotations

import argparse
import random
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import start_decoding, steady_step_seconds, table, write_json  # noqa: E402

from loquetier import SamplingParams, StructuredOutputsParams  # noqa: E402
from loquetier.config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from loquetier.engine.engine import Engine  # noqa: E402
from loquetier.engine.structured import Grammar  # noqa: E402
from loquetier.models.config import ModelArgs  # noqa: E402
from loquetier.models.loader import preset_args  # noqa: E402

RECORDS_SCHEMA = {
    "type": "array", "minItems": 64,
    "items": {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags", "active"],
              "properties": {"name": {"type": "string", "maxLength": 16},
                             "age": {"type": "integer", "minimum": 0, "maximum": 120},
                             "tags": {"type": "array", "maxItems": 3, "items": {"enum": ["red", "green", "blue"]}},
                             "active": {"type": "boolean"}}}}


def synthetic_tokenizer(vocab_size: int, out_dir: Path):
    """A byte-level BPE with `vocab_size` tokens, trained on generated words and JSON (seconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    rng = random.Random(0)
    alphabet = string.ascii_letters + string.digits + "_-"
    words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(2, 12))) for _ in range(vocab_size + 20000)]

    def lines():
        for i in range(0, len(words), 10):
            yield " ".join(words[i:i + 10])
            yield '{"' + words[i] + '": ' + str(i) + ', "' + words[i + 1] + '": [true, null]}'

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines(), trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, special_tokens=["<|eos|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(out_dir / "tokenizer.json"))
    return PreTrainedTokenizerFast(tokenizer_file=str(out_dir / "tokenizer.json"), eos_token="<|eos|>")


def load_tokenizer(args, vocab_size: int, tmp: Path):
    from transformers import AutoTokenizer

    from loquetier.tiny import VOCAB_SIZE, build_tokenizer
    if args.tokenizer:
        return AutoTokenizer.from_pretrained(args.tokenizer)
    if vocab_size == VOCAB_SIZE:
        build_tokenizer(tmp)
        return AutoTokenizer.from_pretrained(tmp)
    return synthetic_tokenizer(vocab_size, tmp)


class TimedExecutor:
    """llguidance's executor, timing each batch mask fill."""

    def __init__(self):
        import llguidance
        self.inner = llguidance.LLExecutor()
        self.times: list[float] = []

    def unsafe_compute_mask_ptr(self, *args):
        t0 = time.perf_counter()
        self.inner.unsafe_compute_mask_ptr(*args)
        self.times.append(time.perf_counter() - t0)


def timed_accept(times: list[float]):
    accept = Grammar.accept

    def wrapper(self, token):
        t0 = time.perf_counter()
        done = accept(self, token)
        times.append(time.perf_counter() - t0)
        return done
    return wrapper


def run_mode(args, eng, batch: int, params: SamplingParams, asynchronous: bool) -> float:
    """Steady-state decode step time (seconds) of `batch` rows with `params`."""
    eng.config.async_scheduling = asynchronous
    rng = np.random.default_rng(0)
    for _ in range(batch):
        eng.add_request(rng.integers(10, eng.args.vocab_size - 10, args.context).tolist(), params)
    start_decoding(eng)
    rows = []
    eng.step_observers.append(lambda info: rows.append(info["num_decode_tokens"]))
    step = steady_step_seconds(eng, args.decode_steps, args.device)
    eng.step_observers.pop()
    assert all(r == batch for r in rows), f"a timed step had {min(rows)} rows, not {batch}"
    for rid in list(eng.requests):
        eng.abort(rid)
    while eng.has_unfinished():
        eng.step()
    eng.config.async_scheduling = True
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:llama3-8b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokenizer", default=None, help="a Hugging Face tokenizer directory (default: see above)")
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="default: 1,16,64 on the GPU, 1,8 on the CPU")
    ap.add_argument("--context", type=int, default=None, help="prompt tokens (default: 512 GPU, 16 CPU)")
    ap.add_argument("--decode-steps", type=int, default=None, help="timed steps (default: 32 GPU, 8 CPU)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cuda = args.device == "cuda"
    args.batches = args.batches or ([1, 16, 64] if cuda else [1, 8])
    args.context = args.context or (512 if cuda else 16)
    args.decode_steps = args.decode_steps or (32 if cuda else 8)
    with tempfile.TemporaryDirectory() as tmp:
        model_args = preset_args(args.model) if args.model.startswith("random:") else ModelArgs.from_dir(args.model)
        vocab = model_args.vocab_size
        t0 = time.perf_counter()
        tokenizer = load_tokenizer(args, vocab, Path(tmp))
        print(f"tokenizer: {len(tokenizer)} tokens ({time.perf_counter() - t0:.1f} s)", flush=True)
        eng = Engine(EngineConfig(
            model=args.model, dtype="bfloat16" if cuda else "float32", device=args.device, max_model_len=2048,
            cache=CacheConfig(memory_budget_bytes=(16 << 30) if cuda else (64 << 20)),
            scheduler=SchedulerConfig(max_num_batched_tokens=8192, max_num_seqs=max(args.batches))), tokenizer)
        t0 = time.perf_counter()
        grammar = StructuredOutputsParams(json=RECORDS_SCHEMA)
        eng.grammars.compile(grammar)
        print(f"grammar vocabulary and schema compiled in {time.perf_counter() - t0:.2f} s", flush=True)
    executor = TimedExecutor()
    eng.runner.sampler.bitmask.executor = executor
    accept_times: list[float] = []
    Grammar.accept = timed_accept(accept_times)
    max_tokens = args.decode_steps + 16
    rng = np.random.default_rng(1)
    bias = {int(t): float(b) for t, b in zip(rng.choice(vocab, 16, replace=False), rng.uniform(-5, 5, 16))}
    modes = [("plain", SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True), True),
             ("plain, sync", SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True), False),
             ("logit_bias", SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logit_bias=bias),
              True),
             ("json_schema", SamplingParams(max_tokens=max_tokens, temperature=0, structured_outputs=grammar), True)]
    for _, params, asynchronous in modes:   # first-use costs (kernels, graphs, allocator) outside the timing
        run_mode(args, eng, max(args.batches), params, asynchronous)
    results = []
    for batch in args.batches:
        for name, params, asynchronous in modes:
            executor.times.clear()
            accept_times.clear()
            step = run_mode(args, eng, batch, params, asynchronous)
            row = {"batch": batch, "mode": name, "step_ms": step * 1e3, "ms_per_token": step * 1e3 / batch}
            if executor.times:
                row["mask_ms"] = statistics.mean(executor.times) * 1e3
                row["mask_ms_p90"] = float(np.percentile(executor.times, 90)) * 1e3
                row["accept_us"] = statistics.median(accept_times) * 1e6
            results.append(row)
            print(row, flush=True)
    device = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"\n{args.model} on {device}, context {args.context}, vocabulary {vocab}")
    print(table(results, ["batch", "mode", "step_ms", "ms_per_token", "mask_ms", "mask_ms_p90", "accept_us"]))
    write_json(args.out, {"model": args.model, "device": device, "results": results})


if __name__ == "__main__":
    main()
