"""Inference-time latent optimization (the paper's editing tasks); ``invert`` (``sdo.inversion``) is re-exported."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checks import check_positive, check_seed
from .errors import ConfigError, CorruptFileError, NonFiniteRewardError
from .gradients import GradientMode, NoGrad, Shortcut
from .inversion import invert
from .io import load_tensors, save_tensors
from .memory import PeakMemory
from .rewards import latent_prior
from .sampling import Sampler

__all__ = ["NonFiniteRewardError", "OptimizationResult", "invert", "load_latent", "optimize_latent", "save_latent"]

Reward = Callable[[torch.Tensor, object], torch.Tensor]


@dataclass
class OptimizationResult:
    """What ``optimize_latent`` returns.

    Attributes:
        latent: ``[B, ...]`` the final latent (after ``iters`` Adam updates).
        sample: ``[B, ...]`` its sample.
        best_latent, best_sample, best_reward: per batch element, the iterate with the highest reward seen:
            ``sampler.sample(best_latent)`` gives ``best_sample`` and ``reward(best_sample)`` gives ``best_reward``.
        history: one dict per evaluated iterate (``iters + 1`` of them, the last being the final latent):
            ``iter``, ``reward`` (batch mean), ``rewards`` (per sample), ``loss``, ``seconds`` (wall-clock of that
            iteration, 0 for the final evaluation), ``elapsed``; with ``measure=True``, ``peak_mem_bytes`` and
            ``mem_kind`` (not for the final evaluation); with a judge, ``judge_success`` (fraction of the batch the
            judge accepts).
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


