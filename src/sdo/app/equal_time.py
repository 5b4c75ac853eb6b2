"""The fair comparison at equal time, tuned on a seed that is never reported (issue 28; the first protocol is
``sdo.app.fair_comparison``). ``benchmarks/compare_equal_time.py`` runs it; ``sdo.app.report.equal_time`` makes its
tables.

Every result is stored as soon as it exists and a rerun continues where the last one stopped (a stored result made
with other settings is refused), so the whole run may span sessions. For each task and protocol (``noise``: the
initial noise; ``edit``: the latent at ``late_step`` after a no-grad warm-up):

1. **Calibration** (``<case>/calibration.json``, timed): every variant's seconds per iteration on the case (median of
   ``calibration_iters`` interleaved iterations but the first, which also pays one-time costs; no memory hooks).
   The budget is ``full``'s ``full_iters`` iterations, T = ``full_iters`` x s_full; variant v runs
   n_v = max(1, floor(T / s_v)) iterations. The counts are stored with the case, so a rerun is exact. Variants
   added after a case was calibrated are timed beside ``full`` again and put on the stored clock (their seconds
   scaled by stored s_full / new s_full; the record lists each such extension).
2. **Tuning** (``tuning/<task>-<protocol>/``, untimed: only final rewards are compared) on ``TUNING_SEED``, at the
   evaluation horizon n_v: each tuned variant's knob over its grid, widened one value at a time past an edge until
   the chosen value is interior (``widen``). ``per_pair`` variants are tuned on every (task, protocol), the others
   on the class task's and take its choice; ``adjoint-0`` and ``doodl-adam`` take ``full``'s schedule (the better
   tuned of ``full`` and ``full-cosine`` there).
3. **Cases** (``cases/<task>-<protocol>-s<seed>/<variant>.json`` and ``.safetensors``, timed): the variants take
   turns iteration by iteration (``sdo.app.comparison.interleave``), each for its n_v iterations, without memory
   hooks; iterate k is credited at t_k, its measured training time. ``checkpointed`` computes ``full``'s gradient,
   so it is not run: ``full``'s iterates are credited at t_k x s_checkpointed / s_full (calibrated), those within
   ``full``'s training time. Then an untimed **memory pass**: one
   measured iteration per variant (``peak_mem_bytes``).
4. **The authors' setting** (``cases/class-authors-<start>-s<seed>/``): ``sdo`` and ``full`` with the authors'
   Adam (lr 0.01, betas (0.9, 0.9), no shell projection, constant lr), ``authors_iters`` iterations, from the noise
   and from step ``authors_late_step``; timed, not budgeted.

The fallbacks the issue names for a goal no schedule met (issue 28): ``sdo-beta2`` (Adam's beta2 0.999, whose
step shrinks with the gradient: v_hat averages about 1000 squared gradients instead of 10) and ``sdo-then-exact``
(SDO until ``PATIENCE`` iterations without a new best-so-far, then ``checkpointed``'s exact gradient, flat memory,
with the same Adam state; it spends the budget by the calibrated seconds of each phase, so its horizon is
deterministic) and ``sdo-coarse-to-fine``. ``run_all`` runs them (``FALLBACKS``) after every other variant's tuning
and cases, so the tables fill first.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cache, partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sdo.app.comparison import in_workers, interleave, save_result, source_commit, this_machine
from sdo.app.comparison import stored_record as engine_record
from sdo.app.fair_comparison import Case, VariantRun, case_config, recorded_options
from sdo.app.tasks.latent import LatentTaskConfig, TaskResources, build_task, load_resources
from sdo.errors import NonFiniteRewardError
from sdo.freedom import FreedomSettings
from sdo.gradients import NoGrad
from sdo.io import load_json
from sdo.latent import LatentProblem
from sdo.methods import METHODS, MethodOptions, TruncationSettings

__all__ = [
    "AUTHORS",
    "PROTOCOLS",
    "REPORTED_SEEDS",
    "TASKS",
    "TUNING_SEED",
    "VARIANTS",
    "EqualTimeSettings",
    "Variant",
    "calibrate",
    "chosen",
    "finite_or_none",
    "iteration_counts",
    "run_all",
    "run_authors",
    "run_case",
    "steady_seconds",
    "stored_record",
    "tune_pair",
    "widen",
]

TASKS = ("class", "style", "adversarial")
PROTOCOLS = ("noise", "edit")
TUNING_SEED = 100
"""The one seed tuning runs on; never reported."""
REPORTED_SEEDS = (0, 1, 2)
ADAM_LRS = (0.025, 0.05, 0.1)
FREEDOM_SCALES = (0.1, 0.3, 1.0)
WIDENINGS = 6
"""At most this many values past a grid's edge; a choice still at the edge then is reported as such (3 until the
class/edit tuning of ``full`` and ``full-cosine`` ended at the edge, lr 0.8: a stored search still at its edge with
fewer values than now allowed continues, its stored values reused)."""
CLOSE = 0.01
"""A chosen value whose outward neighbour's final reward is within this fraction of its own is flagged."""
PATIENCE = 3
"""``sdo-then-exact`` takes the exact gradient after this many iterations without a new best-so-far."""
EXACT = "checkpointed"
"""The exact gradient ``sdo-then-exact`` switches to: ``full``'s, each step recomputed (flat memory)."""


