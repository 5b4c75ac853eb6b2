#!/usr/bin/env bash
# The CPU figures of BENCHMARKS.md and the README, in one sequential run (nothing else should load the machine);
# the regularizer section comes from benchmarks/bold_kl.sh, the Scale section from benchmarks/run_scale.sh.
# Usage: bash benchmarks/run_cpu.sh [OUT]   (default OUT=benchmarks/results/cpu)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/cpu}
SDO=${SDO:-.venv/bin/sdo}
PYTHON=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"

if [ "${SKIP_DEMO:-0}" != 1 ]; then
# 1. The demo, three times (wall-clock of the whole command, and its ratios).
for i in 1 2 3; do
  /usr/bin/time -f "%e" -o "$OUT/demo-$i.wall" $SDO demo --out "$OUT/demo-$i" > "$OUT/demo-$i.log" 2>&1
done
fi

# 2. Latent optimization, DDIM 50 steps, every task, SDO against full backpropagation in one process each.
# Then the paper's protocol for editing: optimize the latent at step 40 of 50 (after a no-grad warm-up).
for task in class style adversarial; do
  $SDO demo --task "$task" --source 3 --target 8 --steps 50 --iters 20 --batch 8 --out "$OUT/compare-$task" \
    > "$OUT/compare-$task.log" 2>&1
  $SDO demo --task "$task" --source 3 --target 8 --steps 50 --start-step 40 --iters 20 --batch 8 \
    --out "$OUT/compare-late-$task" > "$OUT/compare-late-$task.log" 2>&1
done

# 3. Estimator benchmark on latents: cost vs steps, and gradient fidelity per kept step.
$SDO bench --methods sdo,sdo-last,full,checkpointed,nograd --steps 10,25,50 --iters 4 --batch 4 --cosine-sweep \
  --out "$OUT/bench-latent" --json "$OUT/bench-latent-rows.json" > "$OUT/bench-latent.log" 2>&1

# 4. Estimator benchmark on weights (the fine-tuning workload), 50 steps.
$SDO bench --variable weights --methods sdo,full,checkpointed,draft-k,random-truncation,nograd --draft-k 1 \
  --steps 50 --iters 4 --batch 4 --lr 1e-4 --out "$OUT/bench-weights" --json "$OUT/bench-weights-rows.json" \
  > "$OUT/bench-weights.log" 2>&1

# 5. Fine-tuning at an equal number of updates: reward and held-out judge accuracy, on both tasks.
# confidence: guidance 1, so the classifier is not already certain; bold: lr 3e-4, 40 updates.
for method in sdo draft-1 random-truncation; do
  $SDO finetune --method "$method" --task confidence --guidance 1.0 --steps 40 --sample-steps 20 --batch-size 8 \
    --eval-every 20 --eval-per-class 10 --out "$OUT/finetune-confidence-$method" > "$OUT/finetune-confidence-$method.log" 2>&1
  $SDO finetune --method "$method" --task bold --lr 3e-4 --steps 40 --sample-steps 20 --batch-size 8 \
    --eval-every 20 --eval-per-class 10 --out "$OUT/finetune-bold-$method" > "$OUT/finetune-bold-$method.log" 2>&1
done

# 6. The sampler's overhead over a plain diffusers loop (the "Sampler overhead" line).
$PYTHON benchmarks/sampler_overhead.py > "$OUT/sampler-overhead.txt" 2> "$OUT/sampler-overhead.log"

# 7. AdjointDPM and DOODL on the SD-1.5-sized workload at reduced width.
$SDO bench --model sd15 --width 0.125 --resolution 64 --methods sdo,checkpointed,full,adjoint,doodl,nograd --steps 10 \
  --iters 2 --batch 1 --out "$OUT/sd15-small-estimators" > "$OUT/sd15-small-estimators.log" 2>&1

# 8. The fair comparison (issue 20): tuning sweep, then every estimator interleaved on 3 tasks x 2 protocols
# (about 2 hours on an idle 2-core machine; resumable: a rerun skips stored cases). Then its untimed companions.
$PYTHON benchmarks/compare_estimators.py "$OUT/comparison" > "$OUT/comparison.log" 2>&1
$PYTHON benchmarks/compare_report.py "$OUT/comparison" > /dev/null
$PYTHON benchmarks/beyond_grid.py "$OUT/beyond-grid" --comparison "$OUT/comparison" > "$OUT/beyond-grid.log" 2>&1
$PYTHON benchmarks/adjoint_drift.py "$OUT/adjoint-drift" > "$OUT/adjoint-drift.log" 2>&1
$PYTHON benchmarks/edict_vs_ddim.py "$OUT/edict-vs-ddim" > "$OUT/edict-vs-ddim.log" 2>&1

# The generated blocks of BENCHMARKS.md (the regularizer section: benchmarks/bold_kl.sh; Scale: run_scale.sh).
if [ "$OUT" = benchmarks/results/cpu ]; then
  $PYTHON benchmarks/report.py --write BENCHMARKS.md
else
  $PYTHON benchmarks/report.py "$OUT"
fi
echo "done: $OUT"
