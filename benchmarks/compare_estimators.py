"""The paper's comparison on the embedded model, done fairly: every estimator at its best, honest time accounting.

Stage 1 (untimed) tunes each variant's knob; stage 2 runs every case with the variants interleaved, timed (the run
refuses to start above a load average of ``--max-load``). The variants, cases, stages and time accounting are
``sdo.app.fair_comparison``'s (over the comparison engine, ``sdo.app.comparison``). Each result is stored as soon as
it exists; a rerun skips what is stored, so a run may span sessions.

Usage: python benchmarks/compare_estimators.py OUT [--steps 50] [--iters 20] [--batch 2] [--late-step 40]
       [--class-seeds 0,1,2] [--other-seeds 0] [--variants a,b,...] [--sweep-only]
The tables and plots: python benchmarks/compare_report.py OUT
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sdo.app.comparison import require_idle
from sdo.app.fair_comparison import VARIANTS, Case, Settings, case_list, run_case, run_sweep
from sdo.app.tasks.latent import load_resources


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--late-step", type=int, default=40)
    parser.add_argument("--sweep-iters", type=int, default=10)
    parser.add_argument("--class-seeds", default="0,1,2")
    parser.add_argument("--other-seeds", default="0")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--sweep-only", action="store_true", help="stage 1 only (untimed; any machine load)")
    parser.add_argument("--max-load", type=float, default=0.5, help="refuse the timed cases above this load average")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    settings = Settings(args.steps, args.iters, args.batch, args.late_step, args.sweep_iters)
    out = Path(args.out)
    resources = load_resources(settings.task_config(Case("class", "noise", 0), "sdo"))
    sweep_names = sorted({VARIANTS[n].tuned_as or n for n in names}, key=list(VARIANTS).index)
    run_sweep(out, settings, sweep_names, resources)
    if args.sweep_only:
        return
    require_idle(args.max_load)
    seeds = [[int(s) for s in text.split(",")] for text in (args.class_seeds, args.other_seeds)]
    for case in case_list(*seeds):
        run_case(out, settings, case, names, resources)
    print(f"done: {out} (tables: python benchmarks/compare_report.py {out})")


if __name__ == "__main__":
    main()
