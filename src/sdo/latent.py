"""Inference-time latent optimization (the paper's editing tasks); ``invert`` (``sdo.inversion``) is re-exported."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from .checks import (
    FLOAT32_MAX,
    check_betas,
    check_int,
    check_latent,
    check_latent_fits,
    check_learning_rate,
    check_rewards,
    check_seed,
)
from .errors import ConfigError, CorruptFileError, NonFiniteRewardError
from .gradients import GradientMode, NoGrad, Shortcut
from .inversion import invert
from .io import load_tensors, save_tensors
from .memory import PeakMemory
from .protocols import LatentReward, LatentSampler
from .rewards import latent_prior
from .sampling import Sampler

__all__ = [
    "LR_SCHEDULES",
    "AdamSettings",
    "AdamUpdate",
    "LatentProblem",
    "LatentStepper",
    "NonFiniteRewardError",
    "Objective",
    "OptimizationResult",
    "SampleObjective",
    "Shell",
    "UpdateRule",
    "adam_update",
    "check_lr_schedule",
    "history_record",
    "invert",
    "latent_stepper",
    "load_latent",
    "optimize_latent",
    "save_latent",
    "scheduled_lr",
]

LR_SCHEDULES = ("constant", "cosine")
"""The learning-rate schedules of sdo's Adam run (``lr_schedule``): ``constant`` (the authors' behaviour) keeps
``lr``; ``cosine`` uses ``lr * (1 + cos(pi * k / K)) / 2`` at update k = 0..K-1 of a run of K = ``iters`` updates."""


@dataclass(frozen=True)
class AdamSettings:
    """The defaults of sdo's Adam run of a latent, written once: ``sdo.optimize_latent``, ``latent_stepper``,
    ``sdo.doodl.doodl_adam_stepper``, ``sdo.methods.MethodOptions`` and the ``sdo optimize`` / ``sdo bench`` flags
    (``--lr``, ``--prior-weight``, ``--project``) all read them.

    Attributes:
        lr: Adam's learning rate. betas: Adam's moment decays, (0.9, 0.9) as in the authors' reference scripts.
        prior_weight: weight of the Gaussian-shell regularizer ``latent_prior`` (0 disables it).
        project_to_shell: rescale each latent to its initial norm after each update (``Shell``).
        lr_schedule: the lr at each update, one of ``LR_SCHEDULES``: ``constant`` (the authors' behaviour) or
            ``cosine`` (``lr * (1 + cos(pi * k / K)) / 2`` at update k of K, decaying towards 0).
    """

    lr: float = 0.05
    betas: tuple[float, float] = (0.9, 0.9)
    prior_weight: float = 0.0
    project_to_shell: bool = True
    lr_schedule: str = "constant"


@dataclass
class OptimizationResult:
    """What ``optimize_latent`` returns.

    Attributes:
        latent: ``[B, ...]`` the final latent (after ``iters`` Adam updates).
        sample: ``[B, ...]`` its sample.
        best_latent, best_sample, best_reward: per batch element, the iterate with the highest reward seen:
            ``sampler.sample(best_latent)`` gives ``best_sample`` and ``reward(best_sample)`` gives ``best_reward``.
        history: one dict per evaluated iterate (``iters + 1`` of them, the last being the final latent):
            ``iter``, ``reward`` (batch mean), ``rewards`` (per sample), ``best_so_far`` (the batch mean of each
            sample's best reward among iterates ``0..iter``: ``best_reward.mean()`` had the run stopped there),
            ``loss``, ``seconds`` (wall-clock of that iteration, 0 for the final evaluation), ``elapsed``; with
            ``measure=True``, ``peak_mem_bytes`` and ``mem_kind`` (not for the final evaluation); with a judge,
            ``judge_success`` (fraction of the batch the judge accepts). Record k is iterate k, the latent after k
            updates (the one ``iter`` k evaluates before its update).
    """

    latent: torch.Tensor
    sample: torch.Tensor
    best_latent: torch.Tensor
    best_sample: torch.Tensor
    best_reward: torch.Tensor
    history: list[dict] = field(default_factory=list)


class _BestIterate:
    """Tracks, per batch element, the latent and sample with the highest reward so far."""

    def __init__(self, latent: torch.Tensor) -> None:
        self.reward = torch.full((latent.shape[0],), -torch.inf, device=latent.device)
        self.latent = latent.detach().clone()
        self.sample: torch.Tensor | None = None

    def update(self, latent: torch.Tensor, sample: torch.Tensor, reward: torch.Tensor) -> None:
        if self.sample is None:
            self.sample = sample.detach().clone()
        better = reward.detach() > self.reward
        self.reward = torch.where(better, reward.detach(), self.reward)
        self.latent[better] = latent.detach()[better]
        self.sample[better] = sample.detach()[better]

    def result(self, latent: torch.Tensor, sample: torch.Tensor, history: list[dict]) -> OptimizationResult:
        """The ``OptimizationResult`` of a run whose current iterate is ``latent`` with ``sample``."""
        return OptimizationResult(
            latent=latent.detach(),
            sample=sample.detach(),
            best_latent=self.latent,
            best_sample=self.sample,
            best_reward=self.reward,
            history=history,
        )


class Objective(Protocol):
    """What one iteration of latent optimization evaluates at the latent ``z``."""

    def __call__(self, z: torch.Tensor, grad: GradientMode) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x0, rewards [B] detached, loss)``: the sample, its per-sample objective, and the scalar loss to
        minimize, which carries the graph ``grad`` keeps (none under ``sdo.NoGrad()``)."""


class UpdateRule(Protocol):
    """How latent optimization moves the latent once the loss gradient is known."""

    def __call__(self, z: torch.Tensor, gradient: torch.Tensor) -> None:
        """Move ``z`` (in place, a leaf) down the loss along ``gradient = d loss / d z``."""


@dataclass(frozen=True)
class SampleObjective:
    """``optimize_latent``'s objective: ``reward(sample(z), cond) - prior_weight * latent_prior(z)`` per sample.

    The sampler's noise generator is seeded anew with ``seed`` at every evaluation, so one latent always maps to one
    sample. The loss is ``-sum_b reward_b + prior_weight * sum_b latent_prior(z_b)``.
    """

    sampler: Sampler
    reward: LatentReward
    start_step: int = 0
    seed: int = 0
    cond: object = None
    prior_weight: float = AdamSettings.prior_weight

    def __call__(self, z: torch.Tensor, grad: GradientMode) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x0, rewards [B] detached, loss)``; the loss carries the graph ``grad`` keeps."""
        generator = torch.Generator(device=z.device).manual_seed(self.seed)
        with torch.set_grad_enabled(not isinstance(grad, NoGrad)):
            x0 = self.sampler.sample(z, grad=grad, start_step=self.start_step, generator=generator)
            rewards = check_rewards(self.reward(x0, self.cond), z.shape[0])
            loss = -rewards.sum()
            if self.prior_weight:
                loss = loss + self.prior_weight * latent_prior(z).sum()
        return x0, rewards.detach(), loss


class Shell:
    """The Gaussian shell a latent is projected back onto: each sample's norm at the start of the run (for
    initial noise, about ``sqrt(dim)``; the hard version of the latent prior, as DOODL does)."""

    def __init__(self, z: torch.Tensor) -> None:
        self.radius = z.detach().flatten(1).norm(dim=1)

    @torch.no_grad()
    def project(self, z: torch.Tensor) -> None:
        """Rescale each latent of ``z`` in place to its initial norm."""
        z.mul_((self.radius / z.flatten(1).norm(dim=1)).view(-1, *[1] * (z.ndim - 1)))


class AdamUpdate:
    """``optimize_latent``'s update rule: one Adam update (Kingma & Ba 2015) of the latent at the lr of
    ``lr_schedule`` (``scheduled_lr``; ``iters`` is the run's number of updates K, needed by ``cosine``), then, with
    ``shell``, the projection back onto the initial norms (``project_to_shell``). ``updates`` counts the updates
    applied."""

    def __init__(
        self,
        z: torch.Tensor,
        lr: float,
        betas: tuple[float, float],
        shell: Shell | None = None,
        *,
        lr_schedule: str = AdamSettings.lr_schedule,
        iters: int | None = None,
    ) -> None:
        check_lr_schedule(lr_schedule, iters)
        self.optimizer = torch.optim.Adam([z], lr=lr, betas=betas)
        self.shell, self.lr, self.lr_schedule, self.iters, self.updates = shell, lr, lr_schedule, iters, 0

    def __call__(self, z: torch.Tensor, gradient: torch.Tensor) -> None:
        """One Adam update of ``z`` (the latent this rule was built for) along the loss gradient.

        Raises:
            ConfigError: a ``cosine`` schedule asked for an update past its ``iters``.
        """
        if self.lr_schedule != "constant":  # constant leaves the optimizer's lr untouched (the authors' run)
            for group in self.optimizer.param_groups:
                group["lr"] = scheduled_lr(self.lr, self.lr_schedule, self.updates, self.iters)
        z.grad = gradient
        self.optimizer.step()
        self.updates += 1
        if self.shell is not None:
            self.shell.project(z)


@dataclass(frozen=True)
class LatentProblem:
    """What a latent-optimization run works on, whatever its update rule: the sampler, the starting latent, the
    reward, and what every run records.

    Attributes:
        sampler: an ``sdo.protocols.LatentSampler``: an ``sdo.Sampler`` (or an ``sdo.EDICTSampler`` for DOODL).
        latent: ``[B, ...]`` the latent at ``start_step`` (initial noise when 0). reward: ``reward(x0, cond) -> [B]``.
        start_step, seed, cond, judge, measure: as for ``optimize_latent``.
    """

    sampler: LatentSampler
    latent: torch.Tensor
    reward: LatentReward
    start_step: int = 0
    seed: int = 0
    cond: object = None
    judge: Callable[[torch.Tensor], torch.Tensor] | None = None
    measure: bool = False

    def check(self, network: torch.nn.Module | None) -> None:
        """Refuse a bad seed, or a latent that is not a finite float tensor ``network`` can take
        (``sdo.checks.check_latent_fits``)."""
        check_seed(self.seed)
        check_latent(self.latent, "latent")
        check_latent_fits(self.latent, network, "latent")

    def stepper(
        self, objective: Objective, update: Callable[[torch.Tensor], UpdateRule], grad: GradientMode
    ) -> LatentStepper:
        """The ``LatentStepper`` of ``objective`` and ``update`` from this problem's latent."""
        return LatentStepper(
            objective, self.latent, update, grad=grad, reward=self.reward, judge=self.judge, measure=self.measure
        )


class LatentStepper:
    """The one latent-optimization loop, one iteration per ``iterate()`` call (an optimizer iteration; a solver step
    is one of the sampler's steps inside it).

    Each iteration evaluates ``objective(z, grad)``, refuses a non-finite reward, updates the per-sample best
    iterate (before the update moves ``z``, so that ``best_latent`` is the latent of ``best_sample``), backpropagates
    the loss to ``z``, refuses a non-finite gradient, and applies ``update(z, d loss / d z)`` unless the moved latent
    would not be finite (then ``z`` keeps its value and the run stops). ``finish()`` evaluates
    the final latent once more (no gradient) and returns the ``OptimizationResult``. ``sdo.optimize_latent`` (Adam),
    ``sdo.optimize_latent_doodl`` (DOODL's update on the EDICT pair) and ``sdo bench`` (interleaved runs) all drive
    this loop. Under ``sdo.NoGrad()`` an iteration only evaluates (``sdo bench``'s cost floor).

    Args:
        objective: an ``Objective``. latent: ``[B, ...]`` the starting latent (not modified). update: an
            ``UpdateRule`` built for the latent this stepper optimizes (``stepper.latent``).
        grad: the gradient mode of every iteration's sample.
        reward: the reward, read only for a weighted sum's ``last_terms`` (``reward_NAME`` history fields).
        judge: optional ``x0 -> [B] bool`` acceptance test recorded in the history (never optimized).
        measure: record each iteration's extra memory (``sdo.memory.PeakMemory``).

    Raises (from ``iterate`` and ``finish``):
        NonFiniteRewardError: the reward or its gradient is NaN or infinite, or the update would make the latent
            so; ``result`` holds the run so far with the last iterate whose reward was finite as its ``latent`` and
            ``sample``, and the best iterate.
        ConfigError: the reward has no gradient path to the sample, or ``grad`` gives none to the latent.
    """

    def __init__(
        self,
        objective: Objective,
        latent: torch.Tensor,
        update: Callable[[torch.Tensor], UpdateRule],
        *,
        grad: GradientMode,
        reward: object = None,
        judge: Callable[[torch.Tensor], torch.Tensor] | None = None,
        measure: bool = False,
    ) -> None:
        self.objective, self.grad, self.reward, self.judge, self.measure = objective, grad, reward, judge, measure
        self.latent = latent.detach().clone().requires_grad_(True)
        self.update = update(self.latent)
        self.best = _BestIterate(self.latent)
        self.history: list[dict] = []
        self.gradient: torch.Tensor | None = None  # d loss / d latent of the last iteration
        self.last_finite: tuple[torch.Tensor, torch.Tensor] | None = None  # (latent, sample)

    def iterate(self) -> dict:
        """One iteration; returns (and appends to ``history``) its record."""
        return self._iterate(final=False)

    def step(self) -> dict:
        """The old name of ``iterate()`` (one optimizer iteration, not a solver step); kept for existing callers."""
        return self.iterate()

    def finish(self) -> OptimizationResult:
        """Evaluate the current latent once more (no gradient, recorded with ``seconds`` 0) and return the result."""
        self._iterate(final=True)
        return self.best.result(*self.last_finite, self.history)

    def run(self, iters: int, description: str, progress: bool = True) -> OptimizationResult:
        """``iters`` iterations then ``finish()``, with a tqdm bar showing the reward (last, the final latent's, the
        history's last record)."""
        with tqdm(total=iters, desc=description, disable=not progress, leave=False) as bar:
            for _ in range(iters):
                bar.set_postfix(reward=f"{self.iterate()['reward']:.3f}", refresh=False)
                bar.update()
            result = self.finish()
            bar.set_postfix(reward=f"{self.history[-1]['reward']:.3f}")
        return result

    def _iterate(self, final: bool) -> dict:
        z, iteration, learns = self.latent, len(self.history), not final and not isinstance(self.grad, NoGrad)
        started = time.perf_counter()
        with PeakMemory(z.device) if self.measure and not final else nullcontext() as memory:
            x0, rewards, loss = self.objective(z, self.grad if learns else NoGrad())
            if not torch.isfinite(rewards).all():
                raise NonFiniteRewardError(
                    f"The reward is not finite at iteration {iteration} ({rewards.tolist()}); stopped. "
                    "The error's `result` holds the last finite iterate.",
                    self.best.result(*(self.last_finite or (z, x0)), self.history),
                )
            self.best.update(z, x0, rewards)
            self.last_finite = (z.detach().clone(), x0.detach())
            if learns:
                self.gradient = self._backward(z, x0, loss, iteration)
        refused = self._apply_update(z, iteration) if learns else None
        seconds = 0.0 if final else time.perf_counter() - started
        elapsed = (self.history[-1]["elapsed"] if self.history else 0.0) + seconds
        record = history_record(
            iteration, rewards, loss, seconds, elapsed, reward=self.reward, memory=memory, best=self.best.reward
        )
        if self.judge is not None:
            record["judge_success"] = float(self.judge(x0.detach()).float().mean())
        self.history.append(record)
        if refused is not None:
            raise refused
        return record

    def _apply_update(self, z: torch.Tensor, iteration: int) -> NonFiniteRewardError | None:
        """Move ``z`` by the update rule, unless the moved latent would hold NaN or infinite values: then ``z``
        keeps its value and the error to raise (once this iteration is recorded) is returned."""
        before = z.detach().clone()
        self.update(z, self.gradient)
        if bool(torch.isfinite(z.detach()).all()):
            return None
        with torch.no_grad():
            z.copy_(before)
        return NonFiniteRewardError(
            f"The update at iteration {iteration} would make the latent NaN or infinite (is `lr` too large, or the "
            "latent zero?); stopped without applying it. The error's `result` holds the last finite iterate.",
            self.best.result(*self.last_finite, self.history),
        )

    def _backward(self, z: torch.Tensor, x0: torch.Tensor, loss: torch.Tensor, iteration: int) -> torch.Tensor:
        """``d loss / d z``, after checking that the gradient reached the sample and the latent and is finite."""
        z.grad = None
        if x0.requires_grad:
            x0.retain_grad()
        if loss.requires_grad:
            loss.backward()
        _check_gradient_reached(z, x0, self.grad)
        if not bool(torch.isfinite(z.grad).all()):
            raise NonFiniteRewardError(
                f"The gradient of the reward is not finite at iteration {iteration} (the reward is); "
                "stopped before the update. The error's `result` holds the last finite iterate.",
                self.best.result(*self.last_finite, self.history),
            )
        gradient, z.grad = z.grad, None
        return gradient


def optimize_latent(
    sampler: Sampler,
    latent: torch.Tensor,
    reward: LatentReward,
    *,
    grad: GradientMode = Shortcut(),  # noqa: B008 (a frozen, immutable value)
    start_step: int = 0,
    iters: int = 20,
    lr: float = AdamSettings.lr,
    betas: tuple[float, float] = AdamSettings.betas,
    prior_weight: float = AdamSettings.prior_weight,
    project_to_shell: bool = AdamSettings.project_to_shell,
    lr_schedule: str = AdamSettings.lr_schedule,
    seed: int = 0,
    cond: object = None,
    judge: Callable[[torch.Tensor], torch.Tensor] | None = None,
    measure: bool = False,
    progress: bool = True,
) -> OptimizationResult:
    """Maximize ``reward(sample(z), cond) - prior_weight * latent_prior(z)`` over the latent ``z`` with Adam.

    Each iteration samples ``x0`` from ``z`` with the gradient mode ``grad`` (``Shortcut()``: the SDO one-step
    gradient of Dou et al. 2025; ``Full()``: exact backpropagation), and takes one Adam step on
    ``loss = -sum_b reward_b + prior_weight * sum_b latent_prior(z_b)``. The defaults are ``AdamSettings``'s (lr 0.05,
    betas (0.9, 0.9) as in the authors' reference scripts, the shell projection on), which ``sdo optimize``'s flags
    read too (one set of defaults for the command and the library). The loop is ``LatentStepper``'s.

    Args:
        sampler: the sampler (model, scheduler, steps).
        latent: ``[B, ...]`` the initial noise (``start_step=0``) or the latent at ``start_step`` (after a no-grad
            warm-up with ``sampler.sample(..., stop_step=k)``, or after ``sdo.invert``). Not modified.
        reward: ``reward(x0, cond) -> [B]``, higher is better (the one reward protocol of ``sdo.rewards``).
        grad: gradient mode; start_step: first step run; iters: Adam updates; lr, betas: Adam's (betas in [0, 1)).
        lr_schedule: ``"constant"`` (``lr`` at every update, the authors' behaviour) or ``"cosine"`` (``lr * (1 +
            cos(pi * k / iters)) / 2`` at update k = 0..iters-1); see ``LR_SCHEDULES``.
        prior_weight: weight of the Gaussian-shell regularizer (0 disables it).
        project_to_shell: after each Adam update, rescale each latent to its initial norm (``Shell``): the hard
            version of the prior, as DOODL does.
        seed: seeds the sampler's noise generator anew every iteration, so one latent always maps to one sample.
        cond: passed to ``reward``.
        judge: optional ``x0 -> [B] bool`` acceptance test recorded in the history (never optimized).
        measure: record each iteration's extra memory (``peak_mem_bytes``, and ``mem_kind``: see
            ``sdo.memory.PeakMemory``). Off by default: on CUDA it resets the process's peak-memory statistics.
        progress: show a tqdm progress bar with the reward.

    Raises:
        NonFiniteRewardError: the reward or its gradient is NaN or infinite; its ``result`` holds the last iterate
            whose reward was finite (``latent``, ``sample``) and the best iterate so far.
        ConfigError: bad arguments (including a latent or reward output the sampler's network cannot take); a
            gradient mode that gives the latent no gradient; a reward with no gradient path to the sample.
    """
    check_int(iters, "iters")
    if isinstance(grad, NoGrad):
        raise ConfigError(f"{grad!r} gives no gradient to the latent; use sdo.Shortcut() or sdo.Full().")
    problem = LatentProblem(sampler, latent, reward, start_step, seed, cond, judge, measure)
    stepper = latent_stepper(
        problem,
        grad,
        lr=lr,
        betas=betas,
        prior_weight=prior_weight,
        project_to_shell=project_to_shell,
        lr_schedule=lr_schedule,
        iters=iters,
    )
    return stepper.run(iters, f"optimize ({type(grad).__name__})", progress)


def latent_stepper(
    problem: LatentProblem,
    grad: GradientMode,
    *,
    lr: float = AdamSettings.lr,
    betas: tuple[float, float] = AdamSettings.betas,
    prior_weight: float = AdamSettings.prior_weight,
    project_to_shell: bool = AdamSettings.project_to_shell,
    lr_schedule: str = AdamSettings.lr_schedule,
    iters: int | None = None,
) -> LatentStepper:
    """The ``LatentStepper`` of ``optimize_latent`` (its arguments, checked here): ``SampleObjective`` with
    ``AdamUpdate``. ``sdo bench`` runs it one iteration at a time; ``grad=sdo.NoGrad()`` only evaluates. ``iters``
    is the number of updates the run will take (K of a ``cosine`` ``lr_schedule``, which needs it), so that
    ``iterate()`` K times and ``run(K)`` use the same lrs."""
    adam = adam_update(lr, betas, project_to_shell, lr_schedule, iters)
    problem.check(problem.sampler.network)
    objective = SampleObjective(
        problem.sampler, problem.reward, problem.start_step, problem.seed, problem.cond, prior_weight
    )

    return problem.stepper(objective, adam, grad)


def adam_update(
    lr: float,
    betas: tuple[float, float],
    project_to_shell: bool,
    lr_schedule: str = AdamSettings.lr_schedule,
    iters: int | None = None,
) -> Callable[[torch.Tensor], AdamUpdate]:
    """The ``AdamUpdate`` factory a ``LatentStepper`` takes, after checking ``lr``, ``betas`` and ``lr_schedule``:
    one Adam rule per run of ``iters`` updates, its lr following ``lr_schedule``, projecting onto the latent's
    initial ``Shell`` with ``project_to_shell``.

    Raises:
        ConfigError: ``betas`` not a pair in [0, 1), ``lr`` not a finite number > 0 whose first step fits float32,
            or ``lr_schedule`` not one of ``LR_SCHEDULES`` (``cosine`` without ``iters``).
    """
    betas = check_betas(betas)
    check_learning_rate(lr, largest=FLOAT32_MAX * (1 - betas[0]))  # Adam's first step is lr / (1 - beta1)
    check_lr_schedule(lr_schedule, iters)

    def adam(z: torch.Tensor) -> AdamUpdate:
        shell = Shell(z) if project_to_shell else None
        return AdamUpdate(z, lr, betas, shell, lr_schedule=lr_schedule, iters=iters)

    return adam


def check_lr_schedule(lr_schedule: object, iters: int | None = None, *, sized: bool = True) -> str:
    """``lr_schedule`` if it is one of ``LR_SCHEDULES``, else a ``ConfigError`` naming ``lr_schedule``; with
    ``sized`` (for a run), also a ``cosine`` without its run length ``iters`` is refused (naming ``iters``)."""
    if not isinstance(lr_schedule, str) or lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"`lr_schedule` must be one of {', '.join(LR_SCHEDULES)}, got {lr_schedule!r}.")
    if not sized:
        return lr_schedule
    if iters is not None:
        check_int(iters, "iters")
    elif lr_schedule != "constant":
        raise ConfigError(f"`lr_schedule` {lr_schedule!r} needs the run's number of updates (`iters`).")
    return lr_schedule


