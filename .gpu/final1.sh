#!/usr/bin/env bash
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
out=$OUT
git log --oneline | head -1 > "$out/commit.txt" 2>/dev/null || true
python -c "import torch, triton, transformers, peft; print(torch.__version__, triton.__version__, transformers.__version__, peft.__version__)" | tee "$out/versions.txt"
bash benchmarks/run_gpu.sh inference "$out"
bash benchmarks/run_gpu.sh adapters "$out"
bash benchmarks/run_gpu.sh prefix "$out"
bash benchmarks/run_gpu.sh check "$out"
