"""Gradient modes: which denoising steps keep an autograd graph, and how the gradient crosses the others.

Notation (docs/design.md): a solver step is affine in the state and the network output,

    x_{i+1} = a_i * x_i + b_i * eps_theta(x_i, t_i)  (+ c_i * noise_i),

for i = start, ..., stop - 1. A gradient mode assigns each step one of four roles:

- ``NOGRAD``: network and solver update run under ``torch.no_grad()``; nothing flows back through the step.
- ``SHORTCUT``: the network runs under ``torch.no_grad()`` (its output is detached), the solver update stays
  differentiable in x, so ``d x_{i+1} / d x_i = a_i I`` (plus the solver's own x-terms, e.g. DPM-Solver's
  x0-conversion) and the network Jacobian is skipped.
- ``FULL``: network and solver keep their graphs; activations are stored.
- ``CHECKPOINT``: as ``FULL``, but the step's activations are dropped in forward and recomputed in backward
  (same scheduler state, same noise), so the numbers are those of ``FULL``.

The modes are small frozen dataclasses passed as ``Sampler.sample(x, grad=mode)``: the sampler asks a per-step
mode for its ``roles``, and hands a ``LoopMode`` (``sdo.Adjoint``, ``sdo.Invertible``) the whole run.
Randomness (``RandomTruncation``'s depth, ``Shortcut(step="random")``'s index, ``AlignProp``'s per-step
thresholds) is drawn per trajectory (per ``roles`` call), from the mode's own ``generator``, never from the
sampler's noise generator: the trajectory is the same in every mode for one latent and one seed.
"""

from __future__ import annotations

import enum
import itertools
import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch

from .errors import ConfigError

__all__ = [
    "AlignProp",
    "Checkpointed",
    "Full",
    "GradientMode",
    "LoopMode",
    "NoGrad",
    "RandomTruncation",
    "Shortcut",
    "SpreadShortcut",
    "StepRole",
    "Truncated",
]


class StepRole(enum.Enum):
    """What one denoising step keeps for backward (see the module docstring)."""

    NOGRAD = "nograd"
    SHORTCUT = "shortcut"
    FULL = "full"
    CHECKPOINT = "checkpoint"


class GradientMode:
    """Base class of the gradient modes: ``roles(start, stop)`` gives one ``StepRole`` per step run."""

    def roles(self, start: int, stop: int) -> list[StepRole]:
        """Roles of steps ``start, ..., stop - 1`` (absolute indices into the sampler's schedule)."""
        raise NotImplementedError


class LoopMode(GradientMode):
    """A gradient mode that owns the whole sampling loop instead of assigning per-step roles (``sdo.Adjoint``).

    ``Sampler.sample`` hands such a mode the sampler and the run: ``mode.run(sampler, x, start, stop, generator)``
    returns the final latent, with whatever autograd connection the mode defines.
    """

    def roles(self, start: int, stop: int) -> list[StepRole]:
        raise ConfigError(f"{self!r} owns the sampling loop and has no per-step roles; pass it to Sampler.sample.")

    def run(self, sampler, x: torch.Tensor, start: int, stop: int, generator: torch.Generator | None) -> torch.Tensor:
        """Run steps ``start, ..., stop - 1`` of ``sampler`` from ``x``; return the final latent."""
        raise NotImplementedError


def _draw_int(low: int, high: int, generator: torch.Generator | None) -> int:
    """One integer uniformly in ``[low, high]`` (both inclusive) from ``generator`` (global RNG if None)."""
    return int(torch.randint(low, high + 1, (1,), generator=generator).item())


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"`{name}` must be an integer >= 1, got {value!r}.")


@dataclass(frozen=True)
class Full(GradientMode):
    """Full backpropagation through every step (the exact gradient; memory grows with the number of steps).

    Detached: nothing. Randomness: none. Gradient: ``d x_0 / d x_T = prod_i (a_i I + b_i d eps/dx |_i)`` and
    ``d x_0 / d theta = sum_i (prod_{j>i} J_j) b_i d eps/d theta |_i`` with ``J_j`` the full step Jacobian.
    """

    def roles(self, start: int, stop: int) -> list[StepRole]:
        return [StepRole.FULL] * (stop - start)


