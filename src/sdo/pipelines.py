"""Stable Diffusion (1.x/2.x UNet pipelines, and SD3-style transformer pipelines with FlowMatch) from a local
folder: what the sampler and tasks need.

``from_pipeline`` takes a pipeline object or a folder written by ``save_pretrained`` and returns the model function
(classifier-free guidance over prompt embeddings computed once with the pipeline's own tokenizer and text
encoder), a supported scheduler built from the pipeline's scheduler config, the latent shape, and a
differentiable decoder. Nothing is downloaded: folders load with ``local_files_only=True``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import MissingWeightsError
from .io import load_json
from .models import Denoiser
from .sampling import Sampler
from .schedulers import SUPPORTED_SCHEDULERS, prediction_type, scheduler_by_name

__all__ = ["PipelineParts", "from_pipeline", "load_pipeline"]


@dataclass
class PipelineParts:
    """The pieces of a pipeline that ``Sampler`` and the tasks use.

    Attributes:
        model_fn: ``sdo.Denoiser`` over the UNet with the prompt embeddings and guidance.
        scheduler: a supported diffusers scheduler built from the pipeline's scheduler config.
        latent_shape: ``(batch, channels, height / 8, width / 8)``.
        decode: ``latents -> images [B, 3, H, W] in [-1, 1]`` (``vae.decode(z / scaling_factor)``), differentiable.
        unet, vae: the denoising network (the UNet, or the transformer of SD3-style pipelines) and the VAE, frozen.
        prompt_embeds, negative_embeds: ``[B, tokens, dim]`` and ``[1, tokens, dim]``; ``prompt_embeds`` requires
            grad when asked for (embedding optimization).
    """

    model_fn: Denoiser
    scheduler: object
    latent_shape: tuple[int, int, int, int]
    decode: Callable[[torch.Tensor], torch.Tensor]
    unet: torch.nn.Module
    vae: torch.nn.Module
    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor

    def sampler(self, num_inference_steps: int = 50) -> Sampler:
        """A ``Sampler`` over this pipeline's model and scheduler."""
        return Sampler(self.model_fn, self.scheduler, num_inference_steps)

    def initial_latent(self, seed: int = 0) -> torch.Tensor:
        """Float32 Gaussian initial latents of ``latent_shape`` from ``seed`` (times the scheduler's init sigma)."""
        noise = torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(seed))
        return (noise * float(getattr(self.scheduler, "init_noise_sigma", 1.0))).to(self.prompt_embeds.device)


def load_pipeline(path: str | Path, dtype: torch.dtype | None = None):
    """Load a diffusers pipeline saved with ``save_pretrained`` in a local folder (no download), once, for several
    ``from_pipeline`` calls (one per prompt); raises ``MissingWeightsError`` for a folder that is not one."""
    return _load(path, None, dtype)


def _load(pipe_or_path, device, dtype):
    if not isinstance(pipe_or_path, (str, Path)):
        return pipe_or_path
    from diffusers import DiffusionPipeline

    path = Path(pipe_or_path)
    if not (path / "model_index.json").is_file():
        raise MissingWeightsError(
            f"{path} is not a diffusers pipeline folder (no model_index.json). Save one with "
            "`pipeline.save_pretrained(DIR)` on a machine that has the weights, and pass DIR."
        )
    # Components saved as absent (e.g. SD3 without its T5 encoder, SD without a safety checker) are passed as None.
    index = load_json(path / "model_index.json")
    absent = {name: None for name, value in index.items() if value == [None, None] or name == "safety_checker"}
    options = {"torch_dtype": dtype} if dtype is not None else {}
    return DiffusionPipeline.from_pretrained(str(path), local_files_only=True, **absent, **options)


def _scheduler(pipe, name: str | None):
    config = pipe.scheduler.config
    if name is None:
        if type(pipe.scheduler) in SUPPORTED_SCHEDULERS:
            return type(pipe.scheduler).from_config(config)
        name = "ddim"
    return scheduler_by_name(name, config)


