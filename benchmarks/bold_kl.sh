#!/usr/bin/env bash
# The base-model regularizer against reward hacking on the `bold` task: SDO fine-tuning with and without --kl-weight
# (BENCHMARKS.md, "Fine-tuning with the base-model regularizer"), then the figure docs/bold-kl.png.
# Usage: bash benchmarks/bold_kl.sh [OUT]   (default OUT=benchmarks/results/bold-kl)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/bold-kl}
SDO=${SDO:-.venv/bin/sdo}
mkdir -p "$OUT"
for kl in 0 10 20 30; do
  nice $SDO finetune --method sdo --task bold --lr 3e-4 --steps 40 --sample-steps 20 --batch-size 8 \
    --eval-every 20 --eval-per-class 10 --kl-weight "$kl" --out "$OUT/kl$kl" > "$OUT/kl$kl.log" 2>&1
done
python benchmarks/bold_kl_plot.py "$OUT" docs/bold-kl.png
