"""The estimator registry: one table from every method name the ``sdo`` command accepts to what it runs.

Every command (``optimize``, ``demo``, ``finetune``, ``bench``) resolves ``--method``/``--methods`` here, so one
name means one thing everywhere. ``sdo bench --list-methods`` prints the table. Each entry carries its runner: a
gradient mode through ``sdo.optimize_latent``'s loop (Adam), DOODL's loop on the EDICT chain, or FreeDoM guidance.
``Method.stepper`` gives one run stepped one iteration at a time (``sdo bench``) and ``Method.optimize`` the whole
run (``sdo optimize``). The gradient modes themselves are in ``sdo.gradients``; see ``docs/design.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal, Protocol

import torch

from .adjoint import Adjoint
from .doodl import doodl_adam_stepper, doodl_stepper, edict_sampler
from .errors import ConfigError
from .freedom import GuidanceStepper
from .gradients import Checkpointed, Full, GradientMode, NoGrad, RandomTruncation, Shortcut, SpreadShortcut, Truncated
from .latent import LatentProblem, OptimizationResult, latent_stepper

__all__ = [
    "DOODL",
    "DOODL_ADAM",
    "GUIDANCE",
    "METHODS",
    "MODE",
    "Method",
    "MethodOptions",
    "Runner",
    "Stepper",
    "describe_methods",
    "find_method",
    "gradient_mode",
    "method_names",
]

Variable = Literal["latent", "weights"]


@dataclass(frozen=True)
class MethodOptions:
    """What a method's gradient mode and runner may depend on.

    Attributes:
        variable: what is optimized, ``"latent"`` or ``"weights"`` (``sdo`` keeps a different step for each, as the
            paper does).
        generator: source of the mode's random draws (``sdo`` for weights, ``sdo-random``, ``alignprop``).
        draft_k: k of ``draft-k``. alignprop_high: ``alignprop`` draws its depth in ``[1, alignprop_high]``.
        checkpoint_kept: the ``sdo*`` methods recompute their kept step in backward, ``draft-k``/``draft-1`` their
            graphed steps (less memory, same gradient). ``alignprop`` always does (AlignProp, Prabhudesai et al.
            2023, arXiv 2310.03739: the official code checkpoints the UNet in its truncated steps).
        adjoint_iters: fixed-point refinements of ``adjoint``'s reconstructions (``sdo.Adjoint(fixed_point_iters)``).
        adjoint_checkpoint_every: ``adjoint`` stores every k-th state in forward and rebuilds only the states between
            two stored ones (``sdo.Adjoint(checkpoint_every)``: O(n / k) latents, drift bounded to k steps); None
            stores none.
        kept_steps: the kept steps of ``sdo-multi`` (``sdo.Shortcut(step=[...])``); None spreads 4 over the run
            (``sdo.gradients.SpreadShortcut``).
        lr, prior_weight, project_to_shell: the Adam run of a gradient mode (``sdo.optimize_latent``'s arguments).
        doodl_lr, doodl_renormalize: DOODL's ``lr`` and ``renormalize`` (``sdo.optimize_latent_doodl``).
        doodl_clip: DOODL's element-wise clip of ``lr * g`` per iteration (its ``clip``); the authors' 1e-3 is sized
            for 50+ iterations, ``sdo.doodl.scaled_clip(iters)`` keeps their total movement in a shorter run.
        (``doodl-adam`` takes ``lr`` and ``project_to_shell``, the Adam run's.)
        freedom_scale, freedom_repeats: FreeDoM's ``scale`` and ``repeats`` (``sdo.freedom_sample``).
    """

    variable: Variable = "latent"
    generator: torch.Generator | None = None
    draft_k: int = 1
    alignprop_high: int = 10
    checkpoint_kept: bool = False
    adjoint_iters: int = 2
    adjoint_checkpoint_every: int | None = None
    kept_steps: tuple[int, ...] | None = None
    lr: float = 0.05
    prior_weight: float = 0.0
    project_to_shell: bool = True
    doodl_lr: float = 1.0
    doodl_clip: float = 1e-3
    doodl_renormalize: bool = True
    freedom_scale: float = 0.2
    freedom_repeats: int = 1


class Stepper(Protocol):
    """One run of a latent method, one iteration per ``step()``: ``sdo.latent.LatentStepper`` (gradient modes and
    DOODL) or ``sdo.freedom.GuidanceStepper``. ``gradient`` is the last iteration's loss gradient (None if none)."""

    gradient: torch.Tensor | None

    def step(self) -> dict:
        """One iteration; its history record."""

    def finish(self) -> OptimizationResult:
        """The run's result."""

    def run(self, iters: int, description: str, progress: bool = True) -> OptimizationResult:
        """The whole run: ``iters`` iterations, then ``finish()``."""


@dataclass(frozen=True)
class Runner:
    """How a method runs on a latent: ``start(method, problem, options)`` gives its ``Stepper``.

    Attributes:
        kind: ``"mode"`` (a gradient mode through ``sdo.optimize_latent``'s loop), ``"doodl"`` (on the EDICT chain:
            ``doodl`` and ``doodl-adam``; its samples are EDICT's, not the plain sampler's) or ``"guidance"``.
        runs: what it runs, in words (for messages).
        start: builds the ``Stepper``.
        exact_gradient: its gradient is that of the sampler's own chain, so comparable with ``Full()``'s (DOODL's
            is of the EDICT chain; FreeDoM gives the latent none).
        iterative: each iteration starts from the previous one's result, so iterate k carries the training time of
            k updates (False for FreeDoM: every pass is an independent guided sample, credited at its own time).
    """

    kind: str
    runs: str
    start: Callable[[Method, LatentProblem, MethodOptions], Stepper]
    exact_gradient: bool = False
    iterative: bool = True


def _start_mode(method: Method, problem: LatentProblem, options: MethodOptions) -> Stepper:
    mode = method.mode(options)
    return latent_stepper(
        problem, mode, lr=options.lr, prior_weight=options.prior_weight, shell=options.project_to_shell
    )


def _start_doodl(method: Method, problem: LatentProblem, options: MethodOptions) -> Stepper:
    edict = replace(problem, sampler=edict_sampler(problem.sampler))
    return doodl_stepper(edict, lr=options.doodl_lr, clip=options.doodl_clip, renormalize=options.doodl_renormalize)


def _start_doodl_adam(method: Method, problem: LatentProblem, options: MethodOptions) -> Stepper:
    edict = replace(problem, sampler=edict_sampler(problem.sampler))
    return doodl_adam_stepper(edict, lr=options.lr, shell=options.project_to_shell)


def _start_guidance(method: Method, problem: LatentProblem, options: MethodOptions) -> Stepper:
    return GuidanceStepper(problem, scale=options.freedom_scale, repeats=options.freedom_repeats)


MODE = Runner("mode", "sdo.optimize_latent (Adam)", _start_mode, exact_gradient=True)
DOODL = Runner("doodl", "sdo.optimize_latent_doodl on an sdo.EDICTSampler", _start_doodl)
DOODL_ADAM = Runner("doodl", "sdo.doodl.doodl_adam_stepper (Adam) on an sdo.EDICTSampler", _start_doodl_adam)
GUIDANCE = Runner("guidance", "sdo.freedom_sample", _start_guidance, iterative=False)


@dataclass(frozen=True)
class Method:
    """One registry entry: its name, a summary, and how it runs.

    ``build(options)`` gives the gradient mode of a ``MODE`` entry (None for DOODL and FreeDoM, which run their
    own loops); ``latent`` says whether the method reaches a latent; ``runner`` says what runs it (``MODE``,
    ``DOODL`` or ``GUIDANCE``).
    """

    name: str
    summary: str
    build: Callable[[MethodOptions], GradientMode] | None
    latent: bool = True
    runner: Runner = MODE

    @property
    def kind(self) -> str:
        """``"mode"``, ``"doodl"`` or ``"guidance"`` (the runner's kind)."""
        return self.runner.kind

    def mode(self, options: MethodOptions | None = None) -> GradientMode:
        """The gradient mode this method stands for.

        Raises:
            ConfigError: the method is not a gradient mode (DOODL, FreeDoM), or gives no gradient to
                ``options.variable``.
        """
        options = options or MethodOptions()
        if options.variable == "latent" and not self.latent and self.name != "nograd":
            raise ConfigError(
                f"method {self.name!r} gives no gradient to the latent (it detaches the early steps); "
                f"use one of {', '.join(method_names('latent'))}, or optimize weights (--variable weights)."
            )
        if self.build is None:
            raise ConfigError(f"method {self.name!r} is not a gradient mode: it runs through {self.runner.runs}.")
        return self.build(options)

    def check(self, options: MethodOptions) -> None:
        """Refuse, before any work, a method that cannot optimize ``options.variable`` or whose mode cannot be
        built from ``options`` (e.g. a bad ``kept_steps``)."""
        if self.build is not None:
            self.mode(options)
        elif options.variable != "latent":
            raise ConfigError(f"method {self.name!r} optimizes a latent only; use --variable latent.")

    def stepper(self, problem: LatentProblem, options: MethodOptions | None = None) -> Stepper:
        """A run of this method on ``problem``, stepped one iteration at a time (``sdo bench``)."""
        return self.runner.start(self, problem, options or MethodOptions())

    def optimize(
        self, problem: LatentProblem, options: MethodOptions | None = None, iters: int = 20, progress: bool = True
    ) -> OptimizationResult:
        """The whole run of this method on ``problem``: ``iters`` iterations of its loop (FreeDoM: one guided
        pass, reported as a two-record history)."""
        return self.stepper(problem, options).run(iters, f"optimize ({self.name})", progress)


def _shortcut(step: str) -> Callable[[MethodOptions], GradientMode]:
    def build(options: MethodOptions) -> GradientMode:
        chosen = ("first" if options.variable == "latent" else "random") if step == "paper" else step
        return Shortcut(step=chosen, generator=options.generator, checkpoint=options.checkpoint_kept)

    return build


def _multi(options: MethodOptions) -> GradientMode:
    """``sdo-multi``: ``Shortcut(step=options.kept_steps)``, or ``SpreadShortcut``'s 4 steps spread over the run."""
    if options.kept_steps is not None:
        return Shortcut(step=options.kept_steps, generator=options.generator, checkpoint=options.checkpoint_kept)
    return SpreadShortcut(checkpoint=options.checkpoint_kept)


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method(
            "sdo",
            "SDO, the paper's kept step: the first step for a latent, a random one for weights",
            _shortcut("paper"),
        ),
        Method("sdo-first", "SDO keeping the first step run", _shortcut("first")),
        Method("sdo-random", "SDO keeping one step drawn per trajectory", _shortcut("random")),
        Method("sdo-last", "SDO keeping the last step", _shortcut("last")),
        Method("full", "exact backpropagation through every step (memory grows with the steps)", lambda o: Full()),
        Method(
            "checkpointed",
            "exact backpropagation, each step recomputed in backward (flat memory)",
            lambda o: Checkpointed(),
        ),
        Method(
            "draft-k",
            "DRaFT-K: backpropagation through the last k steps only (--draft-k; --checkpoint-kept recomputes them)",
            lambda o: Truncated(o.draft_k, checkpoint=o.checkpoint_kept),
            latent=False,
        ),
        Method(
            "draft-1",
            "DRaFT-1: backpropagation through the last step only (--checkpoint-kept recomputes it)",
            lambda o: Truncated(1, checkpoint=o.checkpoint_kept),
            latent=False,
        ),
        Method(
            "alignprop",
            "AlignProp: the last k steps, k drawn per trajectory in [1, --alignprop-high], each step checkpointed "
            "as the official code does (memory: one step's activations plus the stored step inputs)",
            lambda o: RandomTruncation(1, o.alignprop_high, generator=o.generator, checkpoint=True),
            latent=False,
        ),
        Method("nograd", "plain sampling, no gradient (the cost floor)", lambda o: NoGrad(), latent=False),
        Method(
            "adjoint",
            "AdjointDPM, the solver's discrete adjoint: no-grad forward, backward by running the solver backward "
            "(--adjoint-iters refinements, --adjoint-checkpoint-every stored states)",
            lambda o: Adjoint(fixed_point_iters=o.adjoint_iters, checkpoint_every=o.adjoint_checkpoint_every),
        ),
        Method("sdo-multi", "SDO keeping several steps spread over the run (graphs only there)", _multi),
        Method(
            "doodl",
            "DOODL: EDICT sampling with exact-inversion backprop, SGD+momentum, clipping, renormalization",
            None,
            runner=DOODL,
        ),
        Method(
            "doodl-adam",
            "DOODL's exact-inversion gradient on the EDICT pair, with sdo's Adam update (--lr, --project)",
            None,
            runner=DOODL_ADAM,
        ),
        Method(
            "freedom",
            "FreeDoM: training-free guidance in one sampling pass (reward gradient at the x0 prediction)",
            None,
            runner=GUIDANCE,
        ),
    )
}


