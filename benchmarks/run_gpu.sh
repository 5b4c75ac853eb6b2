#!/usr/bin/env bash
# GPU figures for BENCHMARKS.md: the SD-1.5-sized architecture (random weights, 512x512, CFG 7.5, DDIM, bf16).
# Prepared to run once inside a ~10-minute device lease:   bash benchmarks/run_gpu.sh [OUT_DIR]
# then paste the output of `python benchmarks/gpu_report.py OUT_DIR` into BENCHMARKS.md.
#
# Runs (each a separate process, each under a time limit, so one OOM or hang loses nothing else):
#   plan        sdo bench --plan: the predicted memory/time of every row below (nothing runs)
#   sd15-50     50 steps: sdo, nograd, checkpointed, and adjoint / doodl when the registry has them (eager)
#   sd15-50-compiled  50 steps: sdo and nograd, eager and compiled (torch.compile, CUDA graphs), one process
#   sd15-full   full backprop at 10 and 25 steps (50 would need ~75 GiB), with sdo and nograd beside it
#   sd15-50-lowmem    sdo and checkpointed with the kept step and the decoder recomputed in backward
# Methods the registry does not know (`sdo bench --list-methods`) are left out, not failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
SDO=${SDO:-"$PY -m sdo"}
LIMIT=${LIMIT:-150}   # seconds per bench process
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
KNOWN=$($SDO bench --list-methods | awk '{print $1}')
have() { grep -qx "$1" <<< "$KNOWN"; }
methods() {  # the names among "$@" the registry knows, comma-separated
  local keep=()
  for name in "$@"; do have "$name" && keep+=("$name"); done
  (IFS=,; echo "${keep[*]}")
}
# BENCH_ARGS overrides the shared flags (a CPU smoke test of this script: --device cpu --width 0.1 --resolution 64).
read -r -a COMMON <<< "${BENCH_ARGS:---model sd15 --device cuda --batch 1 --iters 3}"
run() {  # run NAME ARGS...: one bench process, its table to the log, its rows to NAME.json
  local name=$1; shift
  echo "== $name: $*"
  timeout "$LIMIT" $SDO bench "${COMMON[@]}" "$@" --out "$OUT/$name" --json "$OUT/$name.json" \
    > "$OUT/$name.log" 2>&1
  echo "   exit $? ($(tail -c 300 "$OUT/$name.log" | tr '\n' ' ' | cut -c1-200))"
}
ALL=$(methods sdo nograd checkpointed adjoint doodl)
$SDO bench --plan "${COMMON[@]}" --methods "$(methods sdo nograd checkpointed full adjoint doodl)" \
  --steps 10,25,50 --out "$OUT/plan" > "$OUT/plan.log" 2>&1
run sd15-50 --methods "$ALL" --steps 50
run sd15-50-compiled --methods sdo,nograd --steps 50 --compile
run sd15-full --methods sdo,full,nograd --steps 10,25
run sd15-50-lowmem --methods sdo,checkpointed --steps 50 --checkpoint-kept --checkpoint-decoder
timeout 120 $PY -m pytest -q -p no:warnings -m gpu tests 2>&1 | tail -5
$PY benchmarks/gpu_report.py "$OUT" | tee "$OUT/report.md"
