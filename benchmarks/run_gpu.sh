#!/usr/bin/env bash
# Every GPU figure of benchmarks/RESULTS.md, in parts that each run within 10 minutes.
# Usage (on the GPU machine, from the repository root): bash benchmarks/run_gpu.sh PART OUT_DIR
#   PART: check | inference | consumers | kernels | prefix | peft | adapters | training | profile | profile-mixed | unified | unified-serve
#         | unified-sweep  (one GPU)
#         tp-check | tp2-decode | tp2-e2e (2 GPUs) | tp4-serve | tp4-train (4 GPUs)
# The unified part needs the trace inside the repository (the device machine has no ../shared):
#   mkdir -p .bench_data && cp ../shared/data/burstgpt_arrivals.txt .bench_data/   (carry .bench_data)
set -uo pipefail
part=$1; out=${2:-/tmp/loquetier-bench}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
case "$part" in
  check)      # kernels on the GPU + engine vs HF/PEFT on the GPU (fp32 exact, bf16 vs HF's own error, grads);
              # the grammar tests need llguidance, which the GPU machine's image lacks
    python -m pytest tests/test_lora.py tests/test_kernels_triton.py tests/test_kernels_fused.py tests/test_kernels_fused_lora.py tests/test_kernels_rotary.py tests/test_attention_packed.py tests/test_prefix_cache.py tests/test_kernels_dropout.py tests/test_train_graphs.py tests/test_async_scheduling.py tests/test_cuda_graphs.py -k 'not grammar' -q -rf --tb=short -p no:cacheprovider \
      -o log_level=WARNING > "$out/check_tests.log" 2>&1; grep -E "^(FAILED|ERROR)|passed|failed" "$out/check_tests.log" | tail -20
    python benchmarks/gpu_check.py 2>&1 | grep -v -i warn | tee "$out/gpu_check.log" | tail -8 ;;
  inference)  # decode step times, end-to-end 256 requests and the 16 that PEFT runs; graph replay profile
    timeout 420 python benchmarks/bench_engine.py --sections ceilings,decode,e2e --batches 1,64,128,256 --e2e-subset --peft-e2e-requests 16 \
      --out "$out/inference.json" 2>&1 | tail -24
    timeout 170 python benchmarks/profile_decode.py --batches 1,64 --engine-batches 1,64 > "$out/profile_decode.log" 2>&1; tail -7 "$out/profile_decode.log" ;;
  consumers)  # the folded layers' consumer kernels (4 adapters of rank 16) at four batches, then the folded GEMMs
    for b in 1 64 128 256; do timeout 100 python benchmarks/tune_many_adapters.py --sections folded --adapters 4 --ranks 16 \
      --batch $b --out "$out/tune_consumers_b$b.json" 2>&1 | tail -14; done
    timeout 120 python benchmarks/bench_folded_gemm.py --batches 64,1,128,256 --out "$out/folded_gemm.json" 2>&1 | tail -22 ;;
  kernels)    # the many-adapter LoRA kernels' tile sweep (16 and 64 adapters at batch 64), paged decode attention's
              # settings, and structured outputs (needs llguidance: pip install --no-deps llguidance)
    timeout 300 python benchmarks/tune_many_adapters.py --adapters 16,64 --out "$out/tune_many_adapters.json" 2>&1 | tail -40
    timeout 150 python benchmarks/tune_decode_attention.py --batches 1,8,64,256 > "$out/tune_decode_attention.log" 2>&1
    tail -30 "$out/tune_decode_attention.log"
    timeout 150 python benchmarks/bench_structured.py --out "$out/structured.json" 2>&1 | tail -8 ;;
  prefix)     # prefix caching on a chat workload (shared 1,000-token system prompt, 4 adapters): on against off
    timeout 300 python benchmarks/bench_prefix_cache.py --out "$out/prefix_cache.json" 2>&1 | tail -6 ;;
  peft)       # our e2e runs twice each (order effects), then PEFT decode at batch 1 and 32 and its
              # e2e on the same first 16 requests (one padded batch), in consecutive processes
    timeout 150 python benchmarks/bench_engine.py --sections e2e --e2e-repeat 2 --e2e-subset --peft-e2e-requests 16 \
      --out "$out/e2e_repeat.json" 2>&1 | grep "^e2e"
    timeout 400 python benchmarks/bench_engine.py --sections peft --peft-parts decode,e2e --peft-e2e-requests 16 \
      --out "$out/peft.json" 2>&1 | grep "^peft" ;;
  adapters)   # 16 and 64 distinct adapters (ranks 8-64) at batch 64 against base; swap cost; load to first token
    timeout 560 python benchmarks/bench_adapters.py --out "$out/adapters.json" 2>&1 | tail -6 ;;
  training)   # through Trainer: Alpaca-like packed beside PEFT on the same examples, then fixed 4x512 (1 and 4 jobs)
    timeout 330 python benchmarks/bench_train.py --workloads alpaca,peft-alpaca --steps 12 --peft-steps 10 \
      --out "$out/train_alpaca.json" 2>&1 | tail -4
    timeout 230 python benchmarks/bench_train.py --workloads fixed --out "$out/train_fixed.json" 2>&1 | tail -4 ;;
  profile)    # GPU-busy fraction of training (graph / eager), mixed and decode steps
    timeout 300 python benchmarks/profile_steps.py --out "$out/profile_steps.json" 2>&1 | tail -7 ;;
  profile-mixed)  # training beside 32 decode rows at four training-token sizes, against training alone
    timeout 400 python benchmarks/profile_steps.py --kinds train-graph,mixed --mixed-train-tokens 256,512,1024,2048 \
      --out "$out/profile_mixed.json" 2>&1 | tail -7 ;;
  unified)    # BurstGPT replay at 3.4, 8 and 15 req/s (300 requests each): SLO-aware, then training alone
    timeout 560 python benchmarks/bench_unified.py --trace .bench_data/burstgpt_arrivals.txt --policies slo,train-only \
      --out "$out/unified.json" --plot "$out/unified.png" 2>&1 | tail -12 ;;
  unified-serve)  # the same three loads served alone
    timeout 560 python benchmarks/bench_unified.py --trace .bench_data/burstgpt_arrivals.txt --policies serve-only \
      --out "$out/unified_serve.json" 2>&1 | tail -8 ;;
  unified-sweep)  # the fixed 5:1 policy at 3.4 and 8 req/s and the TPOT-SLO sweep at 8 req/s
    timeout 560 python benchmarks/bench_unified.py --trace .bench_data/burstgpt_arrivals.txt --policies fixed \
      --loads 3.4,8 --tpot-slos 0.04,0.16 --out "$out/unified_sweep.json" --plot "$out/unified_sweep.png" 2>&1 | tail -12 ;;
  tp-check)   # the tensor-parallel path against the plain engine: a one-rank NCCL group, then split over 2 GPUs
    timeout 280 python benchmarks/tp_check.py --size 1 2>&1 | grep -v -i warn | tail -3
    timeout 280 python benchmarks/tp_check.py --size 2 2>&1 | grep -v -i warn | tail -3 ;;
  tp2-decode) # Llama-3-8B shape: decode steps at size 1, then split over 2 GPUs (target: batch 64 step <= 0.6x)
    for n in 1 2; do timeout 270 python benchmarks/bench_engine.py --sections ceilings,decode --batches 1,8,32,64,128 \
      --no-async-ab --tensor-parallel-size $n --out "$out/tp${n}_8b_decode.json" 2>&1 | grep "^{'section'"; done
    python benchmarks/compare_tp.py "$out/tp1_8b_decode.json" "$out/tp2_8b_decode.json" ;;
  tp2-e2e)    # Llama-3-8B shape: 256 ShareGPT-like requests with 1 and 4 adapters, size 1 then 2
    for n in 1 2; do timeout 270 python benchmarks/bench_engine.py --sections e2e --tensor-parallel-size $n \
      --out "$out/tp${n}_8b_e2e.json" 2>&1 | grep "^{'section'"; done
    python benchmarks/compare_tp.py "$out/tp1_8b_e2e.json" "$out/tp2_8b_e2e.json" ;;
  tp4-serve)  # Llama-3-70B shape split over 4 GPUs: decode with 0/1/4 adapters (bw_util: share of each GPU's
              # copy bandwidth, so of the aggregate; target >= 0.6) and 256 requests with 1 and 4 adapters
    timeout 560 python benchmarks/bench_engine.py --model random:llama3-70b --tensor-parallel-size 4 \
      --sections ceilings,decode,e2e --batches 1,8,32,64 --no-async-ab --out "$out/tp4_70b_serve.json" 2>&1 | tail -22 ;;
  tp4-train)  # Llama-3-70B shape split over 4 GPUs: LoRA training tokens/s through Trainer, 1 and 4 jobs (MFU per GPU)
    timeout 560 python benchmarks/bench_train.py --model random:llama3-70b --tensor-parallel-size 4 \
      --workloads alpaca,fixed --out "$out/tp4_70b_train.json" 2>&1 | tail -8 ;;
  *) echo "unknown part $part"; exit 2 ;;
esac
