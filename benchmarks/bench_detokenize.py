"""Host time to keep an output's text current after every token (stop strings, streaming): decoding
the whole output each time against the incremental decoder (engine/detokenizer.py). CPU only.

    python benchmarks/bench_detokenize.py --tokens 1000
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
from transformers import AutoTokenizer

from loquetier.engine.detokenizer import IncrementalText
from loquetier.tiny import build_tokenizer


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=1000, help="output length")
    ap.add_argument("--tokenizer", default=None, help="a tokenizer directory (default: the package's tiny one)")
    args = ap.parse_args()
    path = args.tokenizer
    if path is None:
        path = tempfile.mkdtemp()
        build_tokenizer(path)
    tok = AutoTokenizer.from_pretrained(path)
    ids = np.random.default_rng(0).integers(3, len(tok), args.tokens).tolist()
    t0 = time.perf_counter()
    for n in range(1, len(ids) + 1):
        tok.decode(ids[:n], skip_special_tokens=True)
    full = time.perf_counter() - t0
    inc = IncrementalText(tok)
    t0 = time.perf_counter()
    for n in range(1, len(ids) + 1):
        inc.update(ids, n)
    incremental = time.perf_counter() - t0
    print(f"{args.tokens}-token output, its text after every token: whole decode {full * 1e3:.1f} ms, "
          f"incremental {incremental * 1e3:.1f} ms ({full / incremental:.1f}x)")


if __name__ == "__main__":
    main()
