"""The fine-tuning comparison at equal time, tuned on a seed that is never reported (issue 29): calibration, tuning
and runs are ``sdo.app.finetune_comparison``'s. Timed: the run refuses to start above a load average of
``--max-load``; run nothing else meanwhile. The calibrations come first, alone; the untimed tuning and runs go
``--jobs`` at a time (the tables' seconds per update are the calibration's). Each result is stored as soon as it
exists; a rerun continues.

Usage: python benchmarks/compare_finetuning.py [OUT] [--seeds 0,1,2] [--jobs 2]   (default OUT:
       benchmarks/results/cpu/finetune-comparison)
Settings (recorded with every result; tests use small ones): --sample-steps 20 --batch-size 8 --budget-updates 40
The tables: python benchmarks/report.py --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sdo.app.comparison import add_settings_flags, require_idle, settings_from
from sdo.app.finetune_comparison import REPORTED_SEEDS, FinetuneComparisonSettings, run_all


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="benchmarks/results/cpu/finetune-comparison")
    parser.add_argument("--seeds", default=",".join(map(str, REPORTED_SEEDS)))
    parser.add_argument("--max-load", type=float, default=0.5, help="refuse to start above this load average")
    parser.add_argument("--jobs", type=int, default=2, help="untimed runs at a time, each on cores / jobs threads")
    add_settings_flags(parser, FinetuneComparisonSettings)
    args = parser.parse_args(argv)
    require_idle(args.max_load)
    settings = settings_from(args, FinetuneComparisonSettings)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    run_all(Path(args.out), settings, [int(s) for s in args.seeds.split(",") if s], jobs=args.jobs)
    print(f"done: {args.out}")


if __name__ == "__main__":
    main()
