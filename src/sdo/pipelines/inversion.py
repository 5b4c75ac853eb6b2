"""Inversion of a pipeline's images: the model function that ``PipelineParts.invert`` runs backwards (one prompt
per image, and the inversion's own guidance); the solver run itself is ``sdo.inversion.invert``."""

from __future__ import annotations

from dataclasses import replace

import torch

from ..errors import ConfigError
from ..models import Denoiser

__all__ = ["inversion_model"]


def inversion_model(model_fn: Denoiser, images: int, guidance_scale: float) -> Denoiser:
    """``model_fn`` for inverting ``images`` images: its prompts' rows as they are (one per image) or the one prompt
    repeated, under ``guidance_scale`` (the embedded guidance of a guidance-distilled Flux, else classifier-free
    guidance); ``ConfigError`` when there are several prompts but not one per image."""
    prompts = model_fn.encoder_hidden_states.shape[0]
    if images != prompts:
        if prompts != 1:
            raise ConfigError(f"{images} images but {prompts} prompts; pass one prompt, or one per image.")
        model_fn = model_fn.rows(torch.zeros(images, dtype=torch.long))
    if model_fn.guidance_embedding is not None:  # guidance-distilled Flux: the guidance is an input
        return replace(model_fn, guidance_embedding=guidance_scale)
    return replace(model_fn, guidance_scale=guidance_scale)
