"""The paper's comparison on the embedded model, done fairly: every estimator at its best, honest time accounting
(``benchmarks/compare_estimators.py`` runs it; ``sdo.app.report.comparison`` makes its tables).

Stages (each result is stored as soon as it exists; a rerun skips what is stored, so a run may span sessions):

1. **Tuning** (``OUT/sweep/``): every variant's one knob (Adam's lr; DOODL's lr; FreeDoM's scale) is swept over 3
   values on the class task, initial-noise protocol, seed 0, ``sweep_iters`` iterations; the value with the highest
   final reward is kept. Untimed: only rewards are compared, so the sweep may run on a loaded machine.
2. **Cases** (``OUT/cases/<task>-<protocol>-s<seed>/<variant>.json`` and ``.safetensors``): for each task, protocol
   (``noise``: the initial noise; ``edit``: the latent at ``late_step`` after a no-grad warm-up) and seed, every
   variant starts from the same latent and the variants take turns iteration by iteration in one process
   (``sdo.app.comparison``). Timed: run nothing else on the machine.

Time accounting is the engine's (``sdo.app.comparison``): iterate k is credited at t_k, the training time through
update k, with the reward the next iteration's forward pass measured (the final iterate's from one untimed
evaluation). A FreeDoM variant is one guided pass: its guided sample is credited at the pass's time (the median of
``FREEDOM_PASSES`` identical passes, interleaved with the other variants' first iterations).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sdo.app.comparison import (
    credited_iterates,
    interleave,
    save_result,
    source_commit,
    stored_record,
    this_machine,
)
from sdo.app.tasks.latent import LatentTask, LatentTaskConfig, build_task, task_problem
from sdo.doodl import scaled_clip
from sdo.io import load_json
from sdo.methods import METHODS, MethodOptions

__all__ = [
    "PROTOCOLS",
    "TASKS",
    "VARIANTS",
    "Case",
    "Settings",
    "Variant",
    "VariantRun",
    "case_config",
    "case_list",
    "chosen_value",
    "method_options",
    "recorded_options",
    "run_alone",
    "run_case",
    "run_sweep",
    "sweep_path",
    "sweep_result",
]

ADAM_LRS = (0.025, 0.05, 0.1)
"""Adam learning rates swept for every gradient-mode variant (the CLI's default, 0.05, in the middle)."""
DOODL_LRS = (0.1, 1.0, 10.0)
"""DOODL's gradient scale before its element-wise clip (the clip bounds each move, so the scale is swept wide)."""
FREEDOM_SCALES = (0.1, 0.3, 1.0)
"""FreeDoM's guidance step as a fraction of the solver update."""
FREEDOM_PASSES = 3
"""Identical guided passes per FreeDoM variant; the median of their times is the variant's time."""
TASKS = ("class", "style", "adversarial")
PROTOCOLS = ("noise", "edit")


@dataclass(frozen=True)
class Variant:
    """One row of the comparison: a registry method, its fixed options, and the one knob tuned by the sweep.

    ``tuned_as``: take the tuned value of that variant instead of sweeping (``checkpointed`` computes the same
    gradient as ``full``, so the same iterates; ``freedom-tt`` is ``freedom`` with time travel).
    """

    method: str
    knob: str
    grid: tuple[float, ...]
    fixed: dict = field(default_factory=dict)
    tuned_as: str | None = None


VARIANTS: dict[str, Variant] = {
    "sdo": Variant("sdo", "lr", ADAM_LRS),
    "sdo-last": Variant("sdo-last", "lr", ADAM_LRS),
    "sdo-multi": Variant("sdo-multi", "lr", ADAM_LRS),
    "full": Variant("full", "lr", ADAM_LRS),
    "checkpointed": Variant("checkpointed", "lr", ADAM_LRS, tuned_as="full"),
    "adjoint-0": Variant("adjoint", "lr", ADAM_LRS, {"adjoint_iters": 0}),
    "adjoint-2": Variant("adjoint", "lr", ADAM_LRS, {"adjoint_iters": 2}),
    "doodl": Variant("doodl", "doodl_lr", DOODL_LRS),
    "doodl-adam": Variant("doodl-adam", "lr", ADAM_LRS),
    "freedom": Variant("freedom", "freedom_scale", FREEDOM_SCALES),
    "freedom-tt": Variant("freedom", "freedom_scale", FREEDOM_SCALES, {"freedom_repeats": 3}, tuned_as="freedom"),
}


@dataclass(frozen=True)
class Case:
    """One (task, protocol, seed) of the comparison."""

    task: str
    protocol: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.task}-{self.protocol}-s{self.seed}"