@dataclass(frozen=True)
class Checkpointed(GradientMode):
    """Full backpropagation with per-step activation checkpointing (``torch.utils.checkpoint``, non-reentrant).

    Same outputs and gradients as ``Full()``; each step's activations are recomputed in backward from the same
    scheduler state and the same noise, so memory stays flat at about twice the forward compute.
    Detached: nothing. Randomness: none.
    """

    def roles(self, start: int, stop: int) -> list[StepRole]:
        return [StepRole.CHECKPOINT] * (stop - start)


@dataclass(frozen=True)
class NoGrad(GradientMode):
    """Plain sampling: every step runs under ``torch.no_grad()``; the result carries no graph."""

    def roles(self, start: int, stop: int) -> list[StepRole]:
        return [StepRole.NOGRAD] * (stop - start)


@dataclass(frozen=True)
class Truncated(GradientMode):
    """Truncated backpropagation through the last ``k`` steps (DRaFT-K; Clark et al., "Directly Fine-Tuning
    Diffusion Models on Differentiable Rewards", ICLR 2024, arXiv 2309.17400).

    Steps before the last ``k`` run entirely under ``torch.no_grad()`` (network and solver), so the state entering
    the last ``k`` steps is detached: no gradient reaches the initial latent. The last ``k`` steps keep their full
    graph: ``d x_0 / d theta = sum_{i >= stop-k} (prod_{j>i} J_j) b_i d eps/d theta |_i``. Randomness: none.

    Args:
        k: the number of graphed steps at the end of the run (>= 1).
        checkpoint: the graphed steps are ``CHECKPOINT`` instead of ``FULL``: their activations are dropped in
            forward and recomputed in backward (same scheduler state, same noise), so the gradient is the same to
            float precision while memory is one step's activations plus the ``k`` stored step inputs, at one more
            network forward per graphed step (as ``Shortcut(checkpoint=True)``).
    """

    k: int = 1
    checkpoint: bool = False

    def __post_init__(self) -> None:
        _check_positive_int("k", self.k)

    def roles(self, start: int, stop: int) -> list[StepRole]:
        _check_fits("k", self.k, start, stop)
        graphed = StepRole.CHECKPOINT if self.checkpoint else StepRole.FULL
        return [StepRole.NOGRAD] * (stop - start - self.k) + [graphed] * self.k


@dataclass(frozen=True)
class RandomTruncation(GradientMode):
    """Truncation at a random depth drawn once per trajectory (the method ``random-truncation``; the TRL port of
    AlignProp draws this way, the official code draws per step: ``AlignProp``).

    ``k`` is drawn once per trajectory (per ``sample`` call, not per step), uniformly in ``[low, high]``, from
    ``generator`` (the global RNG when None); then the call behaves exactly as ``Truncated(k, checkpoint)``.

    Args:
        low, high: the range of the depth ``k`` (both inclusive, ``1 <= low <= high``).
        generator: source of the depth (the global RNG when None).
        checkpoint: recompute the ``k`` graphed steps in backward (``Truncated``'s ``checkpoint``): the official
            AlignProp code checkpoints the UNet in its truncated steps by default, so its memory is one step's
            activations plus the stored step inputs, not ``k`` steps' activations.
    """

    low: int = 1
    high: int = 1
    generator: torch.Generator | None = field(default=None, compare=False, repr=False)
    checkpoint: bool = False

    def __post_init__(self) -> None:
        _check_positive_int("low", self.low)
        _check_positive_int("high", self.high)
        if self.low > self.high:
            raise ConfigError(f"`low` must be <= `high`, got low={self.low}, high={self.high}.")

    def roles(self, start: int, stop: int) -> list[StepRole]:
        _check_fits("high", self.high, start, stop)
        return Truncated(_draw_int(self.low, self.high, self.generator), self.checkpoint).roles(start, stop)