@dataclass(frozen=True)
class Variant:
    """One row: a registry ``method`` with ``fixed`` options (``MethodOptions`` fields) and one tuned ``knob``.

    Attributes:
        grid: the knob's starting grid (geometric: ``widen`` extends it by the same ratio). Empty: nothing tuned
            (the knob keeps its default).
        per_pair: tuned on every (task, protocol); else on the class task's, and every task takes its choice.
        schedule_of: take the ``lr_schedule`` of the better tuned of these variants (on the class task's tuning).
        credited_from: not run; this variant's iterates are those of the named one, credited at this one's time.
        protocols: where it runs.
        then_exact: SDO until ``PATIENCE`` iterations without a new best-so-far, then ``EXACT``'s gradient.
        coarse_to_fine: from the noise for half the budget, then from the latent at ``late_step`` for the rest
            (``CoarseToFineRun``).
    """

    method: str
    knob: str = "lr"
    grid: tuple[float, ...] = ADAM_LRS
    fixed: dict = field(default_factory=dict)
    per_pair: bool = False
    schedule_of: tuple[str, ...] = ()
    credited_from: str | None = None
    protocols: tuple[str, ...] = PROTOCOLS
    then_exact: bool = False
    coarse_to_fine: bool = False


COSINE = {"lr_schedule": "cosine"}
FREEDOM_OFFICIAL = {"freedom_schedule": "official", "freedom_repeats": FreedomSettings.official_repeats}
ADJOINT_0 = {"adjoint_iters": 0, "adjoint_checkpoint_every": 5}  # the README's recommended adjoint
VARIANTS: dict[str, Variant] = {
    "sdo": Variant("sdo", per_pair=True),
    "sdo-cosine": Variant("sdo", fixed=COSINE, per_pair=True),
    "sdo-multi-cosine": Variant("sdo-multi", fixed=COSINE, per_pair=True),
    "sdo-beta2": Variant("sdo", fixed={"betas": (0.9, 0.999)}, per_pair=True),
    "sdo-then-exact": Variant("sdo", per_pair=True, then_exact=True),
    "sdo-coarse-to-fine": Variant("sdo", per_pair=True, protocols=("noise",), coarse_to_fine=True),
    "full": Variant("full", per_pair=True),
    "full-cosine": Variant("full", fixed=COSINE, per_pair=True),
    "checkpointed": Variant("checkpointed", credited_from="full"),
    "adjoint-0": Variant("adjoint", fixed=ADJOINT_0, schedule_of=("full", "full-cosine")),
    "doodl-adam": Variant("doodl-adam", schedule_of=("full", "full-cosine")),
    "freedom": Variant("freedom", knob="freedom_scale", grid=FREEDOM_SCALES),
    "freedom-official": Variant("freedom", grid=(), fixed=FREEDOM_OFFICIAL, protocols=("noise",)),
}
FALLBACKS = ("sdo-beta2", "sdo-then-exact", "sdo-coarse-to-fine")
"""The goal's fallbacks (issue 28, item 4): ``run_all`` runs them after every kept variant's cases, so the tables the
issue asks for fill first."""
PASSES = ("kept", "fallbacks")
"""``run_all``'s passes: every variant but the ``FALLBACKS``, then the ``FALLBACKS``."""
AUTHORS = {"lr": 0.01, "betas": (0.9, 0.9), "project_to_shell": False, "lr_schedule": "constant"}
"""The authors' Adam (their official code): the rows ``sdo-authors`` and ``full-authors``."""


@dataclass(frozen=True)
class EqualTimeSettings:
    """What every case shares (recorded beside each result; a stored result made with other settings is refused)."""

    steps: int = 50
    full_iters: int = 20
    batch: int = 2
    late_step: int = 40
    calibration_iters: int = 3
    authors_iters: int = 100
    authors_late_step: int = 45

    def task_config(self, case: Case, method: str, iters: int) -> LatentTaskConfig:
        """The run of ``method`` for ``iters`` iterations on ``case`` (the authors' protocols start at step 0 or
        ``authors_late_step``)."""
        starts = {"noise": 0, "edit": self.late_step, "authors-noise": 0, "authors-edit": self.authors_late_step}
        return case_config(case, method, steps=self.steps, iters=iters, batch=self.batch, start=starts[case.protocol])


