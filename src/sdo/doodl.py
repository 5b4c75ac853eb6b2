"""DOODL: latent optimization through invertible EDICT sampling (Wallace et al., "End-to-End Diffusion Latent
Optimization Improves Classifier Guidance", ICCV 2023, arXiv 2303.13703), over EDICT (Wallace et al., CVPR 2023).

``optimize_latent_doodl`` / ``doodl_stepper`` run the authors' update (``DoodlUpdate``: SGD with momentum,
element-wise clipping, a noise perturbation, the projection to the shell); ``doodl_adam_stepper`` the same
exact-inversion gradient of the same objective (``PairObjective``) with ``sdo.optimize_latent``'s Adam update instead.
``DoodlSettings`` holds the authors' values, the one set of defaults; ``scaled_clip`` sizes the element-wise clip to a
run's length.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .checks import check_int, check_learning_rate, check_positive, check_rewards
from .edict import EDICTSampler, Invertible
from .errors import ConfigError
from .gradients import GradientMode, NoGrad
from .latent import AdamSettings, LatentProblem, LatentStepper, OptimizationResult, Shell, adam_update
from .protocols import LatentReward
from .sampling import Sampler

__all__ = [
    "DoodlSettings",
    "DoodlUpdate",
    "PairObjective",
    "doodl_adam_stepper",
    "doodl_stepper",
    "edict_sampler",
    "optimize_latent_doodl",
    "scaled_clip",
]


@dataclass(frozen=True)
class DoodlSettings:
    """DOODL's update as the authors run it (Wallace et al. 2023, ``doodl.py``), written once: ``DoodlUpdate``,
    ``optimize_latent_doodl``, ``doodl_stepper``, ``sdo.methods.MethodOptions`` and the ``--doodl-*`` flags read
    these defaults.

    Attributes:
        lr: the authors' ``grad_scale``, which scales the gradient before clipping.
        momentum: SGD momentum, in [0, 1).
        clip: the element-wise bound on ``lr * g`` per iteration (None: no clipping); 1e-3 is sized for the authors'
            ``iters`` (``scaled_clip`` keeps their total movement in a shorter run).
        perturbation: standard deviation of the noise added after each update (0: none).
        project_to_shell: rescale each latent to its initial norm after each update (``sdo.latent.Shell``).
        iters: the run length the authors' clip is sized for (their runs take 50 or more iterations).
    """

    lr: float = 1.0
    momentum: float = 0.9
    clip: float | None = 1e-3
    perturbation: float = 1e-4
    project_to_shell: bool = True
    iters: int = 50


DOODL_CLIP = DoodlSettings.clip
"""The authors' element-wise clip of ``lr * g`` per iteration (``DoodlSettings.clip``, the default)."""
DOODL_ITERS = DoodlSettings.iters
"""The run length the authors' clip is sized for (``DoodlSettings.iters``)."""


def scaled_clip(iters: int) -> float:
    """The element-wise clip that lets a run of ``iters`` iterations move each latent element as far as the authors'
    run: ``DoodlSettings.clip * DoodlSettings.iters / iters = 1e-3 * 50 / iters``.

    DOODL clips each element of ``lr * g`` at ``c = 1e-3`` per iteration, so ``n = 50`` iterations move an element by
    at most ``n c = 0.05`` (before momentum, which scales every run alike). A shorter run keeps that total by
    spreading it over its ``iters``: ``c(iters) = 0.05 / iters`` (1e-3 at 50, 5e-3 at 10, 0.05 at 1).

    Raises:
        ConfigError: ``iters`` is not an integer >= 1.
    """
    return DoodlSettings.clip * DoodlSettings.iters / check_int(iters, "iters", low=1)