@dataclass(frozen=True)
class _Objective:
    """What one iteration evaluates: ``reward(sample(z), cond) - prior_weight * latent_prior(z)``."""

    sampler: Sampler
    reward: Reward
    start_step: int
    seed: int
    cond: object
    prior_weight: float

    def __call__(self, z: torch.Tensor, grad: GradientMode) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x0, rewards [B] detached, loss)``; the loss carries the graph ``grad`` keeps."""
        generator = torch.Generator(device=z.device).manual_seed(self.seed)
        with torch.set_grad_enabled(not isinstance(grad, NoGrad)):
            x0 = self.sampler.sample(z, grad=grad, start_step=self.start_step, generator=generator)
            rewards = self.reward(x0, self.cond)
            if rewards.shape != (z.shape[0],):
                raise ConfigError(
                    f"`reward` must return a [batch] tensor of shape ({z.shape[0]},), got {tuple(rewards.shape)}."
                )
            loss = -rewards.sum()
            if self.prior_weight:
                loss = loss + self.prior_weight * latent_prior(z).sum()
        return x0, rewards.detach(), loss


def optimize_latent(
    sampler: Sampler,
    latent: torch.Tensor,
    reward: Reward,
    *,
    grad: GradientMode = Shortcut(),  # noqa: B008 (a frozen, immutable value)
    start_step: int = 0,
    iters: int = 20,
    lr: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.9),
    prior_weight: float = 0.0,
    project_to_shell: bool = False,
    seed: int = 0,
    cond: object = None,
    judge: Callable[[torch.Tensor], torch.Tensor] | None = None,
    measure: bool = False,
    progress: bool = True,
) -> OptimizationResult:
    """Maximize ``reward(sample(z), cond) - prior_weight * latent_prior(z)`` over the latent ``z`` with Adam.

    Each iteration samples ``x0`` from ``z`` with the gradient mode ``grad`` (``Shortcut()``: the SDO one-step
    gradient of Dou et al. 2025; ``Full()``: exact backpropagation), and takes one Adam step on
    ``loss = -sum_b reward_b + prior_weight * sum_b latent_prior(z_b)``. The defaults follow the authors'
    reference scripts (Adam, lr 0.01, betas (0.9, 0.9)).

    Args:
        sampler: the sampler (model, scheduler, steps).
        latent: ``[B, ...]`` the initial noise (``start_step=0``) or the latent at ``start_step`` (after a no-grad
            warm-up with ``sampler.sample(..., stop_step=k)``, or after ``sdo.invert``). Not modified.
        reward: ``reward(x0, cond) -> [B]``, higher is better (the one reward protocol of ``sdo.rewards``).
        grad: gradient mode; start_step: first step run; iters: Adam updates; lr, betas: Adam's.
        prior_weight: weight of the Gaussian-shell regularizer (0 disables it).
        project_to_shell: after each Adam step, rescale each latent to its initial norm (for initial noise, about
            ``sqrt(dim)``): the hard version of the prior, as DOODL does.
        seed: seeds the sampler's noise generator anew every iteration, so one latent always maps to one sample.
        cond: passed to ``reward``.
        judge: optional ``x0 -> [B] bool`` acceptance test recorded in the history (never optimized).
        measure: record each iteration's extra memory (``peak_mem_bytes``, and ``mem_kind``: see
            ``sdo.memory.PeakMemory``). Off by default: on CUDA it resets the process's peak-memory statistics.
        progress: show a tqdm progress bar with the reward.

    Raises:
        NonFiniteRewardError: the reward or its gradient is NaN or infinite; its ``result`` holds the last iterate
            whose reward and gradient were finite (``latent``, ``sample``) and the best iterate so far.
        ConfigError: bad arguments; a gradient mode that gives the latent no gradient; a reward with no gradient
            path to the sample.
    """
    if iters < 0:
        raise ConfigError(f"`iters` must be >= 0, got {iters}.")
    check_positive(lr, "lr")
    check_seed(seed)
    objective = _Objective(sampler, reward, start_step, seed, cond, prior_weight)
    z = latent.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=lr, betas=betas)
    best = _BestIterate(z)
    radius = z.detach().flatten(1).norm(dim=1)
    history: list[dict] = []
    last_finite: tuple[torch.Tensor, torch.Tensor] | None = None  # (latent, sample) of the last finite iterate
    elapsed = 0.0
    bar = tqdm(range(iters + 1), desc=f"optimize ({type(grad).__name__})", disable=not progress, leave=False)
    for iteration in bar:
        final = iteration == iters
        started = time.perf_counter()
        with PeakMemory(z.device) if measure and not final else nullcontext() as memory:
            x0, rewards, loss = objective(z, NoGrad() if final else grad)
            if not torch.isfinite(rewards).all():
                partial = best.result(*(last_finite or (z, x0)), history)
                raise NonFiniteRewardError(
                    f"The reward is not finite at iteration {iteration} ({rewards.tolist()}); stopped. "
                    "The error's `result` holds the last finite iterate.",
                    partial,
                )
            best.update(z, x0, rewards)  # before the Adam step moves z: best_latent is the latent of best_sample
            last_finite = (z.detach().clone(), x0.detach())
            if not final:
                optimizer.zero_grad()
                if x0.requires_grad:
                    x0.retain_grad()
                if loss.requires_grad:
                    loss.backward()
                _check_gradient_reached(z, x0, grad)
                if not bool(torch.isfinite(z.grad).all()):
                    partial = best.result(*last_finite, history)
                    raise NonFiniteRewardError(
                        f"The gradient of the reward is not finite at iteration {iteration} (the reward is); "
                        "stopped before the Adam step. The error's `result` holds the last finite iterate.",
                        partial,
                    )
        if not final:
            optimizer.step()
            if project_to_shell:
                _project(z, radius)
        seconds = 0.0 if final else time.perf_counter() - started
        elapsed += seconds
        record = history_record(iteration, rewards, loss, seconds, elapsed, reward=reward, memory=memory)
        if judge is not None:
            record["judge_success"] = float(judge(x0.detach()).float().mean())
        history.append(record)
        bar.set_postfix(reward=f"{record['reward']:.3f}")
    return best.result(z, x0, history)


def history_record(
    iteration: int,
    rewards: torch.Tensor,
    loss: torch.Tensor,
    seconds: float,
    elapsed: float,
    *,
    reward: object = None,
    memory: PeakMemory | None = None,
) -> dict:
    """One iterate's history record (shared by ``optimize_latent`` and ``sdo.optimize_latent_doodl``): ``iter``,
    ``reward`` (batch mean), ``rewards``, ``loss``, ``seconds``, ``elapsed``; ``reward_NAME`` for each term of a
    weighted ``reward``; ``peak_mem_bytes`` and ``mem_kind`` when a ``memory`` measurement ran."""
    rewards = rewards.detach()
    record = {
        "iter": iteration,
        "reward": float(rewards.mean()),
        "rewards": rewards.tolist(),
        "loss": float(loss.detach()),
        "seconds": seconds,
        "elapsed": elapsed,
    }
    for name, values in (getattr(reward, "last_terms", None) or {}).items():  # a weighted sum's terms
        record[f"reward_{name}"] = float(values.float().mean())
    if memory is not None:
        record.update(peak_mem_bytes=memory.peak_bytes, mem_kind=memory.kind)
    return record


@torch.no_grad()
def _project(z: torch.Tensor, radius: torch.Tensor) -> None:
    """Rescale each latent in place to norm ``radius`` (one per batch element)."""
    z.mul_((radius / z.flatten(1).norm(dim=1)).view(-1, *[1] * (z.ndim - 1)))


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
    """Write a latent as safetensors (atomically), with string metadata (e.g. start_step, steps, classes)."""
    save_tensors({"latent": latent}, path, metadata={key: str(value) for key, value in metadata.items()})


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