def options_of(name: str, value: float | None = None, schedule: str | None = None) -> MethodOptions:
    """The registry options of variant ``name``: its fixed options, its knob at ``value`` (None: the default) and,
    for a ``schedule_of`` variant, that ``schedule``."""
    variant = VARIANTS[name]
    options = MethodOptions("latent", **variant.fixed)
    if value is not None and variant.grid:
        options = replace(options, **{variant.knob: value})
    return replace(options, lr_schedule=schedule) if schedule else options


def _run(
    name: str,
    options: MethodOptions,
    case: Case,
    iters: int,
    settings: EqualTimeSettings,
    resources: TaskResources,
    measure: bool = False,
    method: str | None = None,
    calibration: dict | None = None,
) -> VariantRun:
    """Variant ``name``'s run on ``case`` (``method``: its registry method, default the variant's). A
    ``then_exact`` variant given the case's ``calibration`` is a ``ThenExactRun``, a ``coarse_to_fine`` one a
    ``CoarseToFineRun`` (without one, plain SDO from the case's start: their calibration and memory pass)."""
    method = method or VARIANTS[name].method
    config = settings.task_config(case, method, iters)
    task = build_task(config, resources)
    variant = VARIANTS.get(name, VARIANTS["sdo"])
    if variant.then_exact and calibration is not None:
        return ThenExactRun(name, task, options, config, calibration, settings)
    if variant.coarse_to_fine and calibration is not None:
        return CoarseToFineRun(name, task, options, config, calibration, settings)
    return VariantRun(name, task, options, config, method, measure)


class ThenExactRun(VariantRun):
    """``sdo-then-exact``: SDO's gradient until ``PATIENCE`` iterations in a row bring no new best-so-far, then
    ``EXACT``'s (the same Adam state goes on). Each iteration spends its phase's calibrated seconds (s_v, then
    s_checkpointed) of the budget T = ``full_iters`` x s_full; the run stops before an iteration that would exceed
    it, so tuning and the timed case take the same iterations."""

    def __init__(self, name, task, options, config, calibration: dict, settings: EqualTimeSettings):
        super().__init__(name, task, options, config, VARIANTS[name].method, measure=False)
        seconds = calibration["seconds_per_iteration"]
        self.costs = dict(zip((False, True), phase_seconds(name, seconds), strict=True))
        self.budget = settings.full_iters * seconds["full"] * (1 + 1e-9)
        self.spent, self.switched_at = 0.0, None

    def iterate(self) -> dict:
        self.spent += self.costs[self.switched_at is not None]
        record = super().iterate()
        history = self.stepper.history
        if self.switched_at is None and stalled(history, PATIENCE):
            self.stepper.grad = METHODS[EXACT].mode(self.options)
            self.switched_at = len(history)
        if self.spent + self.costs[self.switched_at is not None] > self.budget:
            self.rounds = len(history)
        return record

    def finish(self) -> tuple[dict, dict]:
        record, tensors = super().finish()
        record.update(switched_at=self.switched_at, patience=PATIENCE, exact=EXACT)
        return record, tensors


def stalled(history: Sequence[dict], patience: int) -> bool:
    """Whether the last ``patience`` iterations of ``history`` brought no new best-so-far (``best_so_far``, the
    batch mean of each sample's best reward, never decreases)."""
    return len(history) > patience and history[-1]["best_so_far"] <= history[-1 - patience]["best_so_far"]


def phase_seconds(name: str, seconds: dict[str, float]) -> tuple[float, float]:
    """``(s1, s2)``: the calibrated seconds of variant ``name``'s iterations before and after its switch
    (``switched_at``): s_v then s_checkpointed for ``then_exact``, s_v then its second phase's (``late_key``) for
    ``coarse_to_fine``, s_v throughout otherwise (a run outside ``VARIANTS``: the authors' rows)."""
    variant = VARIANTS.get(name)
    if variant is not None and variant.then_exact:
        return seconds[name], seconds[EXACT]
    if variant is not None and variant.coarse_to_fine:
        return seconds[name], seconds[late_key(name)]
    return seconds[name], seconds[name]


LATE = "@late"
"""The suffix of a ``coarse_to_fine`` variant's second-phase calibration entry (``late_key``)."""


def late_key(name: str) -> str:
    """The calibration entry of a ``coarse_to_fine`` variant's second phase: its seconds per iteration from the
    latent at ``late_step``."""
    return f"{name}{LATE}"