def method_names(variable: Variable | None = None) -> tuple[str, ...]:
    """Every registered name (``variable=None``), or the methods that optimize ``variable`` (``nograd`` excluded):
    for a latent, those with ``latent=True`` (DOODL and FreeDoM included); for weights, the gradient modes."""
    if variable is None:
        return tuple(METHODS)

    def optimizes(method: Method) -> bool:
        return method.latent if variable == "latent" else method.build is not None

    return tuple(name for name, method in METHODS.items() if name != "nograd" and optimizes(method))


def find_method(name: str, options: MethodOptions | None = None) -> Method:
    """The registry entry ``name``, checked against ``options`` (``Method.check``).

    Raises:
        ConfigError: ``name`` is not registered, or cannot optimize ``options.variable`` as ``options`` say.
    """
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(METHODS)} (sdo bench --list-methods).")
    method = METHODS[name]
    method.check(options or MethodOptions())
    return method


def gradient_mode(name: str, options: MethodOptions | None = None) -> GradientMode:
    """The gradient mode the method ``name`` stands for (``find_method``, then ``Method.mode``).

    Raises:
        ConfigError: ``name`` is not registered, is not a gradient mode, or gives no gradient to
            ``options.variable``.
    """
    return find_method(name, options).mode(options)


def describe_methods() -> str:
    """One line per method: name and summary (``sdo bench --list-methods``)."""
    width = max(map(len, METHODS))
    return "\n".join(f"{name:<{width}}  {method.summary}" for name, method in METHODS.items())