def from_pipeline(
    pipe_or_path,
    prompt: str | list[str],
    *,
    negative_prompt: str = "",
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    scheduler: str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    embeds_require_grad: bool = False,
    vae_slicing: bool = False,
    vae_tiling: bool = False,
    checkpoint_decoder: bool = False,
) -> PipelineParts:
    """Adapt a Stable-Diffusion-style pipeline (UNet2DConditionModel + VAE + CLIP text encoder).

    Args:
        pipe_or_path: a diffusers pipeline, or a local folder saved with ``save_pretrained``.
        prompt: one prompt or a list (the batch).
        negative_prompt: the unconditional prompt of classifier-free guidance (defaults to "").
        guidance_scale: ``w`` in ``eps_u + w (eps_c - eps_u)`` (defaults to 7.5).
        height, width: image size (defaults to the UNet's sample size times the VAE factor).
        scheduler: a name from ``sdo.schedulers.SCHEDULER_NAMES`` ("ddim", "ddpm", "dpm++", "euler",
            "flowmatch"); defaults to the pipeline's own when supported, else DDIM (built from the pipeline's
            scheduler config).
        device, dtype: where the modules go, and their precision.
        embeds_require_grad: make the prompt embeddings a leaf that requires grad.
        vae_slicing, vae_tiling: decode one image, or one tile, at a time (diffusers' ``enable_slicing`` /
            ``enable_tiling``): less decoder memory.
        checkpoint_decoder: recompute the decoder's activations in backward instead of storing them.

    Memory: with ``dtype=torch.bfloat16`` the modules run in bf16 while latents, solver and gradients stay float32
    (``sdo.Denoiser`` and ``decode`` cast at the boundary); add ``sdo.Shortcut(checkpoint=True)`` to recompute the
    kept UNet step. See BENCHMARKS.md for the SD-1.5 memory budget.
    """
    pipe = _load(pipe_or_path, device, dtype)
    pipe = pipe.to(device) if dtype is None else pipe.to(device, dtype)
    network = getattr(pipe, "transformer", None) or pipe.unet
    for module in (network, pipe.vae, *_text_encoders(pipe)):
        module.requires_grad_(False).eval()
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    cond, uncond, pooled, negative_pooled = _encode(pipe, prompts, negative_prompt, torch.device(device))
    cond = cond.detach().clone().requires_grad_(embeds_require_grad)
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    height = height or network.config.sample_size * factor
    width = width or network.config.sample_size * factor
    shape = (len(prompts), network.config.in_channels, height // factor, width // factor)
    sampler_scheduler = _scheduler(pipe, scheduler)
    model_fn = Denoiser(
        network,
        prediction_type=prediction_type(sampler_scheduler),
        encoder_hidden_states=cond,
        negative_encoder_hidden_states=uncond[:1],
        guidance_scale=guidance_scale,
        pooled_projections=pooled,
        negative_pooled_projections=negative_pooled,
    )
    decode = _decoder(pipe.vae, vae_slicing, vae_tiling, checkpoint_decoder)
    return PipelineParts(model_fn, sampler_scheduler, shape, decode, network, pipe.vae, cond, uncond[:1])


def _text_encoders(pipe) -> list[torch.nn.Module]:
    names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    return [module for name in names if (module := getattr(pipe, name, None)) is not None]


def _encode(pipe, prompts: list[str], negative_prompt: str, device: torch.device):
    """Prompt embeddings with the pipeline's own encoders: ``(cond, uncond, pooled, negative_pooled)``; the pooled
    pair is None for UNet pipelines (Stable Diffusion 1.x/2.x) and set for SD3-style transformer pipelines."""
    negative = [negative_prompt] * len(prompts)
    with torch.no_grad():
        if getattr(pipe, "transformer", None) is not None:
            cond, uncond, pooled, negative_pooled = pipe.encode_prompt(
                prompts,
                prompts,
                prompts,
                device=device,
                do_classifier_free_guidance=True,
                negative_prompt=negative,
                negative_prompt_2=negative,
                negative_prompt_3=negative,
            )
            return cond, uncond.detach(), pooled.detach(), negative_pooled[:1].detach()
        cond, uncond = pipe.encode_prompt(prompts, device, 1, True, negative_prompt=negative)
    return cond, uncond.detach(), None, None


def _decoder(vae, slicing: bool, tiling: bool, checkpointed: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """``latents -> images in [-1, 1]``: undo the latent scaling (and shift), decode in the VAE's dtype."""
    if slicing:
        vae.enable_slicing()
    if tiling:
        vae.enable_tiling()
    shift = getattr(vae.config, "shift_factor", None) or 0.0

    def decode_now(latents: torch.Tensor) -> torch.Tensor:
        image = vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype)).sample
        return image.to(latents.dtype)

    def decode(latents: torch.Tensor) -> torch.Tensor:
        if checkpointed and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(decode_now, latents, use_reentrant=False)
        return decode_now(latents)

    return decode