@dataclass(frozen=True)
class AlignProp(GradientMode):
    """AlignProp's randomized truncation as the official code runs it (Prabhudesai et al., "Aligning Text-to-Image
    Diffusion Models with Reward Backpropagation", 2023, arXiv 2310.03739; mihirp1998/AlignProp ``main.py``,
    ``truncated_backprop_rand`` with ``truncated_backprop_minmax = (0, 50)``).

    For the n steps of a run (i = 0, ..., n - 1 counted from its first, noisiest step) a fresh threshold
    ``u_i ~ Uniform{0, ..., n}`` is drawn at every step; the step's network output keeps its graph when
    ``i >= u_i`` and is detached otherwise, so ``P(step i graphed) = (i + 1) / (n + 1)`` (about half of the steps,
    more of the late ones). A detached step is a ``SHORTCUT``: its solver update stays differentiable, so the chain
    carries the gradient along the solver's linear path (``d x_{i+1} / d x_i = a_i I``), as the official code's
    detached noise predictions do. Each graphed step is ``CHECKPOINT`` (the official code checkpoints every UNet
    call), or ``FULL`` with ``checkpoint=False`` (the same numbers, more memory).

    Gradient: ``d x_0 / d theta = sum_{i graphed} (prod_{j > i} J~_j) b_i d eps / d theta |_i`` with ``J~_j`` the
    full step Jacobian of a graphed step and ``a_j I`` of a detached one. Randomness: the n thresholds, drawn per
    trajectory (per ``roles`` call) from ``generator`` (the global RNG when None).

    Args:
        generator: source of the thresholds.
        checkpoint: recompute each graphed step in backward (default, as the official code).
    """

    generator: torch.Generator | None = field(default=None, compare=False, repr=False)
    checkpoint: bool = True

    def roles(self, start: int, stop: int) -> list[StepRole]:
        steps = stop - start
        thresholds = torch.randint(0, steps + 1, (steps,), generator=self.generator).tolist()
        graphed = StepRole.CHECKPOINT if self.checkpoint else StepRole.FULL
        return [graphed if i >= threshold else StepRole.SHORTCUT for i, threshold in enumerate(thresholds)]


StepChoice = Literal["first", "last", "random"] | int | tuple[int, ...]
_NAMED_STEPS = ("first", "last", "random")


@dataclass(frozen=True)
class Shortcut(GradientMode):
    """Shortcut Diffusion Optimization (SDO; Dou et al. 2025, arXiv 2505.07477): keep the graph of one step.

    The kept steps ``s, ..., s + k - 1`` call the network with a graph. Every other step calls it under
    ``torch.no_grad()`` (its output is detached) while the solver update stays differentiable in x, so the
    gradient crosses those steps along the solver's affine path. With one kept step s and shortcut steps
    ``x_{i+1} = a_i x_i + b_i eps_i`` (eps_i detached):

        d x_0 / d x_start ~= (prod_{i != s} a_i) (a_s I + b_s d eps/dx |_s)
        d x_0 / d theta   ~= (prod_{i > s} a_i) b_s d eps/d theta |_s

    and likewise for any conditioning tensor ``model_fn`` uses. Memory: one step's activations, whatever the
    number of steps.

    Args:
        step: ``"first"`` (the first step run, default; the paper's latent-optimization choice), ``"last"``,
            ``"random"`` (drawn once per trajectory, uniformly among valid starts, from ``generator``; the paper's
            fine-tuning choice), an integer index into the sampler's full schedule, which must lie in
            ``[start_step, stop - k]``, or a sequence of strictly increasing indices ``[i, j, ...]`` (an ablation
            beyond the paper: the graph is kept at exactly those steps, each one step long, and every other step is a
            shortcut; memory grows with the number of kept steps, not with the number of steps). With several kept
            steps s_1 < ... < s_m the gradient is the product, in step order, of ``a_i I`` over shortcut steps and the
            full step Jacobian ``a_s I + b_s d eps/dx |_s`` over kept steps.
        k: number of consecutive kept steps (defaults to 1, the paper's method; ``k > 1`` is an ablation; must be 1
            when ``step`` is a sequence).
        generator: source of the random step (the global RNG when None).
        checkpoint: recompute the kept steps' activations in backward (same numbers, less memory, one more
            network forward per kept step).
    """

    step: StepChoice = "first"
    k: int = 1
    generator: torch.Generator | None = field(default=None, compare=False, repr=False)
    checkpoint: bool = False

    def __post_init__(self) -> None:
        _check_positive_int("k", self.k)
        if isinstance(self.step, (list, tuple)):
            object.__setattr__(self, "step", _check_step_list(self.step, self.k))
            return
        if isinstance(self.step, bool) or not (isinstance(self.step, int) or self.step in _NAMED_STEPS):
            raise ConfigError(f"`step` must be one of {_NAMED_STEPS} or an integer index, got {self.step!r}.")
        if isinstance(self.step, int) and self.step < 0:
            raise ConfigError(f"`step` must be a non-negative step index, got {self.step}.")

    def first_kept(self, start: int, stop: int) -> int:
        """Absolute index of the first kept step for a run of steps ``start, ..., stop - 1``."""
        _check_fits("k", self.k, start, stop)
        if isinstance(self.step, tuple):
            return self.kept_steps(start, stop)[0]
        last_valid = stop - self.k
        if self.step == "first":
            return start
        if self.step == "last":
            return last_valid
        if self.step == "random":
            return _draw_int(start, last_valid, self.generator)
        if not start <= self.step <= last_valid:
            raise ConfigError(
                f"`step` must be an index in [{start}, {last_valid}] for steps {start}..{stop - 1} with k={self.k}, "
                f"got step={self.step}."
            )
        return self.step

    def kept_steps(self, start: int, stop: int) -> tuple[int, ...]:
        """Absolute indices of every kept step for a run of steps ``start, ..., stop - 1``."""
        if not isinstance(self.step, tuple):
            first = self.first_kept(start, stop)
            return tuple(range(first, first + self.k))
        outside = [index for index in self.step if not start <= index < stop]
        if outside:
            raise ConfigError(
                f"`step` indices must lie in [{start}, {stop - 1}] for steps {start}..{stop - 1}, got {outside} "
                f"outside (step={list(self.step)})."
            )
        return self.step

    def roles(self, start: int, stop: int) -> list[StepRole]:
        kept = self.kept_steps(start, stop)
        role = StepRole.CHECKPOINT if self.checkpoint else StepRole.FULL
        return [role if index in kept else StepRole.SHORTCUT for index in range(start, stop)]


