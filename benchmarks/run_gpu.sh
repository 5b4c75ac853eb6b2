#!/usr/bin/env bash
# GPU figures for BENCHMARKS.md: the SD-1.5-sized architecture (random weights, 512x512, CFG, DDIM, bf16).
# Prepared to run once inside a ~10-minute device lease: bash benchmarks/run_gpu.sh OUT_DIR
# Full backprop without checkpointing needs ~1.5 GiB per step, so it runs at 10 and 25 steps only (50 would need
# ~75 GiB); the other methods run at 50 steps. Each invocation is a separate process so that one OOM loses nothing else.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu}
SDO=${SDO:-sdo}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
COMMON=(--model sd15 --device cuda --batch 1 --iters 3)
$SDO bench "${COMMON[@]}" --methods sdo,checkpointed,nograd --steps 50 \
  --out "$OUT/sd15-50" --json "$OUT/sd15-50.json" 2>&1 | tail -20
$SDO bench "${COMMON[@]}" --methods sdo,checkpointed --steps 50 --checkpoint-kept --checkpoint-decoder \
  --out "$OUT/sd15-50-lowmem" --json "$OUT/sd15-50-lowmem.json" 2>&1 | tail -20
$SDO bench "${COMMON[@]}" --methods sdo,full,nograd --steps 10,25 \
  --out "$OUT/sd15-full" --json "$OUT/sd15-full.json" 2>&1 | tail -20
python -m pytest -q -m gpu tests 2>&1 | tail -5