def coarse_to_fine_counts(name: str, seconds: dict[str, float], settings: EqualTimeSettings) -> tuple[int, int]:
    """``(n1, n2)``: n1 = max(1, floor(T / 2 / s1)) iterations from the noise, then n2 = floor((T - n1 s1) / s2) from
    the latent at ``late_step``, with T = ``full_iters`` x s_full and s1, s2 the phases' calibrated seconds."""
    budget = settings.full_iters * seconds["full"] * (1 + 1e-9)
    first, second = phase_seconds(name, seconds)
    coarse = max(1, math.floor(budget / 2 / first))
    return coarse, max(0, math.floor((budget - coarse * first) / second))


class CoarseToFineRun(VariantRun):
    """``sdo-coarse-to-fine`` (noise protocol): SDO from the noise for n1 iterations (half the budget at its
    calibrated seconds), then a no-grad pass of the current latent to ``late_step`` and SDO from that latent (the same
    options, a fresh Adam) for the n2 iterations the rest of the budget buys at the second phase's calibrated seconds
    (``coarse_to_fine_counts``). The final latent is at ``late_step``: it replays with ``start_step=late_step``.

    The history joins the phases (``_PhasedStepper``): the second phase's first record evaluates the first phase's
    last latent, and best-so-far is each sample's best over both."""

    def __init__(self, name, task, options, config, calibration: dict, settings: EqualTimeSettings):
        super().__init__(name, task, options, config, VARIANTS[name].method, measure=False)
        self.coarse, fine = coarse_to_fine_counts(name, calibration["seconds_per_iteration"], settings)
        self.rounds = self.coarse + fine
        self.late_step, self.seed, self.switched_at = settings.late_step, config.seed, None
        self.stepper = _PhasedStepper(self.stepper)

    def iterate(self) -> dict:
        record = super().iterate()
        if self.switched_at is None and len(self.stepper.history) == self.coarse < self.rounds:
            self._switch()
        return record

    def _switch(self) -> None:
        sampler = self.task.sampler
        with torch.no_grad():
            late = sampler.sample(self.stepper.current.latent.detach(), NoGrad(), stop_step=self.late_step)
        problem = LatentProblem(
            sampler, late, self.task.reward, start_step=self.late_step, seed=self.seed, judge=self.task.judge_accepts
        )
        self.stepper.current = self.method.stepper(problem, self.options, self.rounds - self.coarse)
        self.switched_at = self.coarse

    def finish(self) -> tuple[dict, dict]:
        record, tensors = super().finish()
        record.update(switched_at=self.switched_at, late_step=self.late_step)
        return record, tensors


class _PhasedStepper:
    """A latent stepper whose ``current`` stepper may be replaced between iterations: one joined ``history``, with
    ``best_so_far`` the batch mean of each sample's best reward over every phase."""

    def __init__(self, first) -> None:
        self.current, self.history, self.best = first, [], None

    @property
    def gradient(self) -> torch.Tensor | None:
        return self.current.gradient

    def _joined(self, record: dict) -> dict:
        rewards = torch.tensor(record["rewards"], dtype=torch.float64)
        self.best = rewards if self.best is None else torch.maximum(self.best, rewards)
        return {**record, "best_so_far": float(self.best.mean())}

    def iterate(self) -> dict:
        record = self._joined(self.current.iterate())
        self.history.append(record)
        return record

    def finish(self):
        result = self.current.finish()
        best = self.best
        final = self._joined(result.history[-1])
        self.best = best
        return replace(result, history=[*self.history, final])


def take_rounds(run: VariantRun, description: str) -> None:
    """Iterate ``run`` until it has taken its rounds (a guided pass: one; ``ThenExactRun`` may lower them)."""
    with tqdm(total=1 if run.guided else run.rounds, desc=description, leave=False) as bar:
        while len(run.stepper.history) < (1 if run.guided else run.rounds):
            run.iterate()
            bar.update()


def calibrate(out: Path, case: Case, settings: EqualTimeSettings, resources: TaskResources) -> dict:
    """Stage 1 on ``case``: each variant's median seconds per iteration (and a ``coarse_to_fine`` variant's second
    phase's, ``late_key``) and its iteration count (stored; a rerun reads them). Variants the stored record lacks are
    timed beside ``full`` and put on its clock (an extension)."""
    path = out / "cases" / case.key / "calibration.json"
    expected = {"settings": asdict(settings), "case": asdict(case)}
    names = [n for n in VARIANTS if case.protocol in VARIANTS[n].protocols]
    stored = stored_record(path, expected)
    names += [late_key(n) for n in names if VARIANTS[n].coarse_to_fine]  # their second phase's timing
    if stored is not None and set(names) <= stored["seconds_per_iteration"].keys():
        return stored
    missing = [n for n in names if stored is None or n not in stored["seconds_per_iteration"]]
    timed = missing if stored is None else ["full", *missing]
    runs = [_calibration_run(n, case, settings, resources) for n in timed]
    for run in runs:
        run.rounds = 1 if run.guided else settings.calibration_iters
    interleave(runs, f"calibrate {case.key}")
    seconds = {run.name: steady_seconds(run.stepper.history) for run in runs}
    if stored is None:
        record = {**expected, "seconds_per_iteration": seconds, "machine": this_machine(), "commit": source_commit()}
    else:
        scale = stored["seconds_per_iteration"]["full"] / seconds.pop("full")
        extension = {"variants": missing, "full_seconds_ratio": scale, "commit": source_commit()}
        record = {**stored, "extensions": [*stored.get("extensions", []), extension]}
        record["seconds_per_iteration"] = {
            **stored["seconds_per_iteration"],
            **{n: s * scale for n, s in seconds.items()},
        }
    record["iterations"] = iteration_counts(record["seconds_per_iteration"], settings)
    save_result(record, path)
    return record


