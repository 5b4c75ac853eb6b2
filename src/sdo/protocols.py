"""The three callables a user of sdo writes or passes, and the sampler they run through, typed once (the glossary in
``docs/design.md`` names them).

- ``ModelFn``: ``model_fn(x, t) -> output``, the denoising network with its conditioning and guidance applied
  (``sdo.Denoiser``, ``sdo.from_pipeline(...).model_fn``, or any function of that shape).
- ``LatentReward``: ``reward(x0, cond) -> [B]``, a reward of the sampler's output; what ``optimize_latent``, DOODL and
  FreeDoM take.
- ``ImageReward``: ``reward(images, prompts) -> [B]``, a reward of decoded RGB images and their prompts (TRL's
  convention); what a pipeline user brings.

- ``LatentSampler``: ``sampler.sample(x, grad, start_step, generator) -> x0``, what latent optimization samples
  through (``sdo.Sampler``, and ``sdo.EDICTSampler`` for DOODL).

They are structural (``typing.Protocol``): any function or object with a matching ``__call__`` (or, for
``LatentSampler``, matching members) is one, nothing needs to subclass them. The callables' arguments are
positional, so a user's own parameter names do not matter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from .gradients import GradientMode

__all__ = ["ImageReward", "LatentReward", "LatentSampler", "ModelFn"]


class ModelFn(Protocol):
    """``model_fn(x, t) -> output``: the network's prediction at the latent ``x`` and timestep ``t``.

    ``x`` is ``[B, ...]`` (the sampler's state, already scaled by ``scheduler.scale_model_input``), ``t`` the
    scheduler's timestep (a scalar tensor). The output has the shape of ``x`` and is what the scheduler's
    ``prediction_type`` says (``epsilon``, ``v_prediction``, ``sample``, or the flow velocity); conditioning and
    classifier-free guidance are inside ``model_fn``. An optional ``prediction_type`` attribute is checked against
    the scheduler's.
    """

    def __call__(self, x: torch.Tensor, t: torch.Tensor, /) -> torch.Tensor: ...


class LatentReward(Protocol):
    """``reward(x0, cond) -> [B]``: higher is better, differentiable in ``x0``.

    ``x0`` is ``[B, ...]``, the sampler's output: the embedded model's images ``[B, 1, 32, 32]`` in [-1, 1], or a
    latent-diffusion latent (the applications wrap an image reward with the pipeline's decoder to get one). ``cond``
    is whatever the task passes along (class labels, prompt indices, or None); a reward may ignore it.
    """

    def __call__(self, x0: torch.Tensor, cond: object, /) -> torch.Tensor: ...


class ImageReward(Protocol):
    """``reward(images, prompts) -> [B]``: higher is better, differentiable in ``images``.

    ``images`` are float ``[B, 3, H, W]`` in [0, 1] (decoded RGB, the convention of TRL's reward functions);
    ``prompts`` are the ``B`` prompts the images were generated for.
    """

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], /) -> torch.Tensor: ...


@runtime_checkable
class LatentSampler(Protocol):
    """A sampler latent optimization runs through: ``sdo.Sampler``, and ``sdo.EDICTSampler`` (DOODL's chain).

    ``sample`` runs steps ``start_step, ..., stop_step - 1`` from the latent ``x`` at ``start_step`` and returns the
    latent reached (``x_0`` by default), differentiable as the gradient mode ``grad`` says (each sampler has its own
    default mode); ``generator`` is the noise of stochastic schedulers. ``network`` is the ``torch.nn.Module`` the
    latent goes through when the sampler knows it (None otherwise), which ``sdo.checks.check_latent_fits`` reads.
    """

    num_inference_steps: int
    network: torch.nn.Module | None

    @property
    def timesteps(self) -> torch.Tensor:
        """The schedule's timesteps, ``[num_inference_steps]``."""

    @property
    def init_noise_sigma(self) -> float:
        """Scale of the initial latent."""

    def sample(
        self,
        x: torch.Tensor,
        grad: GradientMode = ...,
        start_step: int = 0,
        generator: torch.Generator | None = None,
        *,
        stop_step: int | None = None,
    ) -> torch.Tensor:
        """The latent after the steps (``x_0`` by default)."""
