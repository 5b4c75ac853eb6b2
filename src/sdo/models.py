"""Adapters from diffusers models to ``model_fn(x, t)``: conditioning and classifier-free guidance in one place."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ConfigError
from .schedulers import PREDICTION_TYPES

__all__ = ["Denoiser"]


@dataclass
class Denoiser:
    """``model_fn`` for a diffusers ``UNet2DModel`` (class labels) or ``UNet2DConditionModel`` (text embeddings).

    With classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598) at scale ``w != 1`` the conditional and
    unconditional predictions come from one batched network call on ``[x; x]``:

        out = out_uncond + w * (out_cond - out_uncond)

    The output passes through as the model predicts it; ``prediction_type`` declares its kind, and ``sdo.Sampler``
    checks that it is the one its scheduler expects. Conditioning tensors may require grad (embedding
    optimization): the gradient reaches them through every network call that keeps a graph. A half-precision model
    (fp16/bf16) gets its inputs cast to its dtype and returns outputs in the dtype of ``x``, so the optimized latent
    and the solver stay in float32.

    Args:
        model: a diffusers ``UNet2DModel`` or ``UNet2DConditionModel`` (any module whose forward takes
            ``(x, t, class_labels=...)`` or ``(x, t, encoder_hidden_states=...)`` and returns ``.sample``), or,
            with ``pooled_projections``, an SD3-style ``SD3Transformer2DModel`` (called with ``hidden_states``,
            ``timestep [batch]``, ``encoder_hidden_states`` and ``pooled_projections``).
        prediction_type (`str`, defaults to "epsilon"): one of "epsilon", "v_prediction", "sample", "flow".
        class_labels: ``[batch]`` long tensor of classes (``UNet2DModel`` with ``num_class_embeds``).
        null_class_label: the class index of the unconditional ("null") class, needed for guidance with labels.
        encoder_hidden_states: ``[batch, tokens, dim]`` conditioning (``UNet2DConditionModel``).
        negative_encoder_hidden_states: ``[batch or 1, tokens, dim]`` unconditional embeddings for guidance.
        guidance_scale (`float`, defaults to 1.0): ``w``; 1 means a single conditional call, no guidance.
        pooled_projections, negative_pooled_projections: ``[batch (or 1), dim]`` pooled text embeddings of
            SD3-style transformers (conditional and unconditional).
    """

    model: torch.nn.Module
    prediction_type: str = "epsilon"
    class_labels: torch.Tensor | None = None
    null_class_label: int | None = None
    encoder_hidden_states: torch.Tensor | None = None
    negative_encoder_hidden_states: torch.Tensor | None = None
    guidance_scale: float = 1.0
    pooled_projections: torch.Tensor | None = None
    negative_pooled_projections: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}.")
        if self.class_labels is not None and self.encoder_hidden_states is not None:
            raise ConfigError("Pass either `class_labels` or `encoder_hidden_states`, not both.")
        if self.pooled_projections is not None and self.encoder_hidden_states is None:
            raise ConfigError("`pooled_projections` (SD3-style models) need `encoder_hidden_states` too.")
        if self.guided and self.pooled_projections is not None and self.negative_pooled_projections is None:
            raise ConfigError("Guidance with `pooled_projections` needs `negative_pooled_projections`.")
        if self.guided and self._unconditional() is None:
            raise ConfigError(
                f"`guidance_scale`={self.guidance_scale} needs an unconditional input: `null_class_label` with "
                "`class_labels`, or `negative_encoder_hidden_states` with `encoder_hidden_states`."
            )

    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance is applied (a conditioning input and ``guidance_scale != 1``)."""
        conditioned = self.class_labels is not None or self.encoder_hidden_states is not None
        return conditioned and self.guidance_scale != 1.0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Model output for ``x`` ``[batch, C, H, W]`` at timestep ``t`` (a scalar), guided if configured."""
        cond, pooled = self._conditional(), self.pooled_projections
        self._check_batch(x, cond)
        if not self.guided:
            return self._forward(x, t, cond, pooled)
        uncond = _expand(self._unconditional(), x.shape[0]).to(cond.dtype)
        if pooled is not None:
            pooled = torch.cat([_expand(self.negative_pooled_projections, x.shape[0]).to(pooled.dtype), pooled])
        both = self._forward(torch.cat([x, x]), t, torch.cat([uncond, cond]), pooled)
        out_uncond, out_cond = both.chunk(2)
        return out_uncond + self.guidance_scale * (out_cond - out_uncond)

    def _forward(self, x: torch.Tensor, t, cond: torch.Tensor | None, pooled: torch.Tensor | None) -> torch.Tensor:
        dtype = self._model_dtype()
        x_in = x.to(dtype)
        if pooled is not None:  # SD3-style transformer: keyword call, one timestep per sample
            timestep = torch.as_tensor(t, device=x.device).expand(x.shape[0])
            out = self.model(
                hidden_states=x_in,
                timestep=timestep,
                encoder_hidden_states=cond.to(dtype),
                pooled_projections=pooled.to(dtype),
            ).sample
        elif cond is None:
            out = self.model(x_in, t).sample
        elif self.class_labels is not None:
            out = self.model(x_in, t, class_labels=cond).sample
        else:
            out = self.model(x_in, t, encoder_hidden_states=cond.to(dtype)).sample
        return out.to(x.dtype)

    def _model_dtype(self) -> torch.dtype | None:
        parameter = next(self.model.parameters(), None)
        return None if parameter is None else parameter.dtype

    def _conditional(self) -> torch.Tensor | None:
        return self.class_labels if self.class_labels is not None else self.encoder_hidden_states

    def _unconditional(self) -> torch.Tensor | None:
        if self.class_labels is not None and self.null_class_label is not None:
            return torch.full_like(self.class_labels, self.null_class_label)
        if self.encoder_hidden_states is not None:
            return self.negative_encoder_hidden_states
        return None

    @staticmethod
    def _check_batch(x: torch.Tensor, cond: torch.Tensor | None) -> None:
        if cond is not None and cond.shape[0] != x.shape[0]:
            raise ConfigError(
                f"The conditioning has batch size {cond.shape[0]} but `x` has {x.shape[0]}; they must be equal."
            )


def _expand(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """Broadcast a batch-1 conditioning tensor to ``batch``."""
    return tensor.expand(batch, *tensor.shape[1:]) if tensor.shape[0] == 1 and batch > 1 else tensor
