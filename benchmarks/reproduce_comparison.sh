#!/usr/bin/env bash
# Reproducibility of the fair comparison (issue 20): `sdo` and `full` re-run alone on seed 0 of every (task,
# protocol), with the stored tuning, into OUT; `python benchmarks/report.py --write BENCHMARKS.md` compares them
# with the stored cases (block `comparison-repro`). Timed: run it on an idle machine, nothing else running.
# Usage: bash benchmarks/reproduce_comparison.sh [OUT]   (default OUT=benchmarks/results/cpu/comparison-repro)
set -euo pipefail
cd "$(dirname "$0")/.."
STORED=benchmarks/results/cpu/comparison
OUT=${1:-benchmarks/results/cpu/comparison-repro}
PYTHON=${PYTHON:-.venv/bin/python}
rm -rf "$OUT/cases" "$OUT/sweep"  # a rerun would skip finished cases; the tuning is the stored one
mkdir -p "$OUT"
cp -r "$STORED/sweep" "$OUT/sweep"
"$PYTHON" benchmarks/compare_estimators.py "$OUT" --class-seeds 0 --other-seeds 0 --variants sdo,full
