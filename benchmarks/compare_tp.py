"""Side by side: two `bench_engine.py` or `bench_train.py` result files (e.g. the same model at tensor-parallel size 1
and 2). Prints each matching row's figure in both and their ratio (second / first).
`python benchmarks/compare_tp.py tp1.json tp2.json`"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import table  # noqa: E402

KEYS = {"decode": ("batch", "adapters", "async"), "e2e": ("adapters", "requests"), "train": ("workload", "jobs")}
FIGURE = {"decode": "step_ms", "e2e": "tok_per_s", "train": "tok_per_s"}


def _section(row: dict) -> str:
    return row.get("section", "train" if row.get("engine") == "loquetier" else "")   # bench_train rows


def main(first: str, second: str) -> None:
    runs = [json.loads(Path(p).read_text()) for p in (first, second)]
    sizes = [r["info"].get("tensor_parallel_size", 1) for r in runs]
    index = {(_section(r), *(r.get(k) for k in KEYS.get(_section(r), ()))): r for r in runs[0]["results"]}
    rows = []
    for r in runs[1]["results"]:
        section = _section(r)
        if section not in KEYS:
            continue
        key = (section, *(r.get(k) for k in KEYS[section]))
        if key in index:
            fig = FIGURE[section]
            a, b = index[key][fig], r[fig]
            rows.append({**{k: r.get(k) for k in ("section", *KEYS[section])}, "figure": fig,
                         f"tp{sizes[0]}": a, f"tp{sizes[1]}": b, "ratio": b / a, "bw_util": r.get("bw_util")})
    print(table(rows, ["section", "batch", "adapters", "async", "requests", "workload", "jobs", "figure", f"tp{sizes[0]}",
                       f"tp{sizes[1]}", "ratio", "bw_util"]))


if __name__ == "__main__":
    main(*sys.argv[1:3])