def _calibration_run(key: str, case: Case, settings: EqualTimeSettings, resources: TaskResources) -> VariantRun:
    """The run timing calibration entry ``key``: a variant from the case's start, or (``late_key``) a
    ``coarse_to_fine`` variant's second phase, SDO from the same seed's latent at ``late_step``."""
    name, late = key.removesuffix(LATE), key.endswith(LATE)
    where = replace(case, protocol="edit") if late else case
    run = _run(name, options_of(name), where, settings.calibration_iters, settings, resources)
    run.name = key
    return run


def steady_seconds(history: list[dict]) -> float:
    """The median ``seconds`` of the records of ``history`` after the first (which also pays one-time costs:
    allocations, caches); the first alone when it is the only one."""
    return statistics.median(record["seconds"] for record in history[1:] or history)


def iteration_counts(seconds: dict[str, float], settings: EqualTimeSettings) -> dict[str, int]:
    """n_v = max(1, floor(T / s_v)) with T = ``full_iters`` x s_full (a one-pass method: 1; a ``coarse_to_fine``
    variant: n1 + n2 of ``coarse_to_fine_counts``)."""
    budget = settings.full_iters * seconds["full"]
    counts = {
        name: 1 if METHODS[VARIANTS[name].method].runner.one_pass else max(1, math.floor(budget / s * (1 + 1e-9)))
        for name, s in seconds.items()
        if name in VARIANTS
    }
    for name in counts:
        if VARIANTS[name].coarse_to_fine and late_key(name) in seconds:
            counts[name] = sum(coarse_to_fine_counts(name, seconds, settings))
    return counts


def widen(grid: Sequence[float], final_reward: Callable[[float], float], widenings: int = WIDENINGS) -> dict:
    """The grid search with widening: every value of ``grid`` (geometric), then, while the best is at an edge, the
    next value past it (at most ``widenings``). Returns ``{"finals": {value: reward}, "chosen": value, "edge":
    bool (still at an edge), "close": bool (a neighbour within ``CLOSE``)}``."""
    finals = {value: final_reward(value) for value in grid}
    ratio = grid[1] / grid[0]
    for _ in range(widenings + 1):
        values = sorted(finals)
        best = max(values, key=finals.__getitem__)
        if best not in (values[0], values[-1]) or len(finals) >= len(grid) + widenings:
            break
        outward = best * ratio if best == values[-1] else best / ratio
        finals[round(outward, 12)] = final_reward(round(outward, 12))
    values = sorted(finals)
    best = max(values, key=finals.__getitem__)
    neighbours = [finals[v] for v in values if v != best and abs(math.log(v / best)) <= math.log(ratio) * 1.0001]
    close = any(abs(finals[best] - n) <= CLOSE * abs(finals[best]) for n in neighbours)
    return {"finals": finals, "chosen": best, "edge": best in (values[0], values[-1]), "close": close}


def tuned_here(name: str, task: str, protocol: str) -> bool:
    """Whether variant ``name`` is tuned on (task, protocol)."""
    variant = VARIANTS[name]
    tuned = variant.grid and not variant.credited_from and protocol in variant.protocols
    return bool(tuned) and (variant.per_pair or task == "class")


def tuning_path(out: Path, task: str, protocol: str, name: str) -> Path:
    return out / "tuning" / f"{task}-{protocol}" / f"{name}.json"


