"""Adapters from diffusers models to ``model_fn(x, t)``: conditioning and classifier-free guidance in one place."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .checks import check_guidance
from .errors import ConfigError
from .schedulers import PREDICTION_TYPES

__all__ = ["Denoiser"]


@dataclass
class Denoiser:
    """``model_fn`` for a diffusers ``UNet2DModel`` (class labels), ``UNet2DConditionModel`` (text embeddings, and
    SDXL's added conditioning), or a text-to-image transformer (SD3, Flux).

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
            SD3-style and Flux transformers (conditional and unconditional).
        added_cond_kwargs, negative_added_cond_kwargs: ``{name: [batch (or 1), ...]}`` extra per-sample conditioning
            a ``UNet2DConditionModel`` takes as ``added_cond_kwargs`` (SDXL: ``text_embeds``, the pooled prompt
            embedding, and ``time_ids``, the size and crop micro-conditioning); batched like the embeddings.
        guidance_embedding: for guidance-distilled transformers (Flux dev), the guidance scale the network embeds
            (``guidance=[batch]``); independent of ``guidance_scale`` (true classifier-free guidance).
        extra_kwargs: constant keyword inputs of every network call, not batched (Flux: ``txt_ids``, ``img_ids``).
        timestep_divisor (`float`, defaults to 1.0): transformers are called with ``t / timestep_divisor`` (1000 for
            Flux, which takes timesteps in [0, 1]).
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
    added_cond_kwargs: dict[str, torch.Tensor] | None = None
    negative_added_cond_kwargs: dict[str, torch.Tensor] | None = None
    guidance_embedding: float | None = None
    extra_kwargs: dict[str, torch.Tensor] | None = None
    timestep_divisor: float = 1.0

    def __post_init__(self) -> None:
        check_guidance(self.guidance_scale, "guidance_scale")
        if self.guidance_embedding is not None:
            check_guidance(self.guidance_embedding, "guidance_embedding")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}.")
        if self.class_labels is not None and self.encoder_hidden_states is not None:
            raise ConfigError("Pass either `class_labels` or `encoder_hidden_states`, not both.")
        if self.pooled_projections is not None and self.encoder_hidden_states is None:
            raise ConfigError("`pooled_projections` (SD3-style models) need `encoder_hidden_states` too.")
        if self.guided and self.pooled_projections is not None and self.negative_pooled_projections is None:
            raise ConfigError("Guidance with `pooled_projections` needs `negative_pooled_projections`.")
        transformer = self.pooled_projections is not None
        if self.added_cond_kwargs is not None and (self.encoder_hidden_states is None or transformer):
            raise ConfigError("`added_cond_kwargs` (SDXL) need `encoder_hidden_states` and a UNet, not a transformer.")
        if self.guided and self.added_cond_kwargs is not None and self.negative_added_cond_kwargs is None:
            raise ConfigError("Guidance with `added_cond_kwargs` needs `negative_added_cond_kwargs`.")
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

    def rows(self, index: torch.Tensor) -> Denoiser:
        """A copy conditioned on rows ``index`` ``[B]`` of the per-sample conditioning (e.g. a training batch drawn
        from the prompts of ``sdo.from_pipeline``); unconditional inputs of batch 1 are kept as they are."""

        def pick(tensor: torch.Tensor | None, keep_single: bool = False) -> torch.Tensor | None:
            if tensor is None or (keep_single and tensor.shape[0] == 1):
                return tensor
            return tensor[index.to(tensor.device)]

        def pick_all(tensors: dict | None, keep_single: bool = False) -> dict | None:
            return None if tensors is None else {k: pick(v, keep_single) for k, v in tensors.items()}

        return replace(
            self,
            class_labels=pick(self.class_labels),
            encoder_hidden_states=pick(self.encoder_hidden_states),
            negative_encoder_hidden_states=pick(self.negative_encoder_hidden_states, True),
            pooled_projections=pick(self.pooled_projections),
            negative_pooled_projections=pick(self.negative_pooled_projections, True),
            added_cond_kwargs=pick_all(self.added_cond_kwargs),
            negative_added_cond_kwargs=pick_all(self.negative_added_cond_kwargs, True),
        )

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Model output for ``x`` ``[batch, ...]`` at timestep ``t`` (a scalar), guided if configured."""
        cond = self._conditional()
        self._check_batch(x, cond)
        if not self.guided:
            return self._forward(x, t, cond, self.pooled_projections, self.added_cond_kwargs)
        out_uncond, out_cond = self._both(x, t)
        return out_uncond + self.guidance_scale * (out_cond - out_uncond)

    def guidance_parts(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out, term)`` for ``x`` ``[batch, ...]`` at timestep ``t``: the guided output, as ``self(x, t)`` from the
        same single batched call, and its guidance term ``term = out - out_uncond = w * (out_cond - out_uncond)``
        (what the official FreeDoM code sizes its step by: ``sdo.freedom_sample``'s ``schedule="official"``).

        Raises:
            ConfigError: this denoiser applies no classifier-free guidance (``guided`` is False).
        """
        if not self.guided:
            raise ConfigError(
                "Denoiser.guidance_parts needs classifier-free guidance (a conditioning input and `guidance_scale` "
                f"!= 1 with an unconditional input); this one has guidance_scale={self.guidance_scale}"
                f"{'' if self._conditional() is not None else ' and no conditioning'}."
            )
        self._check_batch(x, self._conditional())
        out_uncond, out_cond = self._both(x, t)
        term = self.guidance_scale * (out_cond - out_uncond)
        return out_uncond + term, term

    def _both(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out_uncond, out_cond)`` from one network call on ``[x; x]``."""
        cond, pooled, added = self._conditional(), self.pooled_projections, self.added_cond_kwargs
        batch = x.shape[0]
        uncond = _expand(self._unconditional(), batch).to(cond.dtype)
        if pooled is not None:
            pooled = torch.cat([_expand(self.negative_pooled_projections, batch).to(pooled.dtype), pooled])
        if added is not None:
            negative = self.negative_added_cond_kwargs
            added = {name: torch.cat([_expand(negative[name], batch).to(v.dtype), v]) for name, v in added.items()}
        both = self._forward(torch.cat([x, x]), t, torch.cat([uncond, cond]), pooled, added)
        out_uncond, out_cond = both.chunk(2)
        return out_uncond, out_cond

    def _forward(self, x: torch.Tensor, t, cond: torch.Tensor | None, pooled, added) -> torch.Tensor:
        dtype = self._model_dtype()
        x_in = x.to(dtype)
        if pooled is not None:  # SD3-style / Flux transformer: keyword call, one timestep per sample
            timestep = torch.as_tensor(t, device=x.device).expand(x.shape[0])
            if self.timestep_divisor != 1.0:
                timestep = timestep.to(x.dtype) / self.timestep_divisor
            inputs = dict(self.extra_kwargs or {})
            if self.guidance_embedding is not None:
                inputs["guidance"] = torch.full([x.shape[0]], self.guidance_embedding, device=x.device)
            out = self.model(
                hidden_states=x_in,
                timestep=timestep,
                encoder_hidden_states=cond.to(dtype),
                pooled_projections=pooled.to(dtype),
                **inputs,
            ).sample
        elif cond is None:
            out = self.model(x_in, t).sample
        elif self.class_labels is not None:
            out = self.model(x_in, t, class_labels=cond).sample
        elif added is not None:  # SDXL: pooled text embedding and size micro-conditioning
            added = {name: value.to(dtype) for name, value in added.items()}
            out = self.model(x_in, t, encoder_hidden_states=cond.to(dtype), added_cond_kwargs=added).sample
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
