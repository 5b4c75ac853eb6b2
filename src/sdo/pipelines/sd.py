"""Stable Diffusion 1.x/2.x (``StableDiffusionPipeline``): CLIP prompt embeddings and a UNet over latents
``[B, C, h, w]``; guidance ``eps_u + w (eps_c - eps_u)``."""

from __future__ import annotations

from ..models import Denoiser
from .family import Conditioned

__all__ = ["DEFAULT_GUIDANCE", "PIPELINE_CLASS", "REQUIRED", "condition"]

PIPELINE_CLASS = "StableDiffusionPipeline"
REQUIRED = ("unet", "vae", "text_encoder", "tokenizer")
DEFAULT_GUIDANCE = 7.5  # the pipeline's ``__call__`` default


def condition(pipe, prompts: list[str], *, negative_prompt, guidance, size, device, **_) -> Conditioned:
    """The UNet under the prompts' CLIP embeddings (negative prompt "" by default), as the pipeline runs it."""
    height, width, factor = size
    negative = [negative_prompt or ""] * len(prompts)
    cond, uncond = pipe.encode_prompt(prompts, device, 1, True, negative_prompt=negative)
    shape = (len(prompts), pipe.unet.config.in_channels, height // factor, width // factor)
    model_fn = Denoiser(
        pipe.unet, encoder_hidden_states=cond, negative_encoder_hidden_states=uncond[:1], guidance_scale=guidance
    )
    return Conditioned(model_fn, shape, shape, None)
