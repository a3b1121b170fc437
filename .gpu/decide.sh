#!/usr/bin/env bash
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
out=$OUT
timeout 100 python benchmarks/tune_many_adapters.py --sections folded --adapters 16,64 --batch 64 \
  --out "$out/tune_consumers_many.json" > "$out/tune_consumers_many.log" 2>&1
grep -E "^(16|64) " "$out/tune_consumers_many.log" | grep -E "SLOT|no delta|TILE_N=128 SILU_LORA_NUM_WARPS=8|TILE_N=128 \||TILE_M=16 LORA_NUM_WARPS=4" | sed 's/  */ /g; s/smlm_triton.SLOT_RANKS_IN_REGISTERS_MAX/REG/; s/fused_triton.SLOT_RANK_MASK_MIN_TABLE_RANK/MINR/' | cut -d'|' -f1-5
timeout 60 python benchmarks/tune_many_adapters.py --sections folded --adapters 4 --ranks 16 --batch 256 --projections qkv,gate_up \
  --out "$out/tune_consumers_b256.json" > "$out/tune_consumers_b256.log" 2>&1
grep -E "^4 " "$out/tune_consumers_b256.log" | grep -E "SLOT|no delta|EARLY" | sed 's/  */ /g; s/smlm_triton.SLOT_RANKS_IN_REGISTERS_MAX/REG/; s/fused_triton.SLOT_RANK_MASK_MIN_TABLE_RANK/MINR/' | cut -d'|' -f2-5
timeout 200 python benchmarks/profile_decode.py --batches 64,128,256 --engine-batches '' \
  --variants 'default|EARLY|SLOT' --constants 'rotary_triton.LORA_EARLY_LOADS=1;rotary_triton.LORA_EARLY_LOADS=2;SLOT_RANK_MASK_MIN_TABLE_RANK=0' \
  > "$out/profile_variants.log" 2>&1
tail -14 "$out/profile_variants.log"
