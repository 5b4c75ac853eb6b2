"""``sdo bench``: every gradient estimator on the same work, in one process, with repeats interleaved.

For each number of steps, every method starts from the same variable (the latent, or the network's weights), the
same batch and the same seeds, and the methods take turns iteration by iteration, so that machine drift hits them
alike. Per method: median seconds per iteration, peak extra memory (``sdo.memory.PeakMemory``), reward after N
iterations, reward reached at 25%, 50% and 100% of a reference training time (``full``'s, else the slowest
learner's; iterate k is credited at the training time through its k-th update), and the cosine similarity of its
first gradient with the exact one (computed by ``Checkpointed()``, which equals ``Full()``'s, as the tests check).
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from sdo.app.comparison import credited_iterates, interleave, reward_at
from sdo.app.finetuning import backward_reward
from sdo.app.method_flags import AUTO, MethodFlags, learning_rate
from sdo.app.options import check_options, option
from sdo.app.report import MEMORY_HEADER, machine_info, markdown_table, mebibytes
from sdo.app.tasks.bench import Workload, mnist_workload, sd15_workload
from sdo.checks import SEED_MAX
from sdo.errors import ConfigError
from sdo.gradients import Checkpointed, GradientMode, NoGrad, Shortcut
from sdo.latent import AdamSettings, LatentProblem, scheduled_lr
from sdo.memory import PeakMemory
from sdo.methods import METHODS, Method, MethodOptions, Stepper, TruncationSettings, Variable, method_names

__all__ = ["BENCH_METHODS", "TIME_FRACTIONS", "BenchConfig", "format_rows", "reward_at", "run_bench"]

BENCH_METHODS = method_names()
TIME_FRACTIONS = (0.25, 0.5, 1.0)
"""The equal-time columns: fractions of the reference training time (``full``'s, else the slowest learner's)."""


@dataclass(frozen=True)
class BenchConfig(MethodFlags):
    """One benchmark run (every field is a ``sdo bench`` flag; the methods' settings are ``sdo optimize``'s, the
    shared ``MethodFlags`` block, with ``checkpoint_kept`` and ``checkpoint_decoder``, plus the weight-only methods'
    ``draft_k`` and ``truncation_high``)."""

    lr: float = learning_rate("Adam learning rate (use ~1e-4 for weights)")

    methods: str = option(
        "sdo,full,checkpointed,nograd",
        f"comma-separated, from {','.join(BENCH_METHODS)}, or auto (the best measured method that fits "
        "--memory-budget; its row is 'auto (METHOD)')",
    )
    model: Literal["mnist", "sd15"] = option("mnist", "workload", choices=("mnist", "sd15"))
    variable: Literal["latent", "weights"] = option("latent", "what is optimized", choices=("latent", "weights"))
    steps: str = option("50", "comma-separated numbers of sampling steps, e.g. 10,25,50,100")
    iters: int = option(5, "iterations per method", at_least=1, at_most=10**6)
    batch: int = option(4, "samples per iteration", at_least=1, at_most=4096)
    draft_k: int = option(TruncationSettings.draft_k, "k of draft-k", at_least=1, at_most=1000)
    truncation_high: int = option(
        TruncationSettings.truncation_high,
        "random-truncation draws k uniformly in [1, this]",
        at_least=1,
        at_most=1000,
        aliases=("--alignprop-high",),
    )
    cosine_sweep: bool = option(False, "also measure the gradient cosine of the shortcut for each kept step")
    vae_slicing: bool = option(False, "sd15: decode one image at a time")
    width: float = option(
        1.0,
        "sd15: channel width multiplier (<1 only for smoke tests; below 0.1 the 32-channel group norm would clamp "
        "the architecture)",
        at_least=0.1,
        at_most=4.0,
    )
    resolution: int = option(512, "sd15: image resolution", at_least=64, at_most=4096, multiple_of=8)
    compile: bool = option(
        False, "also run every method with its no-grad network calls compiled (torch.compile; rows 'NAME+compile')"
    )
    plan: bool = option(False, "predict activation memory and relative time per iteration, without running")
    seed: int = option(0, "seed of the latent, the batch and every random draw", at_least=0, at_most=SEED_MAX)
    device: str = option("cpu", "torch device")
    out: str = option("sdo-bench", "output folder for bench.json, bench.md and bench.png")

    def __post_init__(self) -> None:
        check_options(self)
        if not self.method_names:
            raise ConfigError(f"`methods` must name at least one method of {BENCH_METHODS}, got {self.methods!r}.")
        if not self.step_counts or min(self.step_counts) < 1 or max(self.step_counts) > 1000:
            raise ConfigError(f"`steps` must be comma-separated integers in [1, 1000], got {self.steps!r}.")
        for name in self.method_names:  # unknown names, no gradient to the variable, steps that do not fit
            for steps in self.step_counts:
                if name != AUTO:  # auto's choice is checked when it is made (sdo.app.auto)
                    self.check_method(name, self.variable, steps)
        if self.memory_budget is not None and AUTO not in self.method_names:
            raise ConfigError("`memory_budget` bounds the choice of `methods` auto; name auto among the methods.")

    def method_options(
        self, variable: Variable | None = None, generator: torch.Generator | None = None, **extra: Any
    ) -> MethodOptions:
        """``MethodFlags.method_options`` for ``variable`` (default: this config's ``variable``), with the
        weight-only methods' ``draft_k`` and ``truncation_high`` of this config."""
        own = dict(draft_k=self.draft_k, truncation_high=self.truncation_high)
        return super().method_options(variable or self.variable, generator, **own, **extra)

    @property
    def method_names(self) -> list[str]:
        return [name.strip() for name in self.methods.split(",") if name.strip()]

    @property
    def step_counts(self) -> list[int]:
        try:
            return [int(value) for value in self.steps.split(",")]
        except ValueError as error:
            raise ConfigError(f"`steps` must be comma-separated integers, got {self.steps!r}.") from error


class _MethodRun:
    """One method's run on its own copy of the optimized variable, with its measurements.

    A latent is optimized by the registry's ``Stepper`` of the method (the one latent-optimization loop, or
    FreeDoM's guided pass); weights by ``_WeightsRun``.
    """

    def __init__(
        self,
        name: str,
        config: BenchConfig,
        workload: Workload,
        steps: int,
        mode: GradientMode | None = None,
        compiled: bool = False,
    ) -> None:
        self.name = f"{name}+compile" if compiled else name
        self.compiled, self.workload, self.seed, self.rounds = compiled, workload, config.seed, config.iters
        options = config.method_options(generator=torch.Generator().manual_seed(config.seed))
        # a probe's mode (exact gradient, cosine sweep) runs as an unregistered gradient-mode method
        self.method = METHODS[name] if mode is None else Method(name, "bench probe", lambda _: mode)
        self.mode = self.method.mode(options) if self.method.build is not None else None
        self.label = repr(self.mode) if self.mode is not None else self.method.runner.runs
        self.learns = not isinstance(self.mode, NoGrad)
        self.model = workload.model if config.variable == "latent" else copy.deepcopy(workload.model)
        self.sampler = workload.make_sampler(steps, self.model)
        if compiled:  # the same sampler, its no-grad network calls compiled (sdo.compiled)
            self.sampler = self.sampler.with_options(compile=True)
        self.records: list[dict] = []
        self.best_so_far: float | None = None  # a latent run's, from its stepper's last record
        self.first_gradient: torch.Tensor | None = None
        self.harness_seconds = 0.0
        self.stepper = self._stepper(config, workload, options) if config.variable == "latent" else None

    def _stepper(self, config: BenchConfig, workload: Workload, options: MethodOptions) -> Stepper:
        problem = LatentProblem(self.sampler, workload.latent, workload.reward, seed=config.seed)
        return self.method.stepper(problem, options, config.iters)

    def iterate(self) -> None:
        """One timed iteration (``step``), with its wall-clock, memory, reward and (a latent's) best-so-far
        recorded."""
        workload, seed = self.workload, self.seed
        outer = time.perf_counter()
        _synchronize(workload.device)
        started = time.perf_counter()
        with PeakMemory(workload.device) as memory:
            rewards = self.step(workload, seed)
        _synchronize(workload.device)
        seconds = time.perf_counter() - started
        elapsed = (self.records[-1]["elapsed"] if self.records else 0.0) + seconds
        self.records.append(
            {
                "seconds": seconds,
                "elapsed": elapsed,
                "peak_mem_bytes": memory.peak_bytes,
                "reward": float(rewards.detach().float().mean()),
                **({} if self.best_so_far is None else {"best_so_far": self.best_so_far}),
            }
        )
        self.harness_seconds += time.perf_counter() - outer - seconds

    def step(self, workload: Workload, seed: int) -> torch.Tensor:
        """One iteration of the method's stepper; returns the rewards ``[B]`` it recorded (and keeps its
        ``best_so_far``)."""
        record = self.stepper.iterate()
        self.best_so_far = record["best_so_far"]
        if self.first_gradient is None and self.learns and self.method.runner.exact_gradient:
            self.first_gradient = self.stepper.gradient.flatten().float()
        return torch.tensor(record["rewards"])

    def final_reward(self, workload: Workload, seed: int) -> float:
        """The reward of the final iterate (no gradient); keeps its ``best_so_far``."""
        final = self.stepper.finish().history[-1]
        self.best_so_far = final["best_so_far"]
        return float(final["reward"])


class _WeightsRun(_MethodRun):
    """A gradient mode optimizing the network's weights with Adam (the latent stays fixed)."""

    def __init__(self, name: str, config: BenchConfig, workload: Workload, steps: int, **kwargs) -> None:
        super().__init__(name, config, workload, steps, **kwargs)
        self.latent = workload.latent
        self.variables = [p for p in self.model.parameters() if p.is_floating_point()]
        for parameter in self.variables:
            parameter.requires_grad_(True)
        self.optimizer = torch.optim.Adam(self.variables, lr=config.lr, betas=AdamSettings.betas)
        self.lr, self.lr_schedule = config.lr, config.lr_schedule

    def step(self, workload: Workload, seed: int) -> torch.Tensor:
        """One Adam update of the weights (``sdo.app.finetuning.backward_reward``: sample with the gradient mode,
        reward, backward); returns the rewards ``[B]``. ``nograd`` only samples and scores."""
        if not self.learns:
            return self._rewards(workload, seed, self.mode)
        self.optimizer.zero_grad(set_to_none=True)
        generator = _generator(workload.device, seed)
        logged = backward_reward(self.sampler, self.latent, None, self.mode, workload.reward, generator=generator)
        if self.first_gradient is None:
            grads = [(v.grad if v.grad is not None else torch.zeros_like(v)).flatten().float() for v in self.variables]
            self.first_gradient = torch.cat(grads)
        update = len(self.records)  # the iteration being recorded: update k of the run's K = rounds
        for group in self.optimizer.param_groups:  # --lr-schedule, as the latent's Adam (sdo.latent.scheduled_lr)
            group["lr"] = scheduled_lr(self.lr, self.lr_schedule, update, self.rounds)
        self.optimizer.step()
        return logged["reward"]

    def final_reward(self, workload: Workload, seed: int) -> float:
        return float(self._rewards(workload, seed, NoGrad()).float().mean())

    @torch.no_grad()
    def _rewards(self, workload: Workload, seed: int, mode: GradientMode) -> torch.Tensor:
        x0 = self.sampler.sample(self.latent, grad=mode, generator=_generator(workload.device, seed))
        return workload.reward(x0, None)


def _method_run(
    name: str, config: BenchConfig, workload: Workload, steps: int, mode: GradientMode | None = None, **kwargs
) -> _MethodRun:
    """The run of method ``name`` (or of the unregistered ``mode``) on the variable ``config`` optimizes."""
    run = _WeightsRun if config.variable == "weights" else _MethodRun
    return run(name, config, workload, steps, mode=mode, **kwargs)


def _postfix(run: _MethodRun) -> dict:
    return {"method": run.name, "s": f"{run.records[-1]['seconds']:.2f}"}


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _exact_gradient(config: BenchConfig, workload: Workload, steps: int, runs: dict[str, _MethodRun]) -> torch.Tensor:
    """The first-iteration gradient of Full (taken from ``full``/``checkpointed`` when they ran, else computed)."""
    for name in ("full", "checkpointed"):
        if name in runs and runs[name].first_gradient is not None:
            return runs[name].first_gradient
    return _first_gradient(config, workload, steps, Checkpointed())


def _first_gradient(config: BenchConfig, workload: Workload, steps: int, mode: GradientMode) -> torch.Tensor:
    probe = _method_run("probe", config, workload, steps, mode)
    probe.iterate()
    return probe.first_gradient


def _cosine(a: torch.Tensor | None, b: torch.Tensor) -> float | None:
    if a is None:
        return None
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def _iterates(run: _MethodRun, final_reward: float) -> list[tuple[float, float]]:
    """``(t_k, reward_k)`` for every iterate of ``run``, in order (``sdo.app.comparison.credited_iterates``;
    ``final_reward``, the untimed evaluation, is the last iterate's). A run whose runner is one pass (FreeDoM)
    learns nothing across its passes: each pass's reward is credited at that pass's own time."""
    seconds, rewards = [record["seconds"] for record in run.records], [record["reward"] for record in run.records]
    if run.method.runner.one_pass:
        return list(zip(seconds, rewards, strict=True))
    return credited_iterates(seconds, [*rewards, final_reward])


def _time_reference(runs: dict[str, _MethodRun]) -> tuple[str, float]:
    """The time the equal-time columns are fractions of: ``full``'s total training time when ``full`` ran, else
    the slowest learner's (FreeDoM, which learns nothing, and ``nograd`` count only when nothing else ran)."""
    if "full" in runs:
        return "full", runs["full"].records[-1]["elapsed"]
    learners = [run for run in runs.values() if run.learns and not run.method.runner.one_pass] or list(runs.values())
    slowest = max(learners, key=lambda run: run.records[-1]["elapsed"])
    return f"slowest learner ({slowest.name})", slowest.records[-1]["elapsed"]


def _equal_time(iterates: list[tuple[float, float]], reference: tuple[str, float]) -> dict:
    """The equal-time fields of a row: the reference, and the reward at each of ``TIME_FRACTIONS`` of it."""
    name, seconds = reference
    rewards = {_fraction_key(f): reward_at(iterates, f * seconds) for f in TIME_FRACTIONS}
    return {"time_reference": name, "time_reference_s": seconds, **rewards, "iterates": iterates}


def _fraction_key(fraction: float) -> str:
    """``0.25`` -> ``"reward_at_25pct_time"``."""
    return f"reward_at_{round(100 * fraction)}pct_time"


def _rows(runs: dict[str, _MethodRun], exact: torch.Tensor, workload: Workload, config: BenchConfig, steps: int):
    reference = _time_reference(runs)
    rows = []
    for run in runs.values():
        final = run.final_reward(workload, config.seed)
        rows.append(
            {
                "method": run.name,
                "mode": run.label,
                "steps": steps,
                "workload": workload.name,
                "variable": config.variable,
                "iters": len(run.records),
                "s_per_iter": statistics.median(r["seconds"] for r in run.records),
                "first_iter_s": run.records[0]["seconds"],
                "compiled": run.compiled,
                "peak_mem_bytes": max(r["peak_mem_bytes"] for r in run.records),
                "reward_initial": run.records[0]["reward"],
                "reward_final": final,
                "best_so_far_final": run.best_so_far,
                **_equal_time(_iterates(run, final), reference),
                "grad_cosine": _cosine(run.first_gradient, exact),
                "harness_overhead": run.harness_seconds / sum(r["seconds"] for r in run.records),
                "history": run.records,
            }
        )
    return rows


def _cosine_sweep(config: BenchConfig, workload: Workload, steps: int, exact: torch.Tensor) -> list[dict]:
    kept = sorted({*range(0, steps, max(1, steps // 10)), steps - 1})
    sweep = []
    for index in tqdm(kept, desc=f"cosine sweep ({steps} steps)", leave=False):
        gradient = _first_gradient(config, workload, steps, Shortcut(step=index))
        sweep.append({"steps": steps, "kept_step": index, "grad_cosine": _cosine(gradient, exact)})
    return sweep


def workload_dtype(config: BenchConfig) -> torch.dtype:
    """The dtype ``sdo bench`` runs ``config``'s SD-1.5 workload in on its device (bfloat16 on CUDA, else float32);
    read from the device's name only, so a plan for CUDA needs no CUDA."""
    return torch.bfloat16 if torch.device(config.device).type == "cuda" else torch.float32


def build_workload(
    config: BenchConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Workload:
    """The workload ``config`` names, on ``device`` (default ``config.device``; ``"meta"``: shapes only, for the
    plan) in ``dtype`` (SD-1.5 only; default ``workload_dtype(config)``)."""
    device = config.device if device is None else device
    if config.model == "mnist":
        return mnist_workload(batch=config.batch, seed=config.seed, device=device)
    return sd15_workload(
        batch=config.batch,
        seed=config.seed,
        device=device,
        dtype=workload_dtype(config) if dtype is None else dtype,
        width=config.width,
        resolution=config.resolution,
        checkpoint_decoder=config.checkpoint_decoder,
        vae_slicing=config.vae_slicing,
    )


def run_bench(config: BenchConfig, workload: Workload | None = None, progress: bool = True) -> dict:
    """Run the benchmark; returns ``{"rows": [...], "cosine_sweep": [...], "machine": {...}, "config": {...}}``."""
    workload = workload or build_workload(config)
    rows, sweep, choices = [], [], {}
    for steps in config.step_counts:
        runs = {name: _method_run(name, config, workload, steps) for name in config.method_names if name != AUTO}
        if AUTO in config.method_names:  # the planner's choice for this workload and steps (sdo.app.auto)
            from sdo.app.auto import choose_for_bench

            choice = choose_for_bench(config, workload, steps)
            tqdm.write(choice.line())
            choices[str(steps)] = choice.record()
            run = _method_run(choice.method, replace(config, **choice.options), workload, steps)
            run.name = f"{AUTO} ({choice.method})"
            runs[run.name] = run
        if config.compile:  # compiled rows for the gradient modes (DOODL and FreeDoM run their own loops)
            modes = [name for name in runs if name in METHODS and METHODS[name].build is not None]
            compiled = [_method_run(name, config, workload, steps, compiled=True) for name in modes]
            runs.update({run.name: run for run in compiled})
        interleave(list(runs.values()), f"bench {workload.name}, {steps} steps", progress, _postfix)
        exact = _exact_gradient(config, workload, steps, runs)
        rows += _rows(runs, exact, workload, config, steps)
        if config.cosine_sweep:
            sweep += _cosine_sweep(config, workload, steps, exact)
    result = {"config": asdict(config), "machine": machine_info(workload.device), "rows": rows, "cosine_sweep": sweep}
    return {**result, "auto": choices} if choices else result


def format_rows(rows: list[dict]) -> str:
    """Markdown table of the benchmark rows."""
    headers = (
        "steps",
        "method",
        "s / iter",
        "first iter s (compiles)",
        MEMORY_HEADER,
        "reward start -> final",
        *(f"reward at {round(100 * f)}% time" for f in TIME_FRACTIONS),
        "grad cosine",
    )
    table = markdown_table(headers, [_row_cells(r) for r in rows])
    references = dict.fromkeys(
        f"{r['steps']} steps: {r['time_reference']}, {r['time_reference_s']:.2f} s" for r in rows
    )
    return f"{table}\n\nReward at X% time: of the training time of {'; '.join(references)}."


def _row_cells(r: dict) -> list[str]:
    cosine = "" if r["grad_cosine"] is None else f"{r['grad_cosine']:.3f}"
    rewards = f"{r['reward_initial']:.3f} -> {r['reward_final']:.3f}"
    return [
        r["steps"],
        r["method"],
        f"{r['s_per_iter']:.3f}",
        f"{r.get('first_iter_s', float('nan')):.2f}",
        mebibytes(r["peak_mem_bytes"]),
        rewards,
        *("" if r[_fraction_key(f)] is None else f"{r[_fraction_key(f)]:.3f}" for f in TIME_FRACTIONS),
        cosine,
    ]