def scheduled_lr(lr: float, lr_schedule: str, update: int, iters: int | None) -> float:
    """The lr of update ``update`` (0-based) of a run of ``iters`` updates under ``lr_schedule``: ``lr``
    (``constant``) or ``lr * (1 + cos(pi * update / iters)) / 2`` (``cosine``).

    Raises:
        ConfigError: ``cosine`` past its run (``update >= iters``): the stepper was built for fewer updates.
    """
    if lr_schedule == "constant":
        return lr
    if iters is None or not 0 <= update < iters:
        raise ConfigError(
            f"`lr_schedule` {lr_schedule!r} was set for a run of `iters`={iters} updates; update {update + 1} is "
            "past it (build the stepper with the number of iterations it will run)."
        )
    return lr * (1 + math.cos(math.pi * update / iters)) / 2


def history_record(
    iteration: int,
    rewards: torch.Tensor,
    loss: torch.Tensor | None,
    seconds: float,
    elapsed: float,
    *,
    reward: object = None,
    memory: PeakMemory | None = None,
    best: torch.Tensor | None = None,
) -> dict:
    """One iterate's history record (the one builder of every latent method's history): ``iter``, ``reward``
    (batch mean), ``rewards``, ``best_so_far`` (the batch mean of ``best [B]``, each sample's best reward so far,
    this iterate's included; None: this iterate's ``rewards``), ``loss`` (when there is one), ``seconds``,
    ``elapsed``; ``reward_NAME`` for each term of a weighted ``reward``; ``peak_mem_bytes`` and ``mem_kind`` when a
    ``memory`` measurement ran."""
    rewards = rewards.detach()
    best = rewards if best is None else best.detach()
    record = {"iter": iteration, "reward": float(rewards.mean()), "rewards": rewards.tolist()}
    record["best_so_far"] = float(best.mean())
    if loss is not None:
        record["loss"] = float(loss.detach())
    record.update(seconds=seconds, elapsed=elapsed)
    for name, values in (getattr(reward, "last_terms", None) or {}).items():  # a weighted sum's terms
        record[f"reward_{name}"] = float(values.float().mean())
    if memory is not None:
        record.update(peak_mem_bytes=memory.peak_bytes, mem_kind=memory.kind)
    return record


