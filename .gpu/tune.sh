#!/usr/bin/env bash
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
out=$OUT
nvidia-smi --query-gpu=name,clocks.sm,power.draw --format=csv,noheader
for b in 64 256 128 1; do
  timeout 110 python benchmarks/tune_many_adapters.py --sections folded --adapters 4 --ranks 16 --batch $b \
    --out "$out/tune_consumers_b$b.json" > "$out/tune_consumers_b$b.log" 2>&1
  grep -E "^4 " "$out/tune_consumers_b$b.log" | sed 's/  */ /g' | cut -c1-200
done
timeout 90 python benchmarks/tune_many_adapters.py --sections folded --adapters 16,64 --batch 64 \
  --out "$out/tune_consumers_many.json" > "$out/tune_consumers_many.log" 2>&1
grep -E "^(16|64) " "$out/tune_consumers_many.log" | grep -E "SLOT|no delta|TILE_N=128 |TILE_M=16 LORA_NUM_WARPS=4" | sed 's/  */ /g' | cut -c1-200
timeout 60 python benchmarks/tune_many_adapters.py --sections unfolded --adapters 4 --ranks 16 --batch 1 --projections qkv \
  --out "$out/tune_gather_b1.json" > "$out/tune_gather_b1.log" 2>&1
grep -E "gather" "$out/tune_gather_b1.log" | tail -12 | sed 's/  */ /g' | cut -c1-200
timeout 230 python benchmarks/profile_decode.py --batches 64,256,128 --engine-batches '' \
  --variants 'default|EARLY|SLOT' --constants 'smlm_triton.SLOT_RANKS_IN_REGISTERS_MAX=0;SLOT_RANK_MASK_MIN_TABLE_RANK=32;rotary_triton.LORA_EARLY_LOADS=1;rotary_triton.LORA_EARLY_LOADS=2;rotary_triton.LORA_EARLY_LOADS=2,SLOT_RANK_MASK_MIN_TABLE_RANK=32' \
  > "$out/profile_variants.log" 2>&1
tail -22 "$out/profile_variants.log"
