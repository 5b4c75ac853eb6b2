"""The one block of method flags that ``sdo optimize`` (and ``sdo demo``) and ``sdo bench`` share.

``MethodFlags`` is a frozen dataclass base of ``LatentTaskConfig`` and ``BenchConfig``: its fields feed only the
registry's ``sdo.methods.MethodOptions`` (the Adam run of a gradient mode, ``adjoint``'s refinements,
``sdo-multi``'s kept steps, DOODL's and FreeDoM's settings). They are written once, with their help, bounds and
defaults, which are the library's (``sdo.latent.AdamSettings``, ``sdo.doodl.DoodlSettings``,
``sdo.freedom.FreedomSettings``, ``sdo.methods.MethodOptions``; ``check_options`` checks them with the rest of each
config), and turned into ``MethodOptions`` by one builder, ``method_options``. The CLI still generates one flat
flag per field (``--lr``, ``--kept-steps``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sdo.app.options import option
from sdo.doodl import DoodlSettings, scaled_clip
from sdo.errors import ConfigError
from sdo.freedom import FREEDOM_SCHEDULES, FreedomSettings
from sdo.latent import LR_SCHEDULES, AdamSettings
from sdo.methods import METHODS, MethodOptions, Variable, find_method

__all__ = ["AUTO", "MethodFlags", "checkpoint_kept_flag", "learning_rate", "memory_budget_flag", "parse_kept_steps"]


AUTO = "auto"
"""The ``--method`` that asks ``sdo.app.auto`` to choose."""


def learning_rate(help: str = "Adam learning rate") -> Any:
    """The ``lr`` field (default ``sdo.latent.AdamSettings.lr``, > 0) with ``help``: a config whose ``lr`` also
    serves weights (``sdo bench --variable weights``) says so in its own help, with the same default and bound."""
    return option(AdamSettings.lr, help, above=0)


def checkpoint_kept_flag() -> Any:
    """The ``checkpoint_kept`` field (off), written once for every command that has ``--checkpoint-kept``
    (``MethodFlags``: ``sdo optimize`` and ``sdo bench``; ``sdo finetune``): ``MethodOptions.checkpoint_kept``."""
    return option(
        False,
        "sdo*, draft-k, draft-1: recompute the graphed (kept) steps in backward (less memory, the same gradient; "
        "alignprop and random-truncation always do)",
    )


def memory_budget_flag() -> Any:
    """The ``memory_budget`` field (GiB, unset), written once for every command that takes ``--method auto``
    (``sdo.app.auto``: the budget its choice must fit)."""
    return option(
        None,
        "--method auto: GiB the run may keep on the device (weights, optimizer state, activations; default: the "
        "device's free memory on CUDA, 16 on the CPU)",
        type=float,
        above=0,
    )


@dataclass(frozen=True)
class MethodFlags:
    """The settings of the method a run uses (every field is a flag of the commands that use it).

    ``lr``, ``lr_schedule``, ``adam_beta2``, ``prior_weight`` and ``project`` configure the Adam run of a gradient
    mode and of ``doodl-adam`` (``sdo.optimize_latent``: loss ``-sum_b reward_b + prior_weight * sum_b
    latent_prior(z_b)``, the lr at update k of K = ``iters`` constant or ``lr * (1 + cos(pi k / K)) / 2``, Adam's
    betas ``(0.9, adam_beta2)``, latents rescaled to their initial norm after each step with ``project``);
    ``adjoint_iters`` and ``adjoint_checkpoint_every`` are ``sdo.Adjoint``'s ``fixed_point_iters`` and
    ``checkpoint_every`` (0: None); ``kept_steps`` the kept steps of ``sdo-multi``
    (``sdo.Shortcut(step=[...])``); ``doodl_lr`` and ``doodl_clip`` DOODL's gradient scale and per-element clip (0:
    ``sdo.doodl.scaled_clip`` of the config's ``iters``, the authors' total movement spread over the run; its
    renormalization follows ``project``); ``freedom_scale``, ``freedom_repeats`` and ``freedom_schedule``
    FreeDoM's guidance step, time-travel passes and schedule (``sdo.freedom_sample``: ``"sdo"`` or the authors'
    code's ``"official"``). Two flags trade time for memory without changing the result:
    ``checkpoint_kept`` (``MethodOptions.checkpoint_kept``: the shortcut methods' kept steps recomputed in backward)
    and ``checkpoint_decoder`` (the reward's VAE decoder recomputed in backward, which the workload or the pipeline
    builds: ``sdo.pipelines.from_pipeline``'s ``checkpoint_decoder``). Every config built on this block has an
    ``iters`` field.
    """

    lr: float = learning_rate()
    lr_schedule: str = option(
        AdamSettings.lr_schedule,
        "Adam's lr at update k of K = --iters: constant (--lr at every update, the authors' run) or cosine "
        "(lr x (1 + cos(pi k / K)) / 2, decaying towards 0); doodl and freedom take constant only",
        choices=LR_SCHEDULES,
    )
    adam_beta2: float = option(
        AdamSettings.betas[1],
        "Adam's beta2, the decay of its squared-gradient average: 0.9 as in the authors' scripts; 0.999 (torch's "
        "default) averages over ~1000 updates, so the step shrinks as the gradient does",
        at_least=0,
        at_most=0.9999,
    )
    prior_weight: float = option(
        AdamSettings.prior_weight, "weight of the Gaussian-shell latent regularizer", at_least=0
    )
    project: bool = option(
        AdamSettings.project_to_shell,
        "rescale latents to their initial norm after each iteration (the hard shell prior)",
    )
    adjoint_iters: int = option(
        MethodOptions.adjoint_iters,
        "adjoint: fixed-point refinements of each reconstructed state",
        at_least=0,
        at_most=100,
    )
    adjoint_checkpoint_every: int = option(
        0,
        "adjoint: store every k-th state in forward, rebuild only between stored ones (drift <= k steps; 0: off)",
        at_least=0,
        at_most=1000,
    )
    kept_steps: str = option("", "sdo-multi: comma-separated kept step indices (default: 4 spread over the run)")
    doodl_lr: float = option(
        DoodlSettings.lr,
        "doodl: gradient scale before element-wise clipping at --doodl-clip (the authors' rule)",
        above=0,
    )
    doodl_clip: float = option(
        0.0,
        f"doodl: element-wise clip per iteration (0: scaled, {DoodlSettings.clip:g} x {DoodlSettings.iters} / "
        f"--iters, the authors' {DoodlSettings.clip:g} over their {DoodlSettings.iters} iterations)",
        at_least=0,
    )
    freedom_scale: float = option(
        FreedomSettings.scale, "freedom: guidance step as a fraction of the solver update", at_least=0
    )
    freedom_repeats: int = option(
        FreedomSettings.repeats,
        "freedom: time-travel passes per step in the first half of the window",
        at_least=1,
        at_most=100,
    )
    freedom_schedule: str = option(
        FreedomSettings.schedule,
        "freedom: sdo (guide every step by --freedom-scale x the rms of the solver's update, per sample) or "
        "official (the authors' code: guide the steps 0.3 to 0.7 of the way through the run, time-travel in 0.3 to "
        "0.6 with --freedom-repeats, 3 there, by --freedom-scale x rms(w (e_cond - e_uncond)) / rms(grad) over the "
        "batch, 0.2 there; needs classifier-free guidance)",
        choices=FREEDOM_SCHEDULES,
    )
    checkpoint_kept: bool = checkpoint_kept_flag()
    memory_budget: float | None = memory_budget_flag()
    checkpoint_decoder: bool = option(
        False,
        "the VAE decoder of the reward (sdo optimize: --pipeline; sdo bench: --model sd15) recomputed in backward "
        "(less memory, the same gradient)",
    )

    def method_options(
        self, variable: Variable = "latent", generator: torch.Generator | None = None, **extra: Any
    ) -> MethodOptions:
        """The ``MethodOptions`` of these flags for optimizing ``variable``, with the random draws of the gradient
        mode from ``generator`` and ``extra`` fields of ``MethodOptions`` a config adds (e.g. ``draft_k``).

        Raises:
            ConfigError: ``kept_steps`` is not a comma-separated list of integers.
        """
        return MethodOptions(
            variable,
            generator,
            adjoint_iters=self.adjoint_iters,
            adjoint_checkpoint_every=self.adjoint_checkpoint_every or None,
            kept_steps=parse_kept_steps(self.kept_steps),
            lr=self.lr,
            lr_schedule=self.lr_schedule,
            betas=(AdamSettings.betas[0], self.adam_beta2),
            prior_weight=self.prior_weight,
            project_to_shell=self.project,
            doodl_lr=self.doodl_lr,
            doodl_clip=self.doodl_clip or scaled_clip(self.iters),
            doodl_project_to_shell=self.project,
            freedom_scale=self.freedom_scale,
            freedom_repeats=self.freedom_repeats,
            freedom_schedule=self.freedom_schedule,
            checkpoint_kept=self.checkpoint_kept,
            **extra,
        )

    def check_method(self, name: str, variable: Variable, steps: int, start_step: int = 0) -> None:
        """Refuse, before any work, method ``name`` on ``variable`` with these flags, for a run of sampling steps
        ``start_step, ..., steps - 1``: an unknown name, no gradient to ``variable``, a gradient mode whose steps do
        not fit the run (``--kept-steps`` past the last step, a ``draft-k`` or ``alignprop`` depth above the steps),
        or ``--adam-beta2`` set for a method that runs no Adam (named by its flag, before the library's ``betas``).

        Raises:
            ConfigError: as ``sdo.methods.find_method`` and ``sdo.methods.Method.check_fits``.
        """
        if name in METHODS and not METHODS[name].runner.adam and self.adam_beta2 != AdamSettings.betas[1]:
            raise ConfigError(
                f"method {name!r} runs no Adam ({METHODS[name].runner.runs}): `adam_beta2` {self.adam_beta2:g} would "
                f"be ignored; leave it {AdamSettings.betas[1]:g}, or use doodl-adam or a gradient mode."
            )
        options = self.method_options(variable, generator=torch.Generator())
        find_method(name, options).check_fits(options, steps, start_step)


def parse_kept_steps(text: str) -> tuple[int, ...] | None:
    """``"3,10,20"`` -> ``(3, 10, 20)``; ``""`` -> None (``sdo-multi`` then spreads 4 kept steps over the run).

    Raises:
        ConfigError: ``text`` is not a comma-separated list of integers.
    """
    if not text.strip():
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError as error:
        raise ConfigError(f"`kept_steps` must be comma-separated step indices, got {text!r}.") from error