@dataclass(frozen=True)
class Settings:
    """What every case shares (recorded beside each result; a stored result made with other settings is refused)."""

    steps: int = 50
    iters: int = 20
    batch: int = 2
    late_step: int = 40
    sweep_iters: int = 10

    def task_config(self, case: Case, method: str, iters: int | None = None) -> LatentTaskConfig:
        start = 0 if case.protocol == "noise" else self.late_step
        return case_config(case, method, steps=self.steps, iters=iters or self.iters, batch=self.batch, start=start)


def case_config(case: Case, method: str, *, steps: int, iters: int, batch: int, start: int) -> LatentTaskConfig:
    """The embedded-model run of ``method`` on ``case`` that the comparisons share: digits of class 3 steered to 8
    (``case.task``), ``steps`` sampling steps, the latent at step ``start``, ``case.seed``'s noise; nothing written."""
    return LatentTaskConfig(
        task=case.task,
        method=method,
        source=3,
        target=8,
        steps=steps,
        iters=iters,
        batch=batch,
        seed=case.seed,
        start_step=start,
        out="unused",
    )


def method_options(variant: Variant, value: float, iters: int) -> MethodOptions:
    """The registry options of ``variant`` with its knob at ``value``, for a run of ``iters`` iterations (DOODL's
    per-element clip scaled so that clip x iterations is the authors' 1e-3 x 50, ``sdo.doodl.scaled_clip``)."""
    options = MethodOptions("latent", **variant.fixed, **{variant.knob: value})
    return replace(options, doodl_clip=scaled_clip(iters)) if variant.method == "doodl" else options


