"""Flux (``FluxPipeline``): T5 sequence embeddings and the pooled CLIP embedding into a transformer over packed 2x2
latents with image/text position ids; the guidance scale is embedded for guidance-distilled checkpoints, true
classifier-free guidance runs with a negative prompt and ``true_cfg_scale > 1``; FlowMatch with
``sigmas = linspace(1, 1/n, n)`` and ``mu`` linear in the image sequence length. ``pack_latents`` and
``unpack_latents`` are the pipeline's own 2x2 packing."""

from __future__ import annotations

import torch

from ..models import Denoiser
from .family import Conditioned, dynamic_shift

__all__ = ["DEFAULT_GUIDANCE", "PIPELINE_CLASS", "REQUIRED", "condition", "pack_latents", "unpack_latents"]

PIPELINE_CLASS = "FluxPipeline"
REQUIRED = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
DEFAULT_GUIDANCE = 3.5  # the pipeline's ``__call__`` default


def condition(
    pipe, prompts: list[str], *, negative_prompt, guidance, size, device, true_cfg_scale, max_sequence_length, **_
) -> Conditioned:
    """The transformer under the prompts' T5 and pooled CLIP embeddings (and the negative prompt's, under true
    classifier-free guidance), with position ids and embedded guidance, over packed latents."""
    height, width, factor = size
    options = {"max_sequence_length": max_sequence_length or 512}
    cond, pooled, text_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device, **options)
    true_cfg = true_cfg_scale > 1 and negative_prompt is not None
    uncond = negative_pooled = None
    if true_cfg:
        negative = [negative_prompt] * len(prompts)
        uncond, negative_pooled, _ = pipe.encode_prompt(prompt=negative, prompt_2=None, device=device, **options)
        uncond, negative_pooled = uncond[:1], negative_pooled[:1]
    transformer = pipe.transformer
    channels = transformer.config.in_channels // 4
    latent_height, latent_width = 2 * (height // (factor * 2)), 2 * (width // (factor * 2))
    image_shape = (len(prompts), channels, latent_height, latent_width)
    image_ids = pipe._prepare_latent_image_ids(len(prompts), latent_height // 2, latent_width // 2, device, cond.dtype)
    sequence = (latent_height // 2) * (latent_width // 2)
    model_fn = Denoiser(
        transformer,
        encoder_hidden_states=cond,
        negative_encoder_hidden_states=uncond,
        guidance_scale=true_cfg_scale if true_cfg else 1.0,
        pooled_projections=pooled,
        negative_pooled_projections=negative_pooled,
        guidance_embedding=guidance if transformer.config.guidance_embeds else None,
        extra_kwargs={"txt_ids": text_ids, "img_ids": image_ids},
        timestep_divisor=1000.0,
    )
    latent_shape = (len(prompts), sequence, channels * 4)
    return Conditioned(model_fn, latent_shape, image_shape, _timestep_options(pipe.scheduler.config, sequence))


def _timestep_options(config, sequence: int):
    """``steps -> {"sigmas", "mu"}`` as the pipeline passes them (no sigmas with ``use_flow_sigmas``)."""
    import numpy as np

    mu = dynamic_shift(sequence, config)
    use_flow_sigmas = config.get("use_flow_sigmas", False)

    def timestep_options(steps: int) -> dict:
        sigmas = None if use_flow_sigmas else np.linspace(1.0, 1 / steps, steps)
        return {"sigmas": sigmas, "mu": mu}

    return timestep_options


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """Flux's 2x2 patch packing: ``[B, C, h, w] -> [B, (h/2)(w/2), 4C]`` (``FluxPipeline._pack_latents``)."""
    batch, channels, height, width = latents.shape
    latents = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of ``pack_latents`` for a latent image ``height x width``: ``[B, (h/2)(w/2), 4C] -> [B, C, h, w]``."""
    batch, _, packed = latents.shape
    latents = latents.view(batch, height // 2, width // 2, packed // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(batch, packed // 4, height, width)
