"""The fine-tuning comparison at equal time, tuned on a seed that is never reported (issue 29; the latent one is
``sdo.app.equal_time``). ``benchmarks/compare_finetuning.py`` runs it; ``sdo.app.report.finetune_comparison`` makes
its tables. Every run is ``sdo finetune`` on the embedded model (``sdo.app.finetuning.finetune``).

A *setting* is a task with a base-model regularizer weight: ``confidence``, ``bold`` and ``bold-kl`` (``bold`` with
the tuned ``--kl-weight``). Stored under OUT, each result as soon as it exists; a rerun continues where the last one
stopped (a run cut short resumes from its checkpoint) and refuses a stored result made with other settings:

1. **Calibration** (``calibration/<setting>.json``, timed): each method's median seconds per update over
   ``calibration_updates`` updates but the first. The budget is ``budget_updates`` updates of ``sdo``, T =
   ``budget_updates`` x s_sdo; method m runs n_m = max(2, floor(T / s_m)) updates and is evaluated at
   ceil(n_m / 2) and n_m (50% and 100% of the budget). The counts are stored, so a rerun is exact.
2. **Tuning** (``tuning/``, untimed: only rewards are compared) on ``TUNING_SEED``, task ``confidence``, at n_m:
   each method's lr over ``LRS``, widened past an edge until the choice is interior (``equal_time.widen``); the
   metric is the held-out reward (``eval_reward``) at the last evaluation. ``bold`` and ``bold-kl`` take
   ``confidence``'s choice (a cut the issue allows). The KL weight: ``sdo`` on ``bold``, ``TUNING_SEED``, each of
   ``KL_WEIGHTS`` (continued past the largest, ``KL_WIDENINGS`` at most, while none keeps the judge); the one with
   the largest final held-out reward among those whose judge accuracy is at least ``JUDGE_BAR`` at every
   evaluation.
3. **Runs** (``runs/<setting>/<method>-s<seed>/``, the ``sdo finetune`` folder, and ``<method>-s<seed>.json``, its
   record, written last): every method on every setting and reported seed.

Every calibration comes first, alone on the machine. Tuning and runs are untimed (each runs its stored update count;
the tables' seconds per update are the calibration's), so ``run_all(..., jobs=2)`` runs them two at a time
(``sdo.app.comparison.in_workers``): the lr grid of every method, each method's widening, the KL weights, then the
reported runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

from sdo.app.comparison import in_workers, save_result, source_commit, this_machine
from sdo.app.equal_time import finite_or_none, steady_seconds, stored_record, widen
from sdo.app.finetuning import FinetuneConfig, finetune
from sdo.app.report.blocks import load_records
from sdo.errors import NonFiniteRewardError

__all__ = [
    "JUDGE_BAR",
    "KL_WEIGHTS",
    "KL_WIDENINGS",
    "LRS",
    "METHODS",
    "REPORTED_SEEDS",
    "SETTINGS",
    "TUNING_SEED",
    "FinetuneComparisonSettings",
    "calibrate",
    "run_all",
    "run_method",
    "tune_kl",
    "tune_lr",
]

METHODS = ("sdo", "full", "draft-1", "draft-k", "alignprop", "random-truncation")
SETTINGS = ("confidence", "bold", "bold-kl")
TUNING_SEED = 100
REPORTED_SEEDS = (0, 1, 2)
LRS = (3e-4, 1e-3, 3e-3)
"""The lr grid (the CLI's default 1e-3 in the middle), widened past an edge."""
KL_WEIGHTS = (0.0, 10.0, 20.0, 30.0)
KL_WIDENINGS = 3
"""At most this many weights past ``KL_WEIGHTS``' largest while no weight keeps the judge at ``JUDGE_BAR``."""
WIDENINGS = 2
"""At most this many lrs past the grid's edge."""
JUDGE_BAR = 0.8
"""The held-out judge accuracy a ``bold`` run must keep to count (reward hacking otherwise)."""


@dataclass(frozen=True)
class FinetuneComparisonSettings:
    """What every run shares (recorded beside each result; a stored result made with other settings is refused)."""

    sample_steps: int = 20
    batch_size: int = 8
    budget_updates: int = 40
    calibration_updates: int = 3
    eval_per_class: int = 5

    def config(
        self, setting: str, method: str, seed: int, lr: float, steps: int, out: Path, kl: float
    ) -> FinetuneConfig:
        """The ``sdo finetune`` run of ``method`` on ``setting`` with ``--kl-weight kl`` (``confidence`` with
        guidance 1, as ``benchmarks/run_cpu.sh``: the classifier is not already certain)."""
        task = "confidence" if setting == "confidence" else "bold"
        return FinetuneConfig(
            method=method,
            task=task,
            guidance=1.0 if task == "confidence" else 0.0,
            steps=steps,
            sample_steps=self.sample_steps,
            batch_size=self.batch_size,
            lr=lr,
            kl_weight=kl,
            eval_every=math.ceil(steps / 2),
            eval_per_class=self.eval_per_class,
            checkpoint_every=max(1, math.ceil(steps / 2)),
            seed=seed,
            out=str(out),
        )


def _metrics(folder: Path) -> list[dict]:
    return load_records(folder / "metrics.jsonl")


def calibrate(out: Path, setting: str, settings: FinetuneComparisonSettings) -> dict:
    """Stage 1 on ``setting``: each method's seconds per update and its update count (stored). ``bold-kl`` is timed
    with a positive weight (the regularizer's cost does not depend on it)."""
    path = out / "calibration" / f"{setting}.json"
    kl = KL_WEIGHTS[1] if setting == "bold-kl" else 0.0
    expected = {"settings": asdict(settings), "setting": setting, "kl_weight": kl}
    if (stored := stored_record(path, expected)) is not None:
        return stored
    seconds = {}
    for method in METHODS:
        folder = out / "calibration" / setting / method
        config = settings.config(setting, method, TUNING_SEED, LRS[1], settings.calibration_updates, folder, kl)
        finetune(replace(config, eval_every=0), progress=False)
        seconds[method] = steady_seconds(_metrics(folder))
    budget = settings.budget_updates * seconds["sdo"]
    counts = {m: max(2, math.floor(budget / s * (1 + 1e-9))) for m, s in seconds.items()}
    record = {**expected, "seconds_per_update": seconds, "updates": counts, "budget_seconds": budget}
    save_result({**record, "machine": this_machine(), "commit": source_commit()}, path)
    return record


def run_method(
    out: Path, setting: str, method: str, seed: int, lr: float, settings: FinetuneComparisonSettings, kl: float
) -> dict:
    """One ``sdo finetune`` run at its calibrated update count (stored; resumed from its checkpoint if cut short;
    a run stopped by a non-finite reward is recorded as such). Tuning runs (``TUNING_SEED``) live under
    ``tuning/<setting>/<method>-lr<lr>-kl<kl>/``, reported ones under ``runs/<setting>/<method>-s<seed>/``."""
    path = _record_path(out, setting, method, seed, lr, kl)
    folder = path.with_suffix("")
    steps = calibrate(out, setting, settings)["updates"][method]
    config = settings.config(setting, method, seed, lr, steps, folder, kl)
    expected = {"settings": asdict(settings), "config": _recorded(config)}
    if (stored := stored_record(path, expected)) is not None:
        return stored
    try:
        finetune(config, progress=False)
        record = {**expected, "metrics": _metrics(folder)}
    except NonFiniteRewardError as error:
        record = {**expected, "metrics": _metrics(folder), "failed": str(error).splitlines()[0]}
    save_result({**record, "machine": this_machine(), "commit": source_commit()}, path)
    return record


def final_eval_reward(record: dict) -> float:
    """The held-out reward at the run's last evaluation (-inf for a run stopped early)."""
    evaluations = [r for r in record["metrics"] if "eval_reward" in r]
    return evaluations[-1]["eval_reward"] if evaluations and "failed" not in record else -math.inf


def tune_lr(
    out: Path,
    method: str,
    settings: FinetuneComparisonSettings,
    grid: Sequence[float] | None = None,
    widenings: int | None = None,
) -> float:
    """Stage 2: ``method``'s lr on ``confidence``, ``TUNING_SEED`` (stored in ``tuning/<method>.json``) over
    ``grid`` (default ``LRS``) widened at most ``widenings`` times (default ``WIDENINGS``)."""
    path = _tuning_path(out, method)
    expected = {"settings": asdict(settings), "method": method}
    if (stored := stored_record(path, expected)) is None:
        run = partial(run_method, out, "confidence", method, TUNING_SEED, settings=settings, kl=0.0)
        search = widen(
            grid or LRS, lambda lr: final_eval_reward(run(lr=lr)), WIDENINGS if widenings is None else widenings
        )
        finals = {f"{lr:g}": finite_or_none(r) for lr, r in search.pop("finals").items()}
        stored = {**expected, **search, "finals": finals}
        save_result(stored, path)
    return stored["chosen"]


def tune_kl(out: Path, settings: FinetuneComparisonSettings) -> float:
    """Stage 2: the KL weight, ``sdo`` on ``bold`` at its tuned lr, ``TUNING_SEED`` (``tuning/kl.json``): the
    largest final held-out reward among the weights that keep the judge at ``JUDGE_BAR``; while none does, the grid
    goes on past its largest weight by its last spacing (at most ``KL_WIDENINGS`` more; then the largest weight)."""
    path = out / "tuning" / "kl.json"
    lr = tune_lr(out, "sdo", settings)
    expected = {"settings": asdict(settings), "lr": lr}
    stored = stored_record(path, expected)
    if stored is None or (not stored["held"] and len(stored["finals"]) < len(KL_WEIGHTS) + KL_WIDENINGS):
        run = partial(run_method, out, "bold-kl", "sdo", TUNING_SEED, lr, settings)
        runs = {w: run(kl=w) for w in KL_WEIGHTS}
        while not any(map(_holds_judge, runs.values())) and len(runs) < len(KL_WEIGHTS) + KL_WIDENINGS:
            weight = max(runs) + KL_WEIGHTS[-1] - KL_WEIGHTS[-2]
            runs[weight] = run(kl=weight)
        held = [w for w, r in runs.items() if _holds_judge(r)]
        chosen = max(held, key=lambda w: final_eval_reward(runs[w])) if held else max(runs)
        finals = {f"{w:g}": finite_or_none(final_eval_reward(r)) for w, r in runs.items()}
        stored = {**expected, "chosen": chosen, "held": held, "finals": finals}
        save_result(stored, path)
    return stored["chosen"]


def _holds_judge(record: dict) -> bool:
    evaluations = [r for r in record["metrics"] if "judge_accuracy" in r]
    return bool(evaluations) and "failed" not in record and all(r["judge_accuracy"] >= JUDGE_BAR for r in evaluations)


def run_all(
    out: Path, settings: FinetuneComparisonSettings, seeds: Sequence[int] = REPORTED_SEEDS, jobs: int = 1
) -> None:
    """Every calibration (timed, alone), tuning, then every method on every setting and seed (the order makes
    partial results useful), the untimed stages ``jobs`` runs at a time (module docstring)."""
    for setting in SETTINGS:
        calibrate(out, setting, settings)
    _run_specs(out, settings, [("confidence", m, TUNING_SEED, lr, 0.0) for m in METHODS for lr in LRS], jobs)
    tune = partial(tune_lr, out, settings=settings, grid=LRS, widenings=WIDENINGS)
    in_workers(tune, [m for m in METHODS if not _tuning_path(out, m).exists()], jobs)
    lrs = {method: tune(method) for method in METHODS}
    _run_specs(out, settings, [("bold-kl", "sdo", TUNING_SEED, lrs["sdo"], w) for w in KL_WEIGHTS], jobs)
    kl = tune_kl(out, settings)
    runs = [
        (setting, method, seed, lrs[method], kl if setting == "bold-kl" else 0.0)
        for setting in SETTINGS
        for seed in seeds
        for method in METHODS
    ]
    _run_specs(out, settings, runs, jobs)


def _run_specs(out: Path, settings: FinetuneComparisonSettings, specs: list[tuple], jobs: int) -> None:
    """``run_method`` on each (setting, method, seed, lr, kl): the stored ones first (loaded, so that one made with
    other settings is refused before anything runs), then the others ``jobs`` at a time."""
    stored = [spec for spec in specs if _record_path(out, *spec).exists()]
    for spec in stored:
        _run_spec(out, settings, spec)
    in_workers(partial(_run_spec, out, settings), [spec for spec in specs if spec not in stored], jobs)


def _run_spec(out: Path, settings: FinetuneComparisonSettings, spec: tuple) -> None:
    setting, method, seed, lr, kl = spec
    run_method(out, setting, method, seed, lr, settings, kl)


def _tuning_path(out: Path, method: str) -> Path:
    """Where ``tune_lr`` stores ``method``'s lr search."""
    return out / "tuning" / f"{method}.json"


def _record_path(out: Path, setting: str, method: str, seed: int, lr: float, kl: float) -> Path:
    """Where ``run_method`` stores a run's record."""
    name = f"{method}-lr{lr:g}-kl{kl:g}" if seed == TUNING_SEED else f"{method}-s{seed}"
    return out / ("tuning" if seed == TUNING_SEED else "runs") / setting / f"{name}.json"


def _recorded(config: FinetuneConfig) -> dict:
    return {k: v for k, v in asdict(config).items() if k != "out"}
