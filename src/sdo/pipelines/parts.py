"""``PipelineParts``: what ``from_pipeline`` gives the sampler and the tasks (model function, scheduler, latent
layout, the VAE codec, inversion, rewards on decoded images), and the attention projections LoRA adapts in a
network (``lora_targets``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..checks import check_guidance
from ..inversion import invert
from ..models import Denoiser
from ..sampling import Sampler
from .codec import check_images, encoder, vae_factor
from .flux import pack_latents
from .inversion import inversion_model
from .rewards import DecodedReward

__all__ = ["TRANSFORMER_LORA_TARGETS", "UNET_LORA_TARGETS", "PipelineParts", "lora_targets"]

UNET_LORA_TARGETS = "to_q,to_k,to_v,to_out.0"
TRANSFORMER_LORA_TARGETS = "to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out"


@dataclass
class PipelineParts:
    """The pieces of a pipeline that ``Sampler`` and the tasks use.

    Attributes:
        model_fn: ``sdo.Denoiser`` over the network with the prompt embeddings and guidance.
        scheduler: a supported diffusers scheduler built from the pipeline's scheduler config.
        latent_shape: the layout of the pipeline's ``latents=`` argument: ``(batch, channels, height / f, width / f)``
            with the VAE factor ``f``, or for Flux the packed ``(batch, (height / 2f) (width / 2f), 4 channels)``.
        decode: ``latents -> images [B, 3, H, W] in [0, 1]`` (unpacked, unscaled and unshifted as the pipeline
            does, then ``vae.decode``, then ``(x / 2 + 0.5).clamp(0, 1)`` as diffusers' image processor),
            differentiable. ``[0, 1]`` float images are sdo's image convention (``sdo.ImageReward``).
        network, vae: the denoising network (the UNet, or the transformer of SD3 and Flux) and the VAE, frozen;
            ``unet`` is a read-only alias of ``network`` (its name before it held transformers too).
        prompt_embeds, negative_embeds: ``[B, tokens, dim]`` and ``[1, tokens, dim]`` (None where the pipeline
            runs no classifier-free guidance, e.g. Flux without a negative prompt); ``prompt_embeds`` requires grad
            when asked for (embedding optimization).
        pooled_embeds: ``[B, dim]`` pooled prompt embeddings (SDXL, SD3, Flux; None for SD 1.x/2.x), requiring grad
            with ``prompt_embeds``.
        family: "sd", "sdxl", "sd3" or "flux".
        timestep_options: ``num_inference_steps -> set_timesteps`` extra arguments (Flux and dynamically shifted
            SD3: ``sigmas``/``mu``), as the pipeline passes them.
        image_latent_shape: ``(batch, channels, height / f, width / f)``, the unpacked latent.
        prompts: the prompt batch the embeddings were computed from (what image rewards receive).
    """

    model_fn: Denoiser
    scheduler: object
    latent_shape: tuple[int, ...]
    decode: Callable[[torch.Tensor], torch.Tensor]
    network: torch.nn.Module
    vae: torch.nn.Module
    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor | None
    pooled_embeds: torch.Tensor | None = None
    family: str = "sd"
    timestep_options: Callable[[int], dict] | None = None
    image_latent_shape: tuple[int, int, int, int] | None = None
    lora_targets: str = field(default=UNET_LORA_TARGETS)
    prompts: list[str] = field(default_factory=list)

    @property
    def unet(self) -> torch.nn.Module:
        """The denoising network: a read-only alias of ``network``, kept for code written when the field was named
        ``unet`` (it holds SD3's and Flux's transformers too)."""
        return self.network

    def latent_reward(self, image_reward: Callable[[torch.Tensor, list[str]], torch.Tensor]) -> DecodedReward:
        """The latent reward ``r(x0, cond) = image_reward(decode(x0), prompts)`` of an image reward (``sdo``'s image
        convention: ``image_reward(images [B, 3, H, W] in [0, 1], prompts) -> [B]``, differentiable in
        ``images``), for ``optimize_latent`` and every other latent-reward API; no decoding by hand."""
        return DecodedReward(image_reward, self.decode, self.prompts)

    def sampler(self, num_inference_steps: int = 50, model_fn: Callable | None = None, **options) -> Sampler:
        """A ``Sampler`` over this pipeline's model (or ``model_fn``) and scheduler, with the pipeline's timestep
        arguments; it takes the initial latent as the pipeline's ``latents=`` does (unit noise, ``scale_noise``).
        ``options`` go to ``Sampler`` (e.g. ``compile``)."""
        timesteps = self.timestep_options(num_inference_steps) if self.timestep_options else None
        return Sampler(
            model_fn or self.model_fn,
            self.scheduler,
            num_inference_steps,
            timestep_options=timesteps,
            scale_noise=True,
            **options,
        )

    def initial_latent(self, seed: int = 0, batch: int | None = None) -> torch.Tensor:
        """Float32 unit Gaussian noise from ``seed`` in the layout the pipeline's ``latents=`` takes
        (``latent_shape``; for Flux, the noise of ``image_latent_shape`` packed into 2x2 patches), of ``batch``
        samples (defaults to the prompt batch)."""
        shape = self.image_latent_shape or self.latent_shape
        shape = (batch or shape[0], *shape[1:])
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        if self.family == "flux":
            noise = pack_latents(noise)
        return noise.to(self.prompt_embeds.device)

    @property
    def image_size(self) -> tuple[int, int]:
        """``(height, width)`` of this pipeline's images (what ``decode`` returns and ``encode`` takes)."""
        shape = self.image_latent_shape or self.latent_shape
        factor = vae_factor(self.vae)
        return shape[2] * factor, shape[3] * factor

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]`` at ``image_size`` -> latents ``[B, ...]`` in the layout of
        ``initial_latent`` and the sampler (``latent_shape`` with batch ``B``), the inverse of ``decode``.

        ``vae.encode(2 images - 1).latent_dist.mean`` (the posterior mean: deterministic, no sampling), then the
        latent scaling as the pipelines' image-to-image variants do it: ``(z - shift_factor) * scaling_factor``
        (SD3, Flux; shift 0 for SD), or ``(z - latents_mean) * scaling_factor / latents_std`` when the VAE has
        per-channel statistics (SDXL variants), then Flux's 2x2 packing. Float32 out, whatever the VAE's dtype.
        ``decode(encode(x))`` is ``x`` up to the VAE's own reconstruction error; ``encode`` undoes ``decode``'s
        arithmetic exactly. Differentiable.

        Raises:
            ConfigError: ``images`` is not ``[B, 3, H, W]`` (``B >= 1``) at this pipeline's size, or holds values
                outside [0, 1].
        """
        check_images(images, self.image_size)
        return encoder(self.vae, self.family)(images)

    def invert(
        self,
        images: torch.Tensor,
        step: int,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        *,
        fixed_point_iters: int = 0,
    ) -> torch.Tensor:
        """The latent at schedule index ``step`` of ``num_inference_steps`` whose sampling gives ``images``:
        ``encode``, then deterministic inversion under the prompts' conditioning (``sdo.inversion.invert``: DDIM
        inversion for DDIM with epsilon or v-prediction; for Euler and FlowMatch the ODE run backwards).

        ``self.sampler(num_inference_steps).sample(latent, sdo.NoGrad(), start_step=step)`` then reconstructs
        the encoded latent (exactly when the network's output does not depend on its input; otherwise up to the
        inversion error, smallest with the inversion's and the sampler's guidance equal). Image ``b`` is inverted
        under prompt ``b`` (or the one prompt, for any batch).

        Args:
            images: ``[B, 3, H, W]`` in ``[0, 1]`` at ``image_size``.
            step: the schedule index to invert to, in ``[0, num_inference_steps - 1]`` (the ``start_step`` of
                the sampling or optimization that continues from it).
            num_inference_steps: length of the schedule.
            guidance_scale: classifier-free guidance of the inversion (1.0: the conditional prediction alone, the
                usual choice); for a guidance-distilled Flux, the embedded guidance. Record it with the latent.
            fixed_point_iters: refinements of each inverted state (``sdo.inversion.invert``).

        Raises:
            ConfigError: bad ``images`` (as ``encode``), ``step`` or ``num_inference_steps`` out of range, or a
                ``guidance_scale`` that is not a finite number in [0, 1000].
        """
        check_guidance(guidance_scale, "guidance_scale")
        latents = self.encode(images)
        model_fn = inversion_model(self.model_fn, latents.shape[0], guidance_scale)
        sampler = self.sampler(num_inference_steps, model_fn=model_fn)
        return invert(sampler, latents, step, fixed_point_iters=fixed_point_iters)


def lora_targets(network: torch.nn.Module) -> str:
    """The attention projections LoRA adapts in ``network``, comma-separated (peft ``target_modules``): the
    query/key/value/output projections of a UNet, and of both streams of an SD3 or Flux transformer."""
    names = {name.rsplit(".", 1)[-1] for name, _ in network.named_modules()}
    return TRANSFORMER_LORA_TARGETS if "add_q_proj" in names else UNET_LORA_TARGETS
