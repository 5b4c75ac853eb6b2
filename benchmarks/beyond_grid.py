"""One step past the edge of the fair comparison's tuning grid (issue 20): would a larger value have done better?

Six of the nine swept knobs of the fair comparison (``sdo.app.fair_comparison``) chose the largest value of their
3-value grid. Untimed (only rewards are compared), this script runs:

1. **Past the edge** (``OUT/edge/<variant>@<value>.json``): each variant whose chosen value is its grid's largest,
   at the next value (``BEYOND``: Adam's lr 0.2, DOODL's gradient scale 100, FreeDoM's scale 3), in the sweep's own
   setting (class task, initial noise, seed 0, the sweep's iterations).
2. **The editing win** (``OUT/edit/full@<lr>-s<seed>.json``): ``full`` at that lr on the class task's editing
   protocol, every stored class seed, the comparison's iterations; the comparison has SDO ahead of ``full`` there,
   and this says whether ``full``'s grid is why.

A rerun skips stored results. ``python benchmarks/report.py --write BENCHMARKS.md`` turns them into the
``comparison-beyond-grid`` block.

Usage: python benchmarks/beyond_grid.py [OUT] [--comparison benchmarks/results/cpu/comparison]
       (default OUT: benchmarks/results/cpu/beyond-grid)
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from sdo.app.comparison import save_result, stored_record
from sdo.app.fair_comparison import VARIANTS, Case, Settings, chosen_value, run_alone
from sdo.app.tasks.latent import load_resources
from sdo.io import load_json

BEYOND = {"lr": 0.2, "doodl_lr": 100.0, "freedom_scale": 3.0}
"""The next value past each knob's grid (the grids grow by 2x for Adam's lr, 10x for DOODL's scale, ~3x for
FreeDoM's)."""


def stored_settings(comparison: Path) -> Settings:
    """The settings the stored cases were made with (all cases share them)."""
    path = next((comparison / "cases").glob("*/full.json"), None)
    if path is None:
        raise SystemExit(f"no stored cases in {comparison}; run benchmarks/compare_estimators.py {comparison} first.")
    return Settings(**load_json(path)["settings"])


def edge_variants(comparison: Path) -> list[str]:
    """The swept variants whose chosen value is the largest of their grid."""
    return [
        name
        for name, variant in VARIANTS.items()
        if not variant.tuned_as and chosen_value(comparison, name) == max(variant.grid)
    ]


def class_seeds(comparison: Path) -> list[int]:
    return sorted(int(path.name.rsplit("-s", 1)[1]) for path in (comparison / "cases").glob("class-edit-s*"))


def run_variant(name: str, value: float, case: Case, iters: int, settings: Settings, resources) -> dict:
    """``name`` with its knob at ``value`` on ``case`` for ``iters`` iterations: the stored record."""
    iterates = run_alone(name, value, case, iters, settings, resources)["iterates"]
    return {
        "variant": name,
        "knob": VARIANTS[name].knob,
        "value": value,
        "case": asdict(case),
        "iters": iters,
        "settings": asdict(settings),
        "final_reward": iterates[-1]["reward"],
        "iterates": iterates,
    }


def plan(comparison: Path, out: Path, settings: Settings) -> list[tuple[Path, str, float, Case, int]]:
    """Every run of this script: ``(path, variant, value, case, iterations)``."""
    runs = []
    for name in edge_variants(comparison):
        value = BEYOND[VARIANTS[name].knob]
        runs.append((out / "edge" / f"{name}@{value:g}.json", name, value, Case("class", "noise", 0), None))
    for seed in class_seeds(comparison):
        path = out / "edit" / f"full@{BEYOND['lr']:g}-s{seed}.json"
        runs.append((path, "full", BEYOND["lr"], Case("class", "edit", seed), settings.iters))
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="benchmarks/results/cpu/beyond-grid")
    parser.add_argument("--comparison", default="benchmarks/results/cpu/comparison")
    args = parser.parse_args(argv)
    comparison, out = Path(args.comparison), Path(args.out)
    settings = stored_settings(comparison)
    runs = plan(comparison, out, settings)
    resources = load_resources(settings.task_config(Case("class", "noise", 0), "sdo"))
    for path, name, value, case, iters in tqdm(runs, desc="beyond the grid"):
        if stored_record(path, {"settings": asdict(settings), "value": value, "case": asdict(case)}) is not None:
            continue
        record = run_variant(name, value, case, iters or settings.sweep_iters, settings, resources)
        save_result(record, path)
        print(f"  {path.parent.name} {name} {record['knob']}={value:g}: final reward {record['final_reward']:.4f}")
    print(json.dumps({"done": str(out), "runs": len(runs)}))


if __name__ == "__main__":
    main()
