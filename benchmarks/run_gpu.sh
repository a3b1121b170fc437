#!/usr/bin/env bash
# Every GPU figure of benchmarks/RESULTS.md, in calls that each fit the device tool's 10-minute limit.
# Usage (on the GPU machine, from the repository root): bash benchmarks/run_gpu.sh PART OUT_DIR
#   PART: check | inference | prefix | peft | training | unified
# The unified part needs the trace inside the repository (the device machine has no ../shared):
#   mkdir -p .bench_data && cp ../shared/data/burstgpt_arrivals.txt .bench_data/   (carry .bench_data)
set -uo pipefail
part=$1; out=${2:-/tmp/loquetier-bench}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
case "$part" in
  check)      # kernels on the GPU + engine vs HF/PEFT on the GPU (fp32 exact, bf16 vs HF's own error, grads)
    python -m pytest tests/test_kernels_triton.py tests/test_kernels_fused.py tests/test_kernels_fused_lora.py tests/test_kernels_rotary.py tests/test_attention_packed.py tests/test_prefix_cache.py tests/test_train_graphs.py tests/test_async_scheduling.py -q -p no:cacheprovider 2>&1 | tail -5
    python benchmarks/gpu_check.py 2>&1 | grep -v -i warn | tee "$out/gpu_check.log" | tail -8 ;;
  inference)  # decode step times, end-to-end 256 requests and the 16 that PEFT runs; graph replay profile
    timeout 420 python benchmarks/bench_engine.py --sections ceilings,decode,e2e --e2e-subset --peft-e2e-requests 16 \
      --out "$out/inference.json" 2>&1 | tail -24
    timeout 150 python benchmarks/profile_decode.py --batches 1,64 > "$out/profile_decode.log" 2>&1; tail -7 "$out/profile_decode.log" ;;
  prefix)     # prefix caching on a chat workload (shared 1,000-token system prompt, 4 adapters): on against off
    timeout 300 python benchmarks/bench_prefix_cache.py --out "$out/prefix_cache.json" 2>&1 | tail -6 ;;
  peft)       # our e2e runs twice each (order effects), then PEFT decode at batch 1 and 32 and its
              # e2e on the same first 16 requests (one padded batch), in consecutive processes
    timeout 150 python benchmarks/bench_engine.py --sections e2e --e2e-repeat 2 --e2e-subset --peft-e2e-requests 16 \
      --out "$out/e2e_repeat.json" 2>&1 | grep "^e2e"
    timeout 400 python benchmarks/bench_engine.py --sections peft --peft-parts decode,e2e --peft-e2e-requests 16 \
      --out "$out/peft.json" 2>&1 | grep "^peft" ;;
  training)   # 1 and 4 adapters (4 interleaved in 2,048-token steps), 1 adapter without training graphs, and PEFT
    timeout 120 python benchmarks/bench_engine.py --sections ceilings,train --train-jobs 1 --out "$out/train1.json" 2>&1 | grep "'section'"
    timeout 120 python benchmarks/bench_engine.py --sections train --train-jobs 1 --no-train-graphs --out "$out/train1_eager.json" 2>&1 | grep "'section'"
    timeout 150 python benchmarks/bench_engine.py --sections train --train-jobs 4 --train-budget 2048 --out "$out/train4.json" 2>&1 | grep "'section'"
    timeout 120 python benchmarks/bench_engine.py --sections peft --peft-parts train --out "$out/peft_train.json" 2>&1 | grep "'section'" ;;
  unified)    # BurstGPT replay: SLO-aware vs fixed vs serving alone vs training alone, with a plot
    timeout 560 python benchmarks/bench_unified.py --trace .bench_data/burstgpt_arrivals.txt --requests 80 \
      --speedups 5,12 --max-output 256 --train-only-seconds 15 --out "$out/unified.json" --plot "$out/unified.png" 2>&1 | tail -12 ;;
  *) echo "unknown part $part"; exit 2 ;;
esac
