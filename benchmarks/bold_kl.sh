#!/usr/bin/env bash
# The base-model regularizer against reward hacking on the `bold` task (BENCHMARKS.md, "Fine-tuning with the
# base-model regularizer"): the base model's evaluation, SDO fine-tuning with and without --kl-weight, the figure
# docs/bold-kl.png, and the section's generated blocks (kl-base, kl-table, kl-findings). Deterministic and untimed:
# any load gives the same figures (under load, OMP_NUM_THREADS=1 is much faster than spin-waiting threads).
# Usage: bash benchmarks/bold_kl.sh [OUT]   (default OUT=benchmarks/results/cpu/bold-kl)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/cpu/bold-kl}
SDO=${SDO:-.venv/bin/sdo}
PYTHON=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
nice "$PYTHON" benchmarks/bold_kl_base.py "$OUT" --sample-steps 20 --eval-per-class 10 > "$OUT/base.log" 2>&1
for kl in 0 10 20 30; do
  nice $SDO finetune --method sdo --task bold --lr 3e-4 --steps 40 --sample-steps 20 --batch-size 8 \
    --eval-every 10 --eval-per-class 10 --kl-weight "$kl" --out "$OUT/kl$kl" > "$OUT/kl$kl.log" 2>&1
done
"$PYTHON" benchmarks/bold_kl_plot.py "$OUT" docs/bold-kl.png
if [ "$OUT" = benchmarks/results/cpu/bold-kl ]; then
  "$PYTHON" benchmarks/report.py --write BENCHMARKS.md
fi
