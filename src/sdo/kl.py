"""A base-model regularizer for reward fine-tuning: how far the fine-tuned model's predictions move from the frozen
base model's along the sampled trajectory.

For a sampler whose step ``x_t -> x_{t-1}`` is Gaussian with a mean linear in the model output ``f(x_t, t)`` (DDPM,
DDIM with ``eta > 0``, the Euler-Maruyama form of flow matching), the KL divergence between the fine-tuned policy
``p_theta(x_{t-1} | x_t)`` and the base policy ``p_base(x_{t-1} | x_t)`` is

    KL_t = || mu_theta(x_t) - mu_base(x_t) ||^2 / (2 sigma_t^2) = c_t || f_theta(x_t, t) - f_base(x_t, t) ||^2,

so the KL between the two trajectory distributions is ``sum_t c_t E || f_theta - f_base ||^2`` (DPOK, Fan et al.
2023, arXiv 2305.16381, Lemma 4.1; the same penalty as the KL term of DDPO-style trainers). ``TrajectoryKL`` drops
the per-step constants ``c_t`` and averages over the steps instead of summing, so the penalty's scale does not
depend on the number of steps or on how many steps a method keeps.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .protocols import ModelFn

__all__ = ["TrajectoryKL", "adapters_disabled"]


class TrajectoryKL:
    """``model_fn`` wrapper that records ``|| f_theta(x_t, t) - f_base(x_t, t) ||^2`` at the steps it is trained
    through.

    Used as the sampler's ``model_fn``, it returns ``model_fn(x, t)`` unchanged. When that call records an autograd
    graph (the steps the gradient mode keeps: every step for ``Full``/``Checkpointed``, the last ``k`` for
    ``Truncated(k)``, the kept step for ``Shortcut``) it also runs ``base_fn(x, t)`` under ``torch.no_grad()`` (one
    extra forward; with peft, the same network with its adapters disabled, see ``adapters_disabled``) and records
    the per-sample mean squared difference. Steps run without a graph cost nothing extra and add nothing: their
    term would carry no gradient.

    ``penalty()`` then gives, per sample, the mean of the recorded terms ``[B]`` (the per-step KL between the two
    Gaussian policies up to a constant, see the module docstring). The gradient reaches the fine-tuned parameters
    (and whatever the kept steps' inputs depend on); ``f_base`` is a constant. The call stops recording, so that a
    checkpointed step recomputed in backward (which runs this wrapper again) adds nothing.

    Args:
        model_fn: the model being fine-tuned, ``model_fn(x, t) -> output`` (e.g. an ``sdo.Denoiser``).
        base_fn: the frozen base model with the same conditioning and guidance.
    """

    def __init__(self, model_fn: ModelFn, base_fn: ModelFn) -> None:
        self.model_fn = model_fn
        self.base_fn = base_fn
        self.terms: list[torch.Tensor] = []
        self.recording = True

    @property
    def prediction_type(self) -> str:
        """The wrapped model's prediction type (what ``sdo.Sampler`` checks against its scheduler)."""
        return getattr(self.model_fn, "prediction_type", "epsilon")

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.model_fn(x, t)
        if torch.is_grad_enabled() and out.requires_grad:
            with torch.no_grad():
                base = self.base_fn(x, t)
            term = (out - base).square().flatten(1).mean(dim=1)
            if self.recording:
                self.terms.append(term)
        return out

    def penalty(self) -> torch.Tensor | None:
        """Mean over the recorded steps of ``mean((f_theta - f_base)^2)`` per sample, ``[B]``; None when no step was
        recorded. Stops recording."""
        self.recording = False
        if not self.terms:
            return None
        return torch.stack(self.terms).mean(dim=0)


@contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block, ``model``'s peft adapter layers act as their base layers (peft's ``enable_adapters``);
    on exit the adapters, and the ``requires_grad`` flags that peft's toggle changes, are restored. A model without
    adapters is returned unchanged."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    enabled = [not layer.disable_adapters for layer in layers]
    trainable = [[(p, p.requires_grad) for p in layer.parameters()] for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer, was_enabled, flags in zip(layers, enabled, trainable, strict=True):
            layer.enable_adapters(was_enabled)
            for parameter, flag in flags:
                parameter.requires_grad_(flag)
