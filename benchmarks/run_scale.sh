#!/usr/bin/env bash
# BENCHMARKS.md's "Scale" section (issue 12): the compiled chain, items across processes, and plans against
# measurements, stored under OUT; `python benchmarks/report.py --write BENCHMARKS.md` turns them into its blocks
# (scale-compile, scale-processes, scale-plan-vs-measured, scale-plan-full-size).
# Usage: bash benchmarks/run_scale.sh [OUT]   (default OUT=benchmarks/results/cpu/scale)
#   PARTS="plan"  runs only the plans (deterministic, nothing timed: any machine, any load);
#   PARTS="timed" runs only the timed parts (an idle machine: nothing else should run).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/cpu/scale}
PARTS=${PARTS:-plan timed}
SDO=${SDO:-.venv/bin/sdo}
PYTHON=${PYTHON:-.venv/bin/python}
ACCELERATE=${ACCELERATE:-.venv/bin/accelerate}
mkdir -p "$OUT"
MNIST=(--methods sdo,full,checkpointed,nograd --steps 2,4 --batch 2)
SD15_TINY=(--model sd15 --width 0.1 --resolution 64 --methods sdo,full,checkpointed,nograd --steps 2,4 --batch 1)

if [[ " $PARTS " == *" plan "* ]]; then
  # Plans (predicted memory and FLOP ratios; nothing runs): the configs measured below, and the full-size SD-1.5.
  $SDO bench --plan "${MNIST[@]}" --out "$OUT/plan-mnist" > "$OUT/plan-mnist.log" 2>&1
  $SDO bench --plan "${SD15_TINY[@]}" --out "$OUT/plan-sd15-tiny" > "$OUT/plan-sd15-tiny.log" 2>&1
  # The full-size SD-1.5 on CUDA (bf16): a plan traces on the meta device, so no GPU is needed to make it.
  SD15_FULL=(--model sd15 --device cuda --methods sdo,full,checkpointed,nograd --steps 10,50 --batch 1)
  {
    $SDO bench --plan "${SD15_FULL[@]}" --out "$OUT/plan-sd15"
    $SDO bench --plan "${SD15_FULL[@]}" --checkpoint-kept --checkpoint-decoder --out "$OUT/plan-sd15-lowmem"
  } > "$OUT/plan-sd15.log" 2>&1
fi

if [[ " $PARTS " == *" timed "* ]]; then
  # 1. The compiled no-grad chain: eager and compiled rows, interleaved, in one process.
  $SDO bench --compile --methods sdo,nograd --steps 20 --iters 6 --batch 4 --out "$OUT/compile" \
    > "$OUT/compile.log" 2>&1
  # 2. The configs of the plans above, measured (memory: the CPU figure; time: ratios to nograd).
  $SDO bench "${MNIST[@]}" --iters 3 --out "$OUT/measured-mnist" > "$OUT/measured-mnist.log" 2>&1
  $SDO bench "${SD15_TINY[@]}" --iters 3 --out "$OUT/measured-sd15-tiny" > "$OUT/measured-sd15-tiny.log" 2>&1
  # 3. Items across processes: 3 back-to-back pairs, 1 process at its default threads, then 2 processes
  #    (gloo on CPU; each process takes the cores divided by the processes); wall-clock of the whole command.
  P="$OUT/processes"
  mkdir -p "$P"
  ITEMS=(optimize --conditions 6 --steps 20 --iters 3 --batch 4)
  for run in 1 2 3; do
    rm -rf "$P/run-$run-1proc" "$P/run-$run-2proc"  # a rerun would skip finished items
    /usr/bin/time -f %e -o "$P/run-$run-1proc.wall" $SDO "${ITEMS[@]}" --out "$P/run-$run-1proc" \
      > "$P/run-$run-1proc.log" 2>&1
    /usr/bin/time -f %e -o "$P/run-$run-2proc.wall" $ACCELERATE launch --multi_gpu --num_processes 2 -m sdo \
      "${ITEMS[@]}" --device cpu --out "$P/run-$run-2proc" > "$P/run-$run-2proc.log" 2>&1
  done
fi
echo "done: $OUT"