def tune_pair(
    out: Path,
    task: str,
    protocol: str,
    settings: EqualTimeSettings,
    resources: TaskResources,
    variants: Collection[str] = tuple(VARIANTS),
    jobs: int = 1,
) -> None:
    """Stage 2 on (task, protocol): calibrate the tuning case (timed, alone), then tune each of ``variants`` tuned
    here (each value's run stored under ``tuning/<task>-<protocol>/values/``, each variant's choice beside it). The
    runs are untimed: with ``jobs`` > 1 every grid value not yet stored runs first, ``jobs`` at a time
    (``sdo.app.comparison.in_workers``); the widening past an edge follows in this process."""
    case = Case(task, protocol, TUNING_SEED)
    calibration = calibrate(out, case, settings, resources)
    names = [n for n in VARIANTS if n in variants and tuned_here(n, task, protocol)]
    if jobs > 1:
        _tune_grids_in_workers(out, case, names, calibration, settings, jobs)
    for name in names:
        schedule = _schedule(out, name, protocol)
        expected = {"settings": asdict(settings), "case": asdict(case), "variant": name, "schedule": schedule}
        path = tuning_path(out, task, protocol, name)
        stored = stored_record(path, expected)
        if stored is not None and not _may_widen(stored, VARIANTS[name].grid):
            continue
        run_value = partial(
            _tuning_run,
            out,
            case,
            name,
            schedule=schedule,
            calibration=calibration,
            settings=settings,
            resources=resources,
        )
        search = widen(VARIANTS[name].grid, run_value, WIDENINGS)
        finals = {f"{value:g}": finite_or_none(reward) for value, reward in search.pop("finals").items()}
        iterations = calibration["iterations"][name]
        save_result({**expected, "iterations": iterations, **search, "finals": finals}, path)
        print(f"  tuned {case.key} {name}: {VARIANTS[name].knob}={search['chosen']:g}")


def _tune_grids_in_workers(
    out: Path, case: Case, names: list[str], calibration: dict, settings: EqualTimeSettings, jobs: int
) -> None:
    """The grid values of ``names`` whose run is not stored (variants taking another's schedule wait for it)."""
    pending = [
        (name, value)
        for name in names
        if not VARIANTS[name].schedule_of
        for value in VARIANTS[name].grid
        if not _value_path(out, case, name, value).exists()
    ]
    in_workers(partial(_worker_tuning_run, out, case, calibration=calibration, settings=settings), pending, jobs)


def _worker_tuning_run(
    out: Path, case: Case, item: tuple[str, float], *, calibration: dict, settings: EqualTimeSettings
) -> None:
    name, value = item
    schedule = _schedule(out, name, case.protocol)
    resources = shared_resources(settings)
    _tuning_run(
        out, case, name, value, schedule=schedule, calibration=calibration, settings=settings, resources=resources
    )


@cache
def shared_resources(settings: EqualTimeSettings) -> TaskResources:
    """The networks every task of the comparison uses, loaded once per process."""
    return load_resources(settings.task_config(Case("class", "noise", 0), "sdo", 1))


def _value_path(out: Path, case: Case, name: str, value: float) -> Path:
    return out / "tuning" / f"{case.task}-{case.protocol}" / "values" / f"{name}@{value:g}.json"


def _may_widen(stored: dict, grid: Sequence[float]) -> bool:
    """Whether a stored search ended at its grid's edge with fewer values than ``WIDENINGS`` allows now."""
    return bool(stored.get("edge")) and len(stored["finals"]) < len(grid) + WIDENINGS


def finite_or_none(reward: float) -> float | None:
    """A final reward as JSON stores it: None for a run stopped by a non-finite reward (``-inf`` in the search)."""
    return reward if math.isfinite(reward) else None


def _tuning_run(out, case, name, value, *, schedule, calibration, settings, resources) -> float:
    """One value's untimed run at the evaluation horizon; its final reward (stored, skipped if stored)."""
    path = _value_path(out, case, name, value)
    options = options_of(name, value, schedule)
    expected = {"settings": asdict(settings), "case": asdict(case), "options": recorded_options(options)}
    stored = stored_record(path, expected)
    if stored is None:
        run = _run(name, options, case, calibration["iterations"][name], settings, resources, calibration=calibration)
        try:
            take_rounds(run, f"tune {case.key} {name}@{value:g}")
            stored = {**expected, "iterates": run.finish()[0]["iterates"]}
        except NonFiniteRewardError as error:  # a value too large for the run: it loses, the tuning goes on
            stored = {**expected, "iterates": [], "failed": str(error).splitlines()[0]}
        save_result(stored, path)
    return stored["iterates"][-1]["reward"] if stored["iterates"] else -math.inf


def _schedule(out: Path, name: str, protocol: str) -> str | None:
    """The ``lr_schedule`` a ``schedule_of`` variant takes: that of the better tuned of its sources on the class
    task's ``protocol`` (None for the others)."""
    sources = VARIANTS[name].schedule_of
    if not sources:
        return None
    tuned = {source: load_json(tuning_path(out, "class", protocol, source)) for source in sources}
    best = max(sources, key=lambda source: tuned[source]["finals"][f"{tuned[source]['chosen']:g}"])
    return options_of(best).lr_schedule


