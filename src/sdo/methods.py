"""The estimator registry: one table from every method name the ``sdo`` command accepts to what it runs.

Every command (``optimize``, ``demo``, ``finetune``, ``bench``) resolves ``--method``/``--methods`` here, so one
name means one thing everywhere. ``sdo bench --list-methods`` prints the table. Each entry carries its runner: a
gradient mode through ``sdo.optimize_latent``'s loop (Adam), DOODL's loop on the EDICT chain, or FreeDoM guidance.
``Method.stepper`` gives one run taken one iteration at a time (``sdo bench``) and ``Method.optimize`` the whole
run (``sdo optimize``). What a caller needs to know about a method's runs (whether its result is a latent the plain
sampler replays, which chain its samples come from, whether a run is one pass) is asked of its ``Runner``. The
defaults of every setting are written once, in the settings objects (``sdo.latent.AdamSettings``,
``sdo.doodl.DoodlSettings``, ``sdo.freedom.FreedomSettings``, ``TruncationSettings``), which ``MethodOptions`` and the
command's flags read. The gradient modes themselves are in ``sdo.gradients``; see ``docs/design.md``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal, Protocol

import torch

from .adjoint import Adjoint
from .doodl import DoodlSettings, doodl_adam_stepper, doodl_stepper, edict_sampler
from .errors import ConfigError
from .freedom import FreedomSettings, GuidanceStepper
from .gradients import (
    AlignProp,
    Checkpointed,
    Full,
    GradientMode,
    LoopMode,
    NoGrad,
    RandomTruncation,
    Shortcut,
    SpreadShortcut,
    Truncated,
)
from .latent import AdamSettings, LatentProblem, OptimizationResult, check_lr_schedule, latent_stepper
from .protocols import LatentSampler
from .sampling import Sampler

__all__ = [
    "DOODL",
    "DOODL_ADAM",
    "FINETUNE_TRUNCATION",
    "GUIDANCE",
    "METHODS",
    "MODE",
    "Method",
    "MethodOptions",
    "Runner",
    "Stepper",
    "TruncationSettings",
    "describe_methods",
    "find_method",
    "gradient_mode",
    "method_names",
]

Variable = Literal["latent", "weights"]


@dataclass(frozen=True)
class TruncationSettings:
    """The depth knobs of the truncated methods, written once: ``MethodOptions`` and the ``--draft-k`` /
    ``--truncation-high`` flags of ``sdo bench`` and ``sdo finetune`` read these defaults.

    Attributes:
        draft_k: k of ``draft-k`` (``sdo.Truncated(k)``: the last k steps keep their graph); 2, so that ``draft-k``
            is not ``draft-1`` (the weights table of BENCHMARKS.md ran k = 1, which ``benchmarks/run_cpu.sh``
            passes as ``--draft-k 1``).
        truncation_high: ``random-truncation`` draws its depth in ``[1, truncation_high]``
            (``sdo.RandomTruncation``; ``alignprop_high`` before ``alignprop`` became the official algorithm).
    """

    draft_k: int = 2
    truncation_high: int = 10


FINETUNE_TRUNCATION = TruncationSettings()
"""The defaults ``sdo finetune`` reads: ``TruncationSettings``'s, the same as ``sdo bench``'s (kept as a name for
existing imports)."""


@dataclass(frozen=True)
class MethodOptions:
    """What a method's gradient mode and runner may depend on.

    Attributes:
        variable: what is optimized, ``"latent"`` or ``"weights"`` (``sdo`` keeps a different step for each, as the
            paper does).
        generator: source of the mode's random draws (``sdo`` for weights, ``sdo-random``, ``alignprop``,
            ``random-truncation``).
        draft_k: k of ``draft-k``. truncation_high: ``random-truncation`` draws its depth in
            ``[1, truncation_high]`` (read also as ``alignprop_high``, its name before the split).
        checkpoint_kept: the ``sdo*`` methods recompute their kept step in backward, ``draft-k``/``draft-1`` their
            graphed steps (less memory, same gradient). ``alignprop`` and ``random-truncation`` always do (AlignProp,
            Prabhudesai et al. 2023, arXiv 2310.03739: the official code checkpoints every UNet call).
        adjoint_iters: fixed-point refinements of ``adjoint``'s reconstructions (``sdo.Adjoint(fixed_point_iters)``).
        adjoint_checkpoint_every: ``adjoint`` stores every k-th state in forward and rebuilds only the states between
            two stored ones (``sdo.Adjoint(checkpoint_every)``: O(n / k) latents, drift bounded to k steps); None
            stores none.
        kept_steps: the kept steps of ``sdo-multi`` (``sdo.Shortcut(step=[...])``); None spreads 4 over the run
            (``sdo.gradients.SpreadShortcut``).
        lr, betas, prior_weight, project_to_shell, lr_schedule: the Adam run of a gradient mode
            (``sdo.optimize_latent``'s arguments; defaults ``sdo.latent.AdamSettings``). A method that runs no Adam
            (``doodl``, ``freedom``) refuses an ``lr_schedule`` other than ``constant`` (``Method.check``).
        doodl_lr, doodl_project_to_shell: DOODL's ``lr`` and ``project_to_shell`` (``sdo.optimize_latent_doodl``;
            defaults ``sdo.doodl.DoodlSettings``).
        doodl_clip: DOODL's element-wise clip of ``lr * g`` per iteration (its ``clip``); the authors' 1e-3 is sized
            for 50+ iterations, ``sdo.doodl.scaled_clip(iters)`` keeps their total movement in a shorter run.
        (``doodl-adam`` takes ``lr``, ``betas``, ``project_to_shell`` and ``lr_schedule``, the Adam run's.)
        freedom_scale, freedom_repeats, freedom_schedule: FreeDoM's ``scale``, ``repeats`` and ``schedule``
            (``"sdo"`` or the authors' code's ``"official"``; ``sdo.freedom_sample``; defaults
            ``sdo.freedom.FreedomSettings``).
        Defaults of ``draft_k`` and ``truncation_high``: ``TruncationSettings``.
    """

    variable: Variable = "latent"
    generator: torch.Generator | None = None
    draft_k: int = TruncationSettings.draft_k
    truncation_high: int = TruncationSettings.truncation_high
    checkpoint_kept: bool = False
    adjoint_iters: int = 2
    adjoint_checkpoint_every: int | None = None
    kept_steps: tuple[int, ...] | None = None
    lr: float = AdamSettings.lr
    betas: tuple[float, float] = AdamSettings.betas
    prior_weight: float = AdamSettings.prior_weight
    project_to_shell: bool = AdamSettings.project_to_shell
    lr_schedule: str = AdamSettings.lr_schedule
    doodl_lr: float = DoodlSettings.lr
    doodl_clip: float | None = DoodlSettings.clip
    doodl_project_to_shell: bool = DoodlSettings.project_to_shell
    freedom_scale: float = FreedomSettings.scale
    freedom_repeats: int = FreedomSettings.repeats
    freedom_schedule: str = FreedomSettings.schedule

    @property
    def alignprop_high(self) -> int:
        """The old name of ``truncation_high`` (when ``alignprop`` drew one depth per trajectory)."""
        return self.truncation_high

    @property
    def doodl_renormalize(self) -> bool:
        """The old name of ``doodl_project_to_shell`` (DOODL's word), kept for existing readers."""
        return self.doodl_project_to_shell


class Stepper(Protocol):
    """One run of a latent method, one iteration per ``iterate()`` (an optimizer iteration, or FreeDoM's guided
    pass): ``sdo.latent.LatentStepper`` (gradient modes and DOODL) or ``sdo.freedom.GuidanceStepper``. ``gradient``
    is the last iteration's loss gradient (None if none). (``step()``, the old name of ``iterate()``, still works.)"""

    gradient: torch.Tensor | None

    def iterate(self) -> dict:
        """One iteration; its history record."""

    def finish(self) -> OptimizationResult:
        """The run's result."""

    def run(self, iters: int, description: str, progress: bool = True) -> OptimizationResult:
        """The whole run: ``iters`` iterations, then ``finish()``."""


@dataclass(frozen=True)
class Runner:
    """How a method runs on a latent: ``start(method, problem, options, iters)`` gives its ``Stepper`` for a run of
    ``iters`` iterations (None: not known; an Adam run's ``cosine`` ``lr_schedule`` needs it). A caller asks the
    runner what it needs to know (``replays``, ``chain_sampler``, ``iterations``, ``one_pass``), never its ``kind``.

    Attributes:
        kind: a label, ``"mode"`` (a gradient mode through ``sdo.optimize_latent``'s loop), ``"doodl"`` (on the
            EDICT chain: ``doodl`` and ``doodl-adam``) or ``"guidance"``.
        runs: what it runs, in words (for messages).
        start: builds the ``Stepper``.
        exact_gradient: its gradient is that of the sampler's own chain, so comparable with ``Full()``'s (DOODL's
            is of the EDICT chain; FreeDoM gives the latent none).
        chain: the name of the chain its samples come from (``"ddim"``: the plain sampler's; ``"edict"``).
        on_chain: the sampler of that chain built from the plain sampler (None: the plain sampler itself).
        not_a_latent: why its result is not a latent the plain sampler replays, in words (None: it is one).
        one_pass: a run is one pass from the unchanged latent, not an optimization: nothing carries over from one
            iteration to the next, and ``Method.optimize`` runs ``iterations(iters)`` = 1 of them (FreeDoM).
        adam: its update is sdo's Adam run (``MethodOptions.lr``, ``betas``, ``lr_schedule``).
    """

    kind: str
    runs: str
    start: Callable[[Method, LatentProblem, MethodOptions, int | None], Stepper]
    exact_gradient: bool = False
    chain: str = "ddim"
    on_chain: Callable[[Sampler], LatentSampler] | None = None
    not_a_latent: str | None = None
    one_pass: bool = False
    adam: bool = False

    @property
    def replays(self) -> bool:
        """Whether its result is a latent the plain sampler (or pipeline) replays."""
        return self.not_a_latent is None

    def chain_sampler(self, sampler: Sampler) -> LatentSampler:
        """The sampler whose samples this runner optimizes, over ``sampler``'s model and schedule."""
        return sampler if self.on_chain is None else self.on_chain(sampler)

    def iterations(self, iters: int) -> int:
        """The iterations a run asked for ``iters`` takes: ``iters``, or 1 for a ``one_pass`` runner."""
        return 1 if self.one_pass else iters


def _start_mode(method: Method, problem: LatentProblem, options: MethodOptions, iters: int | None) -> Stepper:
    mode = method.mode(options)
    return latent_stepper(problem, mode, prior_weight=options.prior_weight, **_adam_run(options, iters))


def _adam_run(options: MethodOptions, iters: int | None) -> dict:
    """The Adam run's arguments of ``options`` for a run of ``iters`` updates (gradient modes and ``doodl-adam``)."""
    return dict(
        lr=options.lr,
        betas=options.betas,
        project_to_shell=options.project_to_shell,
        lr_schedule=options.lr_schedule,
        iters=iters,
    )


def _start_doodl(method: Method, problem: LatentProblem, options: MethodOptions, iters: int | None) -> Stepper:
    edict = replace(problem, sampler=edict_sampler(problem.sampler))
    return doodl_stepper(
        edict, lr=options.doodl_lr, clip=options.doodl_clip, project_to_shell=options.doodl_project_to_shell
    )


def _start_doodl_adam(method: Method, problem: LatentProblem, options: MethodOptions, iters: int | None) -> Stepper:
    edict = replace(problem, sampler=edict_sampler(problem.sampler))
    return doodl_adam_stepper(edict, **_adam_run(options, iters))


def _start_guidance(method: Method, problem: LatentProblem, options: MethodOptions, iters: int | None) -> Stepper:
    return GuidanceStepper(
        problem, scale=options.freedom_scale, repeats=options.freedom_repeats, schedule=options.freedom_schedule
    )


_EDICT_LATENT = (
    "DOODL optimizes the latent of an EDICT sampler (sdo.EDICTSampler, coupled exact-inversion steps), which the "
    "plain pipeline does not replay"
)
MODE = Runner("mode", "sdo.optimize_latent (Adam)", _start_mode, exact_gradient=True, adam=True)
DOODL = Runner(
    "doodl",
    "sdo.optimize_latent_doodl on an sdo.EDICTSampler",
    _start_doodl,
    chain="edict",
    on_chain=edict_sampler,
    not_a_latent=_EDICT_LATENT,
)
DOODL_ADAM = Runner(
    "doodl",
    "sdo.doodl.doodl_adam_stepper (Adam) on an sdo.EDICTSampler",
    _start_doodl_adam,
    chain="edict",
    on_chain=edict_sampler,
    not_a_latent=_EDICT_LATENT,
    adam=True,
)
GUIDANCE = Runner(
    "guidance",
    "sdo.freedom_sample",
    _start_guidance,
    not_a_latent=(
        "FreeDoM guides one sampling pass (a reward gradient at every step) from the initial noise, which alone "
        "gives the unguided sample"
    ),
    one_pass=True,
)


@dataclass(frozen=True)
class Method:
    """One registry entry: its name, a summary, and how it runs.

    ``build(options)`` gives the gradient mode of a ``MODE`` entry (None for DOODL and FreeDoM, which run their
    own loops); ``latent`` says whether the method reaches a latent; ``runner`` says what runs it (``MODE``,
    ``DOODL``, ``DOODL_ADAM`` or ``GUIDANCE``); ``depth`` names the ``MethodOptions`` field holding its number of
    graphed steps, which must fit the run (``draft_k``, ``truncation_high``; None for the others).
    """

    name: str
    summary: str
    build: Callable[[MethodOptions], GradientMode] | None
    latent: bool = True
    runner: Runner = MODE
    depth: str | None = None

    @property
    def kind(self) -> str:
        """The runner's label, ``"mode"``, ``"doodl"`` or ``"guidance"`` (ask the ``runner`` what it does)."""
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
                f"method {self.name!r} gives no gradient to the latent (a fine-tuning estimator; the truncated ones "
                "detach the early steps); "
                f"use one of {', '.join(method_names('latent'))}, or optimize weights (--variable weights)."
            )
        if self.build is None:
            raise ConfigError(f"method {self.name!r} is not a gradient mode: it runs through {self.runner.runs}.")
        return self.build(options)

    def check(self, options: MethodOptions) -> None:
        """Refuse, before any work, a method that cannot optimize ``options.variable`` or whose mode cannot be
        built from ``options`` (e.g. a bad ``kept_steps``), an unknown ``lr_schedule``, or a schedule other than
        ``constant`` or ``betas`` other than the default's for a method that runs no Adam (``doodl``, ``freedom``),
        which would ignore them."""
        check_lr_schedule(options.lr_schedule, sized=False)  # the run's length comes with its stepper
        ignored = {
            "lr_schedule": (options.lr_schedule, AdamSettings.lr_schedule),
            "betas": (tuple(options.betas), AdamSettings.betas),
        }
        for name, (value, default) in ignored.items():
            if value != default and not self.runner.adam:
                raise ConfigError(
                    f"method {self.name!r} runs no Adam ({self.runner.runs}): `{name}` {value!r} would be ignored; "
                    f"leave it {default!r}, or use doodl-adam or a gradient mode."
                )
        if self.build is not None:
            self.mode(options)
        elif options.variable != "latent":
            raise ConfigError(f"method {self.name!r} optimizes a latent only; use --variable latent.")

    def recomputes_kept(self, options: MethodOptions) -> bool:
        """Whether ``options.checkpoint_kept`` changes this method's gradient mode (the ``sdo*`` methods' kept steps,
        ``draft-k``/``draft-1``'s graphed steps); not for the exact modes, ``alignprop`` and ``random-truncation``
        (always checkpointed),
        ``adjoint``, DOODL or FreeDoM."""
        if self.build is None:
            return False
        recomputed, stored = (self.build(replace(options, checkpoint_kept=flag)) for flag in (True, False))
        return recomputed != stored

    def check_fits(self, options: MethodOptions, steps: int, start_step: int = 0) -> None:
        """Refuse, before any work, this method with ``options`` on a run of sampling steps ``start_step, ...,
        steps - 1``: a depth (``draft_k``, ``truncation_high``) outside ``[1, steps - start_step]``, or a gradient mode
        whose steps do not fit the run (e.g. ``kept_steps`` past the last step).

        Raises:
            ConfigError: as ``check``, or the depth or the mode's roles do not fit the run.
        """
        self.check(options)
        remaining = steps - start_step
        if self.depth is not None and not 1 <= (depth := getattr(options, self.depth)) <= remaining:
            raise ConfigError(f"`{self.depth}` must be in [1, {remaining}], got {depth}.")
        if self.build is None or isinstance(mode := self.mode(options), LoopMode):
            return  # DOODL, FreeDoM and loop modes (adjoint) take any run
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SpreadShortcut covering every step warns when it runs, not here
            mode.roles(start_step, steps)

    def stepper(
        self, problem: LatentProblem, options: MethodOptions | None = None, iters: int | None = None
    ) -> Stepper:
        """A run of this method on ``problem``, taken one iteration at a time (``sdo bench``), for a run of
        ``iters`` iterations (needed by a ``cosine`` ``options.lr_schedule``: iterating the stepper ``iters`` times
        uses the lrs of ``optimize(..., iters)``)."""
        return self.runner.start(self, problem, options or MethodOptions(), iters)

    def optimize(
        self, problem: LatentProblem, options: MethodOptions | None = None, iters: int = 20, progress: bool = True
    ) -> OptimizationResult:
        """The whole run of this method on ``problem``: ``runner.iterations(iters)`` iterations of its loop
        (FreeDoM: one guided pass, reported as a two-record history)."""
        iterations = self.runner.iterations(iters)
        return self.stepper(problem, options, iterations).run(iterations, f"optimize ({self.name})", progress)


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
            depth="draft_k",
        ),
        Method(
            "draft-1",
            "DRaFT-1: backpropagation through the last step only (--checkpoint-kept recomputes it)",
            lambda o: Truncated(1, checkpoint=o.checkpoint_kept),
            latent=False,
        ),
        Method(
            "alignprop",
            "AlignProp as the official code: each step's network output graphed with probability (i + 1) / (n + 1) "
            "(a fresh threshold per step), the other steps on the solver's linear path, graphed steps checkpointed",
            lambda o: AlignProp(generator=o.generator, checkpoint=True),
            latent=False,
        ),
        Method(
            "random-truncation",
            "the last k steps, k drawn per trajectory in [1, --truncation-high], each checkpointed (what sdo called "
            "alignprop before it followed the official code; the TRL port draws this way)",
            lambda o: RandomTruncation(1, o.truncation_high, generator=o.generator, checkpoint=True),
            latent=False,
            depth="truncation_high",
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