def _check_gradient_reached(z: torch.Tensor, x0: torch.Tensor, grad: GradientMode) -> None:
    if x0.requires_grad and x0.grad is None:
        raise ConfigError(
            "The reward has no gradient path to the sample: `reward(x0, cond)` returned a tensor that does not "
            "depend on x0 through differentiable operations (computed under torch.no_grad(), detached, or "
            "converted to numbers?)."
        )
    if z.grad is None:
        raise ConfigError(
            f"{grad!r} gives no gradient to the latent (it detaches the steps before its kept ones); "
            "use sdo.Shortcut(), sdo.Full() or sdo.Checkpointed() to optimize a latent."
        )


@torch.no_grad()
def save_latent(path: str | Path, latent: torch.Tensor, **metadata: object) -> None:
    """Write a latent as safetensors (atomically), with string metadata (e.g. start_step, steps, classes): lists
    and dicts as JSON, other values as ``str`` gives them."""
    metadata = {key: json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v) for key, v in metadata.items()}
    save_tensors({"latent": latent}, path, metadata=metadata)


def load_latent(path: str | Path, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Read a latent written by ``save_latent``.

    Args:
        path: the safetensors file.
        shape: the latent shape the model takes (e.g. ``PipelineParts.latent_shape``, or ``(B, 1, 32, 32)`` for the
            embedded model); ``-1`` matches any size (e.g. ``(-1, 4, 64, 64)``). None: not checked.

    Raises:
        CorruptFileError: the file is corrupt, holds no ``latent``, holds NaN or infinite values, or (with
            ``shape``) a latent of another shape; the message names the file.
    """
    tensors = load_tensors(path)
    if "latent" not in tensors:
        raise CorruptFileError(f"{path}: no tensor named 'latent' (found {sorted(tensors)}).")
    latent = tensors["latent"]
    if shape is not None and (
        latent.ndim != len(shape) or any(want not in (-1, got) for want, got in zip(shape, latent.shape, strict=True))
    ):
        raise CorruptFileError(f"{path}: the latent has shape {tuple(latent.shape)}, the model takes {tuple(shape)}.")
    if latent.is_floating_point() and not bool(torch.isfinite(latent).all()):
        raise CorruptFileError(f"{path}: the latent holds NaN or infinite values.")
    return latent