def chosen(out: Path, name: str, task: str, protocol: str) -> tuple[float | None, str | None]:
    """Variant ``name``'s tuned knob value on (task, protocol) and its ``schedule_of`` schedule."""
    variant = VARIANTS[name]
    if variant.credited_from:
        return chosen(out, variant.credited_from, task, protocol)
    if not variant.grid:
        return None, None
    path = tuning_path(out, task if variant.per_pair else "class", protocol, name)
    if not path.exists():
        raise FileNotFoundError(f"no tuning result {path}: tune ({task}, {protocol}) first.")
    record = load_json(path)
    return record["chosen"], record["schedule"]


def run_case(
    out: Path,
    case: Case,
    settings: EqualTimeSettings,
    resources: TaskResources,
    variants: Collection[str] = tuple(VARIANTS),
) -> None:
    """Stage 3 on ``case``: calibrate (every variant), run those of ``variants`` not yet stored interleaved for their
    n_v iterations, credit ``checkpointed``, measure memory, store each record."""
    calibration = calibrate(out, case, settings, resources)
    counts, seconds = calibration["iterations"], calibration["seconds_per_iteration"]
    folder = out / "cases" / case.key
    names = [n for n in VARIANTS if n in variants and case.protocol in VARIANTS[n].protocols]
    runs, expected = [], {}
    for name in names:
        value, schedule = chosen(out, name, case.task, case.protocol)
        options = options_of(name, value, schedule)
        expected[name] = {"settings": asdict(settings), "case": asdict(case), "options": recorded_options(options)}
        expected[name]["iterations"] = counts[name]
        if VARIANTS[name].credited_from or stored_record(folder / f"{name}.json", expected[name]) is not None:
            continue
        runs.append(_run(name, options, case, counts[name], settings, resources, calibration=calibration))
    if runs:
        interleave(runs, case.key, postfix=lambda run: {"variant": run.name})
    for run in runs:
        record, tensors = run.finish()
        memory = _measured_memory(run.name, run.options, run.method.name, case, settings, resources)
        record.update(expected[run.name], peak_mem_bytes=memory)
        _store(record, tensors, folder / f"{run.name}.json", calibration)
    for name in names:
        source = VARIANTS[name].credited_from
        if source and stored_record(folder / f"{name}.json", expected[name]) is None:
            _store_credited(name, source, folder, expected[name], seconds, case, settings, resources)


def _measured_memory(name, options, method, case, settings, resources) -> int:
    """The extra memory (``sdo.memory.PeakMemory``) of one measured, untimed iteration of ``method`` with
    ``options`` on ``case`` (the memory pass: the timed runs have no hooks); a ``then_exact`` variant's is the larger
    of its two phases'."""
    methods = [method, EXACT] if VARIANTS.get(name, VARIANTS["sdo"]).then_exact else [method]
    peaks = []
    for each in methods:
        probe = _run(name, options, case, 1, settings, resources, measure=True, method=each)
        peaks.append(int(probe.iterate().get("peak_mem_bytes", 0)))
    return max(peaks)


def _store_credited(name, source, folder, expected, seconds, case, settings, resources) -> None:
    """``name``'s record from ``source``'s stored run (same gradient, same iterates): ``source``'s measured t_k
    scaled by the calibrated ratio s_name / s_source, so both are on the case's clock, and kept while within
    ``source``'s own training time (the budget); memory from one measured iteration of ``name``."""
    record = load_json(folder / f"{source}.json")
    ratio = seconds[name] / seconds[source]
    budget = record["iterates"][-1]["t"] * (1 + 1e-9)
    iterates = [{**it, "t": it["t"] * ratio} for it in record["iterates"] if it["t"] * ratio <= budget]
    memory = _measured_memory(name, options_of(name), VARIANTS[name].method, case, settings, resources)
    credited = {**record, **expected, "variant": name, "method": VARIANTS[name].method, "iterates": iterates}
    credited.update(credited_from=source, credited_iterations=len(iterates) - 1, time_ratio=ratio)
    credited.update(step_seconds=[s * ratio for s in record["step_seconds"][: len(iterates) - 1]])
    credited.update(calibrated_seconds=seconds[name], peak_mem_bytes=memory)
    save_result(credited, folder / f"{name}.json")
    print(f"  {folder.name} {name}: {source}'s first {len(iterates) - 1} iterates at {ratio:.2f}x its time")


def _store(record: dict, tensors: dict, path: Path, calibration: dict) -> None:
    record.update(calibrated_seconds=calibration["seconds_per_iteration"][record["variant"]])
    record.update(budget_seconds=calibration["iterations"]["full"] * calibration["seconds_per_iteration"]["full"])
    _save(record, tensors, path)