@dataclass(frozen=True)
class SpreadShortcut(Shortcut):
    """SDO keeping ``count`` steps evenly spread over whatever run it is given, the first one included (the
    ``sdo-multi`` method without ``--kept-steps``; an ablation beyond the paper).

    For a run of ``m = stop - start`` steps, the kept steps are ``start + (j * m) // c`` for ``j = 0, ..., c - 1``
    with ``c = min(count, m)``; each is ``FULL`` (``CHECKPOINT`` with ``checkpoint``), every other step a
    ``SHORTCUT``, and the gradient is ``Shortcut(step=[...])``'s with those indices. Randomness: none.

    On a run of ``count`` steps or fewer every step is kept: the roles, and so the gradient and the memory, are
    those of ``Full()`` (``Checkpointed()`` with ``checkpoint``). The mode still runs (it is the same computation),
    but it never does so silently: ``roles`` warns (``UserWarning``) and ``covers_every_step`` says so, for callers
    that record it.

    Args:
        count (`int`, defaults to 4): the number of kept steps (>= 1). checkpoint: as for ``Shortcut``.
    """

    count: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive_int("count", self.count)

    def kept_steps(self, start: int, stop: int) -> tuple[int, ...]:
        remaining = stop - start
        count = min(self.count, remaining)
        return tuple(sorted({start + (k * remaining) // count for k in range(count)}))

    def covers_every_step(self, start: int, stop: int) -> bool:
        """Whether every step of the run ``start, ..., stop - 1`` is kept (the mode then equals ``Full()``)."""
        return len(self.kept_steps(start, stop)) == stop - start

    def roles(self, start: int, stop: int) -> list[StepRole]:
        if self.covers_every_step(start, stop):
            same = "Checkpointed()" if self.checkpoint else "Full()"
            warnings.warn(
                f"SpreadShortcut(count={self.count}) keeps every one of the {stop - start} steps run: this run is "
                f"{same} (same gradient, same memory), not a shortcut.",
                UserWarning,
                stacklevel=2,
            )
        return super().roles(start, stop)


def _check_step_list(steps: list[int] | tuple[int, ...], k: int) -> tuple[int, ...]:
    """Validate ``Shortcut(step=[...])``: a non-empty, strictly increasing sequence of indices >= 0, with k = 1."""
    if not steps or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in steps):
        raise ConfigError(f"`step` as a sequence must hold step indices >= 0 (at least one), got {list(steps)!r}.")
    if any(a >= b for a, b in itertools.pairwise(steps)):
        raise ConfigError(f"`step` as a sequence must be strictly increasing (sorted, no repeats), got {list(steps)}.")
    if k != 1:
        raise ConfigError(f"`k` must be 1 when `step` is a sequence of kept steps, got k={k}.")
    return tuple(steps)


def _check_fits(name: str, value: int, start: int, stop: int) -> None:
    remaining = stop - start
    if value > remaining:
        raise ConfigError(
            f"`{name}`={value} is larger than the {remaining} remaining steps ({start}..{stop - 1}); "
            f"use a value in [1, {remaining}]."
        )