class VariantRun:
    """One variant's run on one case: the registry's stepper, with iterates credited at their training time.

    ``method``: the registry name (default: ``VARIANTS[name].method``); ``measure``: record each iteration's extra
    memory (hooks inside the timed region; ``sdo.app.equal_time`` measures in a separate pass instead)."""

    def __init__(
        self,
        name: str,
        task: LatentTask,
        options: MethodOptions,
        config: LatentTaskConfig,
        method: str | None = None,
        measure: bool = True,
    ):
        self.name, self.task, self.options = name, task, options
        self.method = METHODS[method or VARIANTS[name].method]
        self.stepper = self.method.stepper(task_problem(config, task, measure), options, config.iters)
        self.guided = self.method.runner.one_pass
        self.rounds = FREEDOM_PASSES if self.guided else config.iters  # iterations this run takes in a case
        self.first_gradient: torch.Tensor | None = None

    def iterate(self) -> dict:
        """One iteration of the variant's stepper; its history record."""
        record = self.stepper.iterate()
        if self.first_gradient is None and self.stepper.gradient is not None:
            self.first_gradient = self.stepper.gradient.detach().flatten().double().clone()
        return record

    def finish(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """The stored record (iterates with t_k, reward_k, best_so_far_k, judge_k; memory; step seconds) and
        tensors."""
        history = self.stepper.history
        seconds = [r["seconds"] for r in history]
        result = self.stepper.finish()
        if self.guided:
            iterates = self._guided_iterates(seconds)
        else:
            evaluated = [*history[: len(seconds)], result.history[-1]]
            credited = credited_iterates(seconds, [r["reward"] for r in evaluated])
            iterates = [_iterate(k, t, r) for k, ((t, _), r) in enumerate(zip(credited, evaluated, strict=True))]
        record = {
            "variant": self.name,
            "method": self.method.name,
            "runs": self.method.runner.runs,
            "options": recorded_options(self.options),
            "iterates": iterates,
            "step_seconds": seconds,
            "peak_mem_bytes": max((r.get("peak_mem_bytes", 0) for r in history), default=0),
            "original_chain": self.task.notes.get("original_chain", "ddim"),
        }
        tensors = {"final_sample": result.sample.detach().float()}
        if self.first_gradient is not None and self.method.runner.exact_gradient:
            tensors["first_gradient"] = self.first_gradient
        return record, tensors

    def _guided_iterates(self, seconds: list[float]) -> list[dict]:
        """Iterate 0: the unguided sample (untimed evaluation); iterate 1: the guided one, at the median pass time."""
        with torch.no_grad():
            before = self.task.reward(self.task.original, None)
            judged = self.task.judge_accepts(self.task.original) if self.task.judge_accepts else None
        start = {"k": 0, "t": 0.0, "reward": float(before.mean()), "best_so_far": float(before.mean())}
        if judged is not None:
            start["judge_success"] = float(judged.float().mean())
        rewards = {round(r["reward"], 6) for r in self.stepper.history}
        if len(rewards) != 1:
            raise RuntimeError(f"{self.name}: identical guided passes gave different rewards {sorted(rewards)}")
        return [start, _iterate(1, statistics.median(seconds), self.stepper.history[-1])]


def _iterate(k: int, t: float, record: dict) -> dict:
    """Iterate k's stored entry: its credited time ``t``, reward, ``best_so_far`` and (with a judge) judge success."""
    entry = {"k": k, "t": t, "reward": record["reward"], "best_so_far": record["best_so_far"]}
    if "judge_success" in record:
        entry["judge_success"] = record["judge_success"]
    return entry


def chosen_value(out: Path, name: str) -> float:
    """The tuned knob value of variant ``name`` (from its stored sweep)."""
    variant = VARIANTS[name]
    if variant.tuned_as:
        return chosen_value(out, variant.tuned_as)
    finals = {value: sweep_result(out, name, value)["final_reward"] for value in variant.grid}
    return max(variant.grid, key=lambda value: finals[value])


def sweep_path(out: Path, name: str, value: float) -> Path:
    return out / "sweep" / f"{name}@{value:g}.json"


def sweep_result(out: Path, name: str, value: float) -> dict:
    path = sweep_path(out, name, value)
    if not path.exists():
        raise FileNotFoundError(f"no sweep result {path}; run this script on OUT first (the sweep is its stage 1).")
    return load_json(path)


def run_sweep(out: Path, settings: Settings, names: list[str], resources) -> None:
    """Stage 1: each variant's knob at each grid value on class/noise/seed 0 (stored per value, skipped if stored)."""
    case = Case("class", "noise", 0)
    todo = [(n, v) for n in names if not VARIANTS[n].tuned_as for v in VARIANTS[n].grid]
    for name, value in tqdm(todo, desc="sweep"):
        path = sweep_path(out, name, value)
        swept = {k: v for k, v in asdict(settings).items() if k in ("steps", "batch", "sweep_iters")}
        record = {"settings": swept, "case": asdict(case), "variant": name, "value": value}
        if stored_record(path, record) is not None:
            continue
        iterates = run_alone(name, value, case, settings.sweep_iters, settings, resources)["iterates"]
        record.update(final_reward=iterates[-1]["reward"], iterates=iterates)
        save_result(record, path)
        print(f"  sweep {name} {VARIANTS[name].knob}={value:g}: final reward {record['final_reward']:.3f}")


def run_alone(name: str, value: float, case: Case, iters: int, settings: Settings, resources) -> dict:
    """Variant ``name`` with its knob at ``value`` on ``case`` for ``iters`` iterations, not interleaved with others
    (untimed uses: the sweep, ``benchmarks/beyond_grid.py``): its record (``VariantRun.finish``)."""
    variant = VARIANTS[name]
    config = settings.task_config(case, variant.method, iters)
    run = VariantRun(name, build_task(config, resources), method_options(variant, value, iters), config)
    for _ in range(1 if run.guided else run.rounds):  # a guided pass is deterministic: one suffices
        run.iterate()
    return run.finish()[0]


def case_list(class_seeds: list[int], other_seeds: list[int]) -> list[Case]:
    """Seed 0 of every task first (both protocols), then the class task's other seeds."""
    first = [Case(t, p, s) for s in sorted(set(class_seeds) & set(other_seeds)) for t in TASKS for p in PROTOCOLS]
    rest = [
        Case(t, p, s)
        for t in TASKS
        for s in (class_seeds if t == "class" else other_seeds)
        for p in PROTOCOLS
        if Case(t, p, s) not in first
    ]
    return first + rest


def run_case(out: Path, settings: Settings, case: Case, names: list[str], resources) -> None:
    """Stage 2 for one case: the variants not yet stored, interleaved iteration by iteration, then stored."""
    folder = out / "cases" / case.key
    runs = []
    for name in names:
        variant = VARIANTS[name]
        options = method_options(variant, chosen_value(out, name), settings.iters)
        expected = {"settings": asdict(settings), "case": asdict(case), "options": recorded_options(options)}
        if stored_record(folder / f"{name}.json", expected) is not None:
            continue
        config = settings.task_config(case, variant.method)
        runs.append(VariantRun(name, build_task(config, resources), options, config))
    if not runs:
        return
    interleave(runs, case.key, postfix=lambda run: {"variant": run.name})
    for run in runs:
        record, tensors = run.finish()
        record.update(settings=asdict(settings), case=asdict(case), machine=this_machine(), commit=source_commit())
        save_result(record, folder / f"{run.name}.json", tensors)
        finals = record["iterates"][-1]
        print(f"  {case.key} {run.name}: {record['iterates'][0]['reward']:.3f} -> {finals['reward']:.3f}")


def recorded_options(options: MethodOptions) -> dict:
    """``options`` as a stored result records them (every field but the generator), for the resume check."""
    return {k: v for k, v in asdict(options).items() if k != "generator"}