def _save(record: dict, tensors: dict, path: Path) -> None:
    """Store a timed run's ``record`` (with the machine and the commit) and ``tensors``, and say so in one line."""
    record.update(machine=this_machine(), commit=source_commit())
    save_result(record, path, tensors)
    first, last = record["iterates"][0], record["iterates"][-1]
    print(f"  {path.parent.name} {record['variant']}: {first['reward']:.3f} -> {last['reward']:.3f}")


def run_authors(out: Path, case: Case, settings: EqualTimeSettings, resources: TaskResources) -> None:
    """Stage 4 on ``case`` (protocol ``authors-noise`` or ``authors-edit``): ``sdo-authors`` and ``full-authors``
    interleaved, ``authors_iters`` iterations each, timed; memory from one measured iteration."""
    folder, options = out / "cases" / case.key, MethodOptions("latent", **AUTHORS)
    runs, expected = [], {"settings": asdict(settings), "case": asdict(case), "options": recorded_options(options)}
    for method in ("sdo", "full"):
        if stored_record(folder / f"{method}-authors.json", expected) is None:
            runs.append(
                _run(f"{method}-authors", options, case, settings.authors_iters, settings, resources, method=method)
            )
    if runs:
        interleave(runs, case.key, postfix=lambda run: {"variant": run.name})
    for run in runs:
        record, tensors = run.finish()
        memory = _measured_memory(run.name, options, run.method.name, case, settings, resources)
        record.update(expected, peak_mem_bytes=memory)
        _save(record, tensors, folder / f"{run.name}.json")


def run_all(
    out: Path,
    settings: EqualTimeSettings,
    resources: TaskResources,
    tasks: Sequence[str] = TASKS,
    seeds: Sequence[int] = REPORTED_SEEDS,
    authors: bool = True,
    passes: Sequence[str] = PASSES,
    jobs: int = 1,
) -> None:
    """Every stage in the order that makes partial results useful, in two passes: the kept variants (every task:
    tuning, cases; the class task's authors' rows after its cases), then the ``FALLBACKS`` the same way. Stored
    results are skipped. A case stopped by a non-finite reward is reported and skipped (nothing of it is stored; a
    rerun tries it again), so an unattended run goes on. ``passes``: which of the two to run (``PASSES``); ``jobs``:
    untimed tuning runs at a time (``tune_pair``)."""
    kept = tuple(n for n in VARIANTS if n not in FALLBACKS)
    for variants in [{"kept": kept, "fallbacks": FALLBACKS}[name] for name in passes]:
        for task in sorted(tasks, key=TASKS.index):
            for protocol in PROTOCOLS:
                tune_pair(out, task, protocol, settings, resources, variants, jobs=jobs)
            for seed in seeds:
                for protocol in PROTOCOLS:
                    _go_on(run_case, out, Case(task, protocol, seed), settings, resources, variants)
            if task == "class" and authors and variants is kept:
                for seed in seeds:
                    for protocol in ("authors-noise", "authors-edit"):
                        _go_on(run_authors, out, Case("class", protocol, seed), settings, resources)


def _go_on(stage: Callable[..., None], out: Path, case: Case, *rest) -> None:
    try:
        stage(out, case, *rest)
    except NonFiniteRewardError as error:
        print(f"  {case.key}: stopped, not stored ({str(error).splitlines()[0]}); a rerun tries it again")


WEIGHT_ONLY_OPTIONS = frozenset(item.name for item in fields(TruncationSettings))
"""Options only the weight-only methods read (``draft-k``'s depth, ``random-truncation``'s): no variant of this
comparison does, so a stored record's values are not compared (``draft_k``'s default changed from 1 to 2 while
this comparison ran)."""


def stored_record(path: Path, expected: dict) -> dict | None:
    """``sdo.app.comparison.stored_record`` with the resume rule for ``MethodOptions`` that sdo's commands follow:
    an option the stored record has and this version lacks (removed or renamed) is not compared, and one this
    version has and the record lacks must be at its default; ``WEIGHT_ONLY_OPTIONS`` are not compared. A run may
    span versions of sdo."""
    if path.exists() and "options" in expected:
        stored = load_json(path).get("options")
        if isinstance(stored, dict):
            expected = {**expected, "options": _as_stored(expected["options"], stored)}
    return engine_record(path, expected)


def _as_stored(current: dict, stored: dict) -> dict:
    defaults = recorded_options(MethodOptions())
    added = {key for key in current if key not in stored and current[key] == defaults.get(key)}
    kept = {key: value for key, value in current.items() if key not in added}
    unread = {key: stored[key] for key in WEIGHT_ONLY_OPTIONS & stored.keys()}
    return {**kept, **{key: value for key, value in stored.items() if key not in current}, **unread}
