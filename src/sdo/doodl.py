"""DOODL: latent optimization through invertible EDICT sampling (Wallace et al., ICCV 2023, arXiv 2303.13703)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from .edict import EDICTSampler, Invertible
from .errors import ConfigError, NonFiniteRewardError
from .gradients import GradientMode, NoGrad
from .latent import OptimizationResult, Reward, _BestIterate, _project, history_record
from .memory import PeakMemory

__all__ = ["DoodlUpdate", "optimize_latent_doodl"]


class DoodlUpdate:
    """DOODL's update of a latent ``z`` from the gradient ``g`` of the reward (Wallace et al. 2023, ``doodl.py``):

        d = clip(lr * g, -clip, clip);  m = momentum * m + d;  z = z + m + perturbation * N(0, I);
        z = z * ||z_init|| / ||z||  (per sample, with ``renormalize``)

    One object per run: it holds the momentum ``m``, the initial norms and the perturbation's generator (seeded by
    ``seed``). ``sdo.optimize_latent_doodl`` and ``sdo bench`` both apply it.
    """

    def __init__(
        self,
        z: torch.Tensor,
        lr: float = 1.0,
        momentum: float = 0.9,
        clip: float | None = 1e-3,
        perturbation: float = 1e-4,
        renormalize: bool = True,
        seed: int = 0,
    ) -> None:
        self.lr, self.momentum, self.clip, self.perturbation, self.renormalize = (
            lr,
            momentum,
            clip,
            perturbation,
            renormalize,
        )
        self.radius = z.detach().flatten(1).norm(dim=1)
        self.noise = torch.Generator(device=z.device).manual_seed(seed)
        self.velocity: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self, z: torch.Tensor, gradient: torch.Tensor) -> None:
        """Move ``z`` (in place) up the reward along ``gradient``."""
        step = self.lr * gradient
        if self.clip is not None:
            step = step.clamp(-self.clip, self.clip)
        self.velocity = step if self.velocity is None else self.momentum * self.velocity + step
        z.add_(self.velocity)
        if self.perturbation:
            z.add_(self.perturbation * torch.randn(z.shape, generator=self.noise, device=z.device, dtype=z.dtype))
        if self.renormalize:
            _project(z, self.radius)


def optimize_latent_doodl(
    sampler: EDICTSampler,
    latent: torch.Tensor,
    reward: Reward,
    *,
    grad: GradientMode = Invertible(),  # noqa: B008 (a frozen, immutable value)
    start_step: int = 0,
    iters: int = 20,
    lr: float = 1.0,
    momentum: float = 0.9,
    clip: float | None = 1e-3,
    perturbation: float = 1e-4,
    renormalize: bool = True,
    seed: int = 0,
    cond: object = None,
    judge: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = True,
) -> OptimizationResult:
    """DOODL's optimizer, as the authors run it (``doodl.py``), over a latent tied to both EDICT chains.

    The objective is ``r(z) = (reward(x_0(z, z)) + reward(y_0(z, z))) / 2`` per sample: both coupled latents start
    at ``z`` and the two EDICT outputs are scored, as DOODL does. Each iteration, with ``g = d r / d z`` (through
    ``grad``, ``sdo.Invertible()`` by default: exact, flat memory):

        d = clip(lr * g, -clip, clip)        (element-wise gradient clipping)
        m = momentum * m + d                 (SGD momentum, no dampening; m = d at the first iteration)
        z = z + m + perturbation * N(0, I)   (a small noise perturbation)
        z = z * ||z_init|| / ||z||           (renormalization to the initial norm, per sample)

    Args:
        sampler: an ``sdo.EDICTSampler``.
        latent: ``[B, ...]`` initial noise (``start_step=0``) or the latent at ``start_step``. Not modified.
        reward: ``reward(x0, cond) -> [B]``, higher is better.
        grad: ``sdo.Invertible()`` or ``sdo.Full()`` (same gradient, memory growing with the steps).
        start_step: first step run. iters: updates (>= 0). lr: the authors' ``grad_scale`` (scales the gradient
            before clipping). momentum: in [0, 1). clip: the element-wise bound (None: no clipping).
        perturbation: standard deviation of the added noise (0: none), drawn from a generator seeded by ``seed``.
        renormalize: rescale each latent to its initial norm after every update (for initial noise).
        seed, cond, judge, progress: as for ``sdo.optimize_latent``.

    Returns:
        An ``sdo.OptimizationResult``: ``sample`` is the ``x`` output of EDICT; the history has one record per
        evaluated iterate (``iters + 1``) with ``iter``, ``reward`` (batch mean of the objective), ``rewards``,
        ``loss`` (``-sum_b r_b``), ``seconds``, ``elapsed``, ``peak_mem_bytes`` and ``mem_kind`` (always measured)
        and, with a judge, ``judge_success`` (on the ``x`` output).

    Raises:
        ConfigError: bad arguments. NonFiniteRewardError: a NaN or infinite reward (``result``: the run so far).
    """
    _check(sampler, iters, lr, momentum, clip, perturbation, grad)
    z = latent.detach().clone().requires_grad_(True)
    update = DoodlUpdate(z, lr, momentum, clip, perturbation, renormalize, seed)
    best, history, elapsed = _BestIterate(z), [], 0.0
    bar = tqdm(range(iters + 1), desc="optimize (DOODL)", disable=not progress, leave=False)
    for iteration in bar:
        final = iteration == iters
        started = time.perf_counter()
        with PeakMemory(z.device) as memory:
            with torch.set_grad_enabled(not final):
                x0, rewards = _objective(sampler, z, reward, NoGrad() if final else grad, start_step, cond)
            if not torch.isfinite(rewards).all():
                partial = best.result(z, x0, history)
                raise NonFiniteRewardError(
                    f"The reward is not finite at iteration {iteration} ({rewards.tolist()}); stopped. "
                    "The error's `result` holds the last finite iterate.",
                    partial,
                )
            best.update(z, x0, rewards.detach())  # before the update moves z: best_latent is best_sample's latent
            loss = -rewards.sum()
            if not final:
                (gradient,) = torch.autograd.grad(loss, z)
                if not bool(torch.isfinite(gradient).all()):
                    raise NonFiniteRewardError(
                        f"The gradient of the reward is not finite at iteration {iteration}; stopped before the "
                        "update. The error's `result` holds the best iterate so far.",
                        best.result(z, x0, history),
                    )
        if not final:
            update(z, -gradient)  # the gradient of the loss; DOODL ascends the reward
        seconds = 0.0 if final else time.perf_counter() - started
        elapsed += seconds
        record = history_record(iteration, rewards, loss, seconds, elapsed, reward=reward, memory=memory)
        if judge is not None:
            record["judge_success"] = float(judge(x0.detach()).float().mean())
        history.append(record)
        bar.set_postfix(reward=f"{record['reward']:.3f}")
    return best.result(z, x0, history)


def _objective(sampler: EDICTSampler, z, reward, grad, start_step, cond):
    """``x_0`` and the per-sample objective ``(reward(x_0) + reward(y_0)) / 2`` (with a graph unless NoGrad)."""
    x0, y0 = sampler.sample_pair(z, None, grad, start_step)
    x_rewards, y_rewards = reward(x0, cond), reward(y0, cond)
    for rewards in (x_rewards, y_rewards):
        if rewards.shape != (z.shape[0],):
            raise ConfigError(
                f"`reward` must return a [batch] tensor of shape ({z.shape[0]},), got {tuple(rewards.shape)}."
            )
    return x0, (x_rewards + y_rewards) / 2


def _check(sampler, iters, lr, momentum, clip, perturbation, grad) -> None:
    if not isinstance(sampler, EDICTSampler):
        raise ConfigError(f"DOODL optimizes through sdo.EDICTSampler, got {type(sampler).__name__}.")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ConfigError(f"`iters` must be an integer >= 0, got {iters!r}.")
    if not lr > 0:
        raise ConfigError(f"`lr` must be > 0, got {lr}.")
    if not 0 <= momentum < 1:
        raise ConfigError(f"`momentum` must be in [0, 1), got {momentum}.")
    if clip is not None and not clip > 0:
        raise ConfigError(f"`clip` must be > 0 or None, got {clip}.")
    if not perturbation >= 0:
        raise ConfigError(f"`perturbation` must be >= 0, got {perturbation}.")
    if isinstance(grad, NoGrad) or not isinstance(grad, GradientMode):
        raise ConfigError(f"`grad` must be sdo.Invertible() or sdo.Full(), got {grad!r}.")