def edict_sampler(sampler: Sampler | EDICTSampler) -> EDICTSampler:
    """The ``sdo.EDICTSampler`` over ``sampler``'s model and schedule (the one place DOODL's chain is built from a
    plain sampler; an ``EDICTSampler`` is returned as is).

    Raises:
        ConfigError: a sampler whose schedule EDICT cannot reproduce (``timestep_options``, or see
            ``sdo.EDICTSampler``).
    """
    if isinstance(sampler, EDICTSampler):
        return sampler
    if sampler.timestep_options or sampler.eta:
        raise ConfigError(
            "DOODL runs EDICT over deterministic DDIM with the scheduler's own timesteps; this sampler has "
            f"eta={sampler.eta} and timestep_options={sampler.timestep_options}."
        )
    return EDICTSampler(sampler.model_fn, sampler.scheduler, sampler.num_inference_steps)


@dataclass(frozen=True)
class PairObjective:
    """DOODL's objective: ``r(z) = (reward(x_0(z, z), cond) + reward(y_0(z, z), cond)) / 2`` per sample.

    Both coupled EDICT latents start at ``z`` and the two outputs are scored, as DOODL does (Wallace et al. 2023).
    The sample reported is the ``x`` output; the loss is ``-sum_b r_b``.
    """

    sampler: EDICTSampler
    reward: LatentReward
    start_step: int = 0
    cond: object = None

    def __call__(self, z: torch.Tensor, grad: GradientMode) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x0, rewards [B] detached, loss)``; the loss carries the graph ``grad`` keeps."""
        with torch.set_grad_enabled(not isinstance(grad, NoGrad)):
            x0, y0 = self.sampler.sample_pair(z, None, grad, self.start_step)
            batch = z.shape[0]
            rewards = (
                check_rewards(self.reward(x0, self.cond), batch) + check_rewards(self.reward(y0, self.cond), batch)
            ) / 2
            loss = -rewards.sum()
        return x0, rewards.detach(), loss


class DoodlUpdate:
    """DOODL's update of a latent ``z`` (Wallace et al. 2023, ``doodl.py``), from the gradient ``g`` of the reward:

        d = clip(lr * g, -clip, clip);  m = momentum * m + d;  z = z + m + perturbation * N(0, I);
        z = z * ||z_init|| / ||z||  (per sample, with ``project_to_shell``: ``sdo.latent.Shell``)

    One object per run: it holds the momentum ``m``, the initial norms and the perturbation's generator (seeded by
    ``seed``). It is an ``sdo.latent.UpdateRule``: called with the gradient of the loss ``-sum_b r_b``, it ascends the
    reward (``g`` is minus that gradient).
    """

    def __init__(
        self,
        z: torch.Tensor,
        lr: float = DoodlSettings.lr,
        momentum: float = DoodlSettings.momentum,
        clip: float | None = DoodlSettings.clip,
        perturbation: float = DoodlSettings.perturbation,
        project_to_shell: bool = DoodlSettings.project_to_shell,
        seed: int = 0,
    ) -> None:
        self.lr, self.momentum, self.clip, self.perturbation = lr, momentum, clip, perturbation
        self.shell = Shell(z) if project_to_shell else None
        self.noise = torch.Generator(device=z.device).manual_seed(seed)
        self.velocity: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self, z: torch.Tensor, gradient: torch.Tensor) -> None:
        """Move ``z`` (in place) up the reward, i.e. against ``gradient``, the gradient of the loss."""
        move = -self.lr * gradient
        if self.clip is not None:
            move = move.clamp(-self.clip, self.clip)
        self.velocity = move if self.velocity is None else self.momentum * self.velocity + move
        z.add_(self.velocity)
        if self.perturbation:
            z.add_(self.perturbation * torch.randn(z.shape, generator=self.noise, device=z.device, dtype=z.dtype))
        if self.shell is not None:
            self.shell.project(z)


def optimize_latent_doodl(
    sampler: EDICTSampler,
    latent: torch.Tensor,
    reward: LatentReward,
    *,
    grad: GradientMode | None = None,
    start_step: int = 0,
    iters: int = 20,
    lr: float = DoodlSettings.lr,
    momentum: float = DoodlSettings.momentum,
    clip: float | None = DoodlSettings.clip,
    perturbation: float = DoodlSettings.perturbation,
    project_to_shell: bool = DoodlSettings.project_to_shell,
    renormalize: bool | None = None,
    seed: int = 0,
    cond: object = None,
    judge: Callable[[torch.Tensor], torch.Tensor] | None = None,
    measure: bool = False,
    progress: bool = True,
) -> OptimizationResult:
    """DOODL's optimizer, as the authors run it (``doodl.py``), over a latent tied to both EDICT chains.

    The objective is ``PairObjective``'s ``r(z) = (reward(x_0(z, z)) + reward(y_0(z, z))) / 2`` per sample. Each
    iteration, with ``g = d r / d z`` (through ``grad``, a new ``sdo.Invertible()`` when None: exact, flat memory):

        d = clip(lr * g, -clip, clip)        (element-wise gradient clipping)
        m = momentum * m + d                 (SGD momentum, no dampening; m = d at the first iteration)
        z = z + m + perturbation * N(0, I)   (a small noise perturbation)
        z = z * ||z_init|| / ||z||           (projection to the shell of the initial norm, per sample)

    The loop is ``sdo.latent.LatentStepper``'s, the one ``sdo.optimize_latent`` runs, with ``DoodlUpdate`` as its
    update rule. The defaults are ``DoodlSettings``'s (the authors' values).

    Args:
        sampler: an ``sdo.EDICTSampler``.
        latent: ``[B, ...]`` initial noise (``start_step=0``) or the latent at ``start_step``. Not modified.
        reward: ``reward(x0, cond) -> [B]``, higher is better.
        grad: ``sdo.Invertible()`` or ``sdo.Full()`` (same gradient, memory growing with the steps).
        start_step: first step run. iters: updates (>= 0). lr: the authors' ``grad_scale`` (scales the gradient
            before clipping). momentum: in [0, 1). clip: the element-wise bound (None: no clipping); the authors'
            1e-3 is sized for their 50+ iterations, ``scaled_clip(iters)`` keeps their total movement in a shorter run.
        perturbation: standard deviation of the added noise (0: none), drawn from a generator seeded by ``seed``.
        project_to_shell: rescale each latent to its initial norm after every update (for initial noise).
        renormalize: the old name of ``project_to_shell`` (the authors' word), still accepted; when given, it wins.
        seed, cond, judge, measure, progress: as for ``sdo.optimize_latent``.

    Returns:
        An ``sdo.OptimizationResult``: ``sample`` is the ``x`` output of EDICT; the history has one record per
        evaluated iterate (``iters + 1``) with ``iter``, ``reward`` (batch mean of the objective), ``rewards``,
        ``loss`` (``-sum_b r_b``), ``seconds``, ``elapsed``, with ``measure=True`` ``peak_mem_bytes`` and
        ``mem_kind``, and, with a judge, ``judge_success`` (on the ``x`` output).

    Raises:
        ConfigError: bad arguments. NonFiniteRewardError: a NaN or infinite reward or gradient; as for
            ``sdo.optimize_latent``, its ``result`` holds the last iterate whose reward was finite.
    """
    check_int(iters, "iters")
    project_to_shell = project_to_shell if renormalize is None else renormalize
    problem = LatentProblem(sampler, latent, reward, start_step, seed, cond, judge, measure)
    stepper = doodl_stepper(problem, grad, lr, momentum, clip, perturbation, project_to_shell)
    return stepper.run(iters, "optimize (DOODL)", progress)


def doodl_stepper(
    problem: LatentProblem,
    grad: GradientMode | None = None,
    lr: float = DoodlSettings.lr,
    momentum: float = DoodlSettings.momentum,
    clip: float | None = DoodlSettings.clip,
    perturbation: float = DoodlSettings.perturbation,
    project_to_shell: bool = DoodlSettings.project_to_shell,
) -> LatentStepper:
    """The ``sdo.latent.LatentStepper`` of ``optimize_latent_doodl`` (its arguments, checked here; the problem's
    sampler is an ``sdo.EDICTSampler``): ``PairObjective`` with ``DoodlUpdate``. ``sdo bench`` runs it one
    iteration at a time."""
    grad = Invertible() if grad is None else grad  # a fresh mode (and its stats) per run, never a shared default
    sampler = _edict_of(problem)
    _check(lr, momentum, clip, perturbation, grad)
    problem.check(sampler.network)
    objective = PairObjective(sampler, problem.reward, problem.start_step, problem.cond)

    def doodl(z: torch.Tensor) -> DoodlUpdate:
        return DoodlUpdate(z, lr, momentum, clip, perturbation, project_to_shell, problem.seed)

    return problem.stepper(objective, doodl, grad)


def doodl_adam_stepper(
    problem: LatentProblem,
    grad: GradientMode | None = None,
    *,
    lr: float = AdamSettings.lr,
    betas: tuple[float, float] = AdamSettings.betas,
    project_to_shell: bool = AdamSettings.project_to_shell,
    lr_schedule: str = AdamSettings.lr_schedule,
    iters: int | None = None,
) -> LatentStepper:
    """DOODL's gradient with ``sdo.optimize_latent``'s update (the ``doodl-adam`` method): the
    ``sdo.latent.LatentStepper`` of ``PairObjective`` (``r(z) = (reward(x_0) + reward(y_0)) / 2`` on the EDICT pair,
    gradient by exact inversion, ``sdo.Invertible()`` when ``grad`` is None) with ``sdo.latent.AdamUpdate``:

        z = Adam(z, -d r / d z; lr, betas);   z = z * ||z_init|| / ||z||  (per sample, with ``project_to_shell``)

    It separates DOODL's gradient (Wallace et al., ICCV 2023) from its SGD + momentum + clipping update: same
    chain and objective as ``doodl_stepper``, so the first gradient is the same. The problem's sampler is an
    ``sdo.EDICTSampler``. ``lr_schedule`` and ``iters`` (the run's updates) are ``sdo.latent.latent_stepper``'s.

    Raises:
        ConfigError: a sampler that is not an ``sdo.EDICTSampler``, a bad ``lr``, ``betas``, ``lr_schedule``,
            ``grad`` or latent.
    """
    grad = Invertible() if grad is None else grad  # a fresh mode (and its stats) per run
    sampler = _edict_of(problem)
    adam = adam_update(lr, betas, project_to_shell, lr_schedule, iters)
    _check_grad(grad)
    problem.check(sampler.network)
    objective = PairObjective(sampler, problem.reward, problem.start_step, problem.cond)
    return problem.stepper(objective, adam, grad)


def _edict_of(problem: LatentProblem) -> EDICTSampler:
    """The problem's sampler, which DOODL's chain needs to be an ``sdo.EDICTSampler``."""
    if not isinstance(problem.sampler, EDICTSampler):
        raise ConfigError(f"DOODL optimizes through sdo.EDICTSampler, got {type(problem.sampler).__name__}.")
    return problem.sampler


def _check_grad(grad: object) -> None:
    if isinstance(grad, NoGrad) or not isinstance(grad, GradientMode):
        raise ConfigError(f"`grad` must be sdo.Invertible() or sdo.Full(), got {grad!r}.")


def _check(lr, momentum, clip, perturbation, grad) -> None:
    check_learning_rate(lr)
    if isinstance(momentum, bool) or not 0 <= check_positive(momentum, "momentum", allow_zero=True) < 1:
        raise ConfigError(f"`momentum` must be in [0, 1), got {momentum}.")
    if clip is not None:
        check_positive(clip, "clip")
    check_positive(perturbation, "perturbation", allow_zero=True)
    _check_grad(grad)
