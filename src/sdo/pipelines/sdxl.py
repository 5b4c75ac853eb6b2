"""SDXL (``StableDiffusionXLPipeline``; Podell et al. 2023, arXiv 2307.01952): both CLIP encoders' penultimate
states concatenated, the second encoder's pooled embedding and the micro-conditioning ``time_ids`` (original size,
crop corner, target size) as the UNet's ``added_cond_kwargs``."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..models import Denoiser
from .family import Conditioned

__all__ = ["DEFAULT_GUIDANCE", "PIPELINE_CLASS", "REQUIRED", "condition"]

PIPELINE_CLASS = "StableDiffusionXLPipeline"
REQUIRED = ("unet", "vae", "text_encoder_2", "tokenizer_2")
DEFAULT_GUIDANCE = 5.0  # the pipeline's ``__call__`` default


def condition(pipe, prompts: list[str], *, negative_prompt, guidance, size, device, micro, **_) -> Conditioned:
    """The UNet under both encoders' embeddings, the pooled embedding and ``time_ids`` from ``micro``
    (``(original_size, crops_coords_top_left, target_size)``); ``ConfigError`` when the UNet's added embedding
    does not fit them."""
    height, width, factor = size
    negative = None if negative_prompt is None else [negative_prompt] * len(prompts)
    cond, uncond, pooled, negative_pooled = pipe.encode_prompt(
        prompt=prompts, device=device, do_classifier_free_guidance=True, negative_prompt=negative
    )
    time_ids = torch.tensor([[*micro[0], *micro[1], *micro[2]]], dtype=cond.dtype, device=device)
    _check_added_embedding(pipe, time_ids.shape[1])
    shape = (len(prompts), pipe.unet.config.in_channels, height // factor, width // factor)
    model_fn = Denoiser(
        pipe.unet,
        encoder_hidden_states=cond,
        negative_encoder_hidden_states=uncond[:1],
        guidance_scale=guidance,
        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.expand(len(prompts), -1)},
        negative_added_cond_kwargs={"text_embeds": negative_pooled[:1], "time_ids": time_ids},
    )
    return Conditioned(model_fn, shape, shape, None)


def _check_added_embedding(pipe, time_ids: int) -> None:
    """``ConfigError`` unless the UNet's added embedding takes the text encoder's projection and ``time_ids``
    time ids."""
    projection = pipe.text_encoder_2.config.projection_dim
    expected = pipe.unet.add_embedding.linear_1.in_features
    if pipe.unet.config.addition_time_embed_dim * time_ids + projection != expected:
        raise ConfigError(
            f"The SDXL UNet expects an added embedding of {expected} values but the text encoder's projection "
            f"({projection}) and {time_ids} time ids give another; the pipeline's config is inconsistent."
        )
