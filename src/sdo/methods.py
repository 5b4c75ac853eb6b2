"""The estimator registry: one table from every method name the ``sdo`` command accepts to what it runs.

Every command (``optimize``, ``demo``, ``finetune``, ``bench``) resolves ``--method``/``--methods`` here, so one
name means one thing everywhere. ``sdo bench --list-methods`` prints the table. The gradient modes themselves are
in ``sdo.gradients``; see ``docs/design.md`` for the definitions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from .adjoint import Adjoint
from .errors import ConfigError
from .gradients import Checkpointed, Full, GradientMode, NoGrad, RandomTruncation, Shortcut, Truncated

__all__ = ["METHODS", "Method", "MethodOptions", "describe_methods", "gradient_mode", "method_names"]

Variable = Literal["latent", "weights"]
Kind = Literal["mode", "doodl", "guidance"]


@dataclass(frozen=True)
class MethodOptions:
    """What a method's gradient mode may depend on.

    Attributes:
        variable: what is optimized, ``"latent"`` or ``"weights"`` (``sdo`` keeps a different step for each, as the
            paper does).
        generator: source of the mode's random draws (``sdo`` for weights, ``sdo-random``, ``alignprop``).
        draft_k: k of ``draft-k``. alignprop_high: ``alignprop`` draws its depth in ``[1, alignprop_high]``.
        checkpoint_kept: the ``sdo*`` methods recompute their kept step in backward (less memory).
        adjoint_iters: fixed-point refinements of ``adjoint``'s reconstructions (``sdo.Adjoint(fixed_point_iters)``).
        kept_steps: the kept steps of ``sdo-multi`` (``sdo.Shortcut(step=[...])``); None spreads 4 over the run.
    """

    variable: Variable = "latent"
    generator: torch.Generator | None = None
    draft_k: int = 1
    alignprop_high: int = 10
    checkpoint_kept: bool = False
    adjoint_iters: int = 2
    kept_steps: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Method:
    """One registry entry: ``build(options)`` gives the gradient mode; ``latent`` says whether it reaches a latent.

    ``kind`` says what runs the method: ``"mode"``, a gradient mode for ``sdo.optimize_latent`` / ``sdo.finetune``
    (``build`` gives it); ``"doodl"``, ``sdo.optimize_latent_doodl`` over an ``sdo.EDICTSampler``; ``"guidance"``,
    one ``sdo.freedom_sample`` pass per sample. Only ``"mode"`` entries have a gradient mode.
    """

    name: str
    summary: str
    build: Callable[[MethodOptions], GradientMode] | None
    latent: bool = True
    kind: Kind = "mode"


def _shortcut(step: str) -> Callable[[MethodOptions], GradientMode]:
    def build(options: MethodOptions) -> GradientMode:
        chosen = ("first" if options.variable == "latent" else "random") if step == "paper" else step
        return Shortcut(step=chosen, generator=options.generator, checkpoint=options.checkpoint_kept)

    return build


def _multi(options: MethodOptions) -> GradientMode:
    """``sdo-multi``: ``Shortcut(step=options.kept_steps)``, or 4 kept steps spread over the run when None."""
    if options.kept_steps is not None:
        return Shortcut(step=options.kept_steps, generator=options.generator, checkpoint=options.checkpoint_kept)
    return _SpreadShortcut(checkpoint=options.checkpoint_kept)


@dataclass(frozen=True)
class _SpreadShortcut(Shortcut):
    """``Shortcut`` keeping ``count`` steps evenly spread over whatever run it is given (the first one included)."""

    count: int = 4

    def kept_steps(self, start: int, stop: int) -> tuple[int, ...]:
        remaining = stop - start
        count = min(self.count, remaining)
        return tuple(sorted({start + (k * remaining) // count for k in range(count)}))


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
            "DRaFT-K: backpropagation through the last k steps only (--draft-k)",
            lambda o: Truncated(o.draft_k),
            latent=False,
        ),
        Method("draft-1", "DRaFT-1: backpropagation through the last step only", lambda o: Truncated(1), latent=False),
        Method(
            "alignprop",
            "AlignProp: the last k steps, k drawn per trajectory in [1, --alignprop-high]",
            lambda o: RandomTruncation(1, o.alignprop_high, generator=o.generator),
            latent=False,
        ),
        Method("nograd", "plain sampling, no gradient (the cost floor)", lambda o: NoGrad(), latent=False),
        Method(
            "adjoint",
            "AdjointDPM: no-grad forward, backward by running the solver backward (--adjoint-iters refinements)",
            lambda o: Adjoint(fixed_point_iters=o.adjoint_iters),
        ),
        Method("sdo-multi", "SDO keeping several steps spread over the run (graphs only there)", _multi),
        Method(
            "doodl",
            "DOODL: EDICT sampling with exact-inversion backprop, SGD+momentum, clipping, renormalization",
            None,
            kind="doodl",
        ),
        Method(
            "freedom",
            "FreeDoM: training-free guidance in one sampling pass (reward gradient at the x0 prediction)",
            None,
            kind="guidance",
        ),
    )
}

_RUNNERS = {"doodl": "sdo.optimize_latent_doodl on an sdo.EDICTSampler", "guidance": "sdo.freedom_sample"}


def method_names(variable: Variable | None = None) -> tuple[str, ...]:
    """Every registered name (``variable=None``), or the methods that optimize ``variable`` (``nograd`` excluded):
    for a latent, those with ``latent=True`` (DOODL and FreeDoM included); for weights, the gradient modes."""
    if variable is None:
        return tuple(METHODS)

    def optimizes(method: Method) -> bool:
        return method.latent if variable == "latent" else method.kind == "mode"

    return tuple(name for name, method in METHODS.items() if name != "nograd" and optimizes(method))


def gradient_mode(name: str, options: MethodOptions | None = None) -> GradientMode:
    """The gradient mode the method ``name`` stands for.

    Raises:
        ConfigError: ``name`` is not registered, or gives no gradient to ``options.variable``.
    """
    options = options or MethodOptions()
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(METHODS)} (sdo bench --list-methods).")
    if options.variable == "latent" and not METHODS[name].latent and name != "nograd":
        raise ConfigError(
            f"method {name!r} gives no gradient to the latent (it detaches the early steps); "
            f"use one of {', '.join(method_names('latent'))}, or optimize weights (--variable weights)."
        )
    method = METHODS[name]
    if method.kind != "mode":
        raise ConfigError(f"method {name!r} is not a gradient mode: it runs through {_RUNNERS[method.kind]}.")
    return method.build(options)


def describe_methods() -> str:
    """One line per method: name and summary (``sdo bench --list-methods``)."""
    width = max(map(len, METHODS))
    return "\n".join(f"{name:<{width}}  {method.summary}" for name, method in METHODS.items())
