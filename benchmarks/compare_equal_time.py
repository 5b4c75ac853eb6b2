"""The fair comparison at equal time, tuned on a seed that is never reported (issue 28): calibration, tuning and
cases are ``sdo.app.equal_time``'s. Timed: the run refuses to start above a load average of ``--max-load``; run
nothing else meanwhile (the untimed tuning runs go ``--jobs`` at a time, after the timed calibration). Each result is
stored as soon as it exists; a rerun continues where the last one stopped.

Usage: python benchmarks/compare_equal_time.py [OUT] [--tasks class,style,adversarial] [--seeds 0,1,2]
       [--no-authors] [--passes kept,fallbacks] [--jobs 2]   (default OUT: benchmarks/results/cpu/equal-time)
Settings (recorded with every result; tests use small ones): --steps 50 --full-iters 20 --batch 2 --late-step 40
The tables: python benchmarks/report.py --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sdo.app.comparison import add_settings_flags, require_idle, settings_from
from sdo.app.equal_time import PASSES, REPORTED_SEEDS, TASKS, EqualTimeSettings, run_all, shared_resources


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="benchmarks/results/cpu/equal-time")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--seeds", default=",".join(map(str, REPORTED_SEEDS)))
    parser.add_argument("--no-authors", action="store_true", help="skip the authors' setting rows")
    parser.add_argument(
        "--passes",
        default=",".join(PASSES),
        help="which passes to run, in order: kept (every variant but the fallbacks), fallbacks",
    )
    parser.add_argument(
        "--jobs", type=int, default=2, help="untimed tuning runs at a time, each on cores / jobs threads"
    )
    parser.add_argument("--max-load", type=float, default=0.5, help="refuse to start above this load average")
    add_settings_flags(parser, EqualTimeSettings)
    args = parser.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    if unknown := sorted(set(tasks) - set(TASKS)):
        parser.error(f"--tasks: unknown {unknown}; known: {', '.join(TASKS)}")
    passes = [p for p in args.passes.split(",") if p]
    if unknown := sorted(set(passes) - set(PASSES)):
        parser.error(f"--passes: unknown {unknown}; known: {', '.join(PASSES)}")
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    require_idle(args.max_load)
    settings = settings_from(args, EqualTimeSettings)
    resources = shared_resources(settings)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    run_all(
        Path(args.out), settings, resources, tasks, seeds, authors=not args.no_authors, passes=passes, jobs=args.jobs
    )
    print(f"done: {args.out}")


if __name__ == "__main__":
    main()
