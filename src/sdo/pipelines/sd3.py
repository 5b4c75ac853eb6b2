"""Stable Diffusion 3 (``StableDiffusion3Pipeline``; Esser et al. 2024, arXiv 2403.03206): joint CLIP(+T5) prompt
embeddings and pooled CLIP embeddings into a transformer; FlowMatch, with the dynamic shift ``mu`` when the
scheduler asks for it."""

from __future__ import annotations

from ..models import Denoiser
from .family import Conditioned, dynamic_shift

__all__ = ["DEFAULT_GUIDANCE", "PIPELINE_CLASS", "REQUIRED", "condition"]

PIPELINE_CLASS = "StableDiffusion3Pipeline"
REQUIRED = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
DEFAULT_GUIDANCE = 7.0  # the pipeline's ``__call__`` default


def condition(
    pipe, prompts: list[str], *, negative_prompt, guidance, size, device, max_sequence_length, **_
) -> Conditioned:
    """The transformer under the prompts' joint and pooled embeddings (negative prompt "" by default), with the
    schedule's ``mu`` under dynamic shifting."""
    height, width, factor = size
    negative = [negative_prompt or ""] * len(prompts)
    options = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    cond, uncond, pooled, negative_pooled = pipe.encode_prompt(
        prompts,
        prompts,
        prompts,
        device=device,
        do_classifier_free_guidance=True,
        negative_prompt=negative,
        negative_prompt_2=negative,
        negative_prompt_3=negative,
        **options,
    )
    transformer = pipe.transformer
    shape = (len(prompts), transformer.config.in_channels, height // factor, width // factor)
    model_fn = Denoiser(
        transformer,
        encoder_hidden_states=cond,
        negative_encoder_hidden_states=uncond[:1],
        guidance_scale=guidance,
        pooled_projections=pooled,
        negative_pooled_projections=negative_pooled[:1],
    )
    return Conditioned(model_fn, shape, shape, _timestep_options(pipe, shape))


def _timestep_options(pipe, shape: tuple[int, ...]):
    """``steps -> {"mu": mu}`` when the scheduler shifts dynamically (``mu`` from the patch count), else None."""
    if not pipe.scheduler.config.get("use_dynamic_shifting", None):
        return None
    patch = pipe.transformer.config.patch_size
    mu = dynamic_shift((shape[2] // patch) * (shape[3] // patch), pipe.scheduler.config)
    return lambda steps: {"mu": mu}
