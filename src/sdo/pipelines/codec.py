"""The VAE codec: images ``[B, 3, H, W]`` in ``[0, 1]`` to latents (``encoder``) and back (``decoder``), with the
latent scaling and shift each family's pipeline applies (SDXL's per-channel statistics, SD3/Flux's shift, Flux's
2x2 packing); ``encoder`` undoes ``decoder``'s arithmetic exactly."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import ConfigError
from .flux import pack_latents, unpack_latents

__all__ = ["check_images", "decoder", "encoder", "vae_factor"]


def vae_factor(vae) -> int:
    """The VAE's spatial down-sampling factor (8 for Stable Diffusion's)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def check_images(images: torch.Tensor, size: tuple[int, int]) -> None:
    """``ConfigError`` unless ``images`` is a float ``[B, 3, H, W]`` batch (``B >= 1``) in [0, 1] of
    ``size == (H, W)``."""
    if not torch.is_tensor(images) or not images.is_floating_point() or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ConfigError(f"`images` must be a float [B, 3, H, W] tensor in [0, 1], got {shape}.")
    if images.shape[0] == 0:
        raise ConfigError(f"`images` is an empty batch (shape {tuple(images.shape)}); pass at least one image.")
    if tuple(images.shape[2:]) != tuple(size):
        raise ConfigError(
            f"`images` are {images.shape[2]}x{images.shape[3]} but this pipeline makes {size[0]}x{size[1]} images; "
            "resize them (sdo.io.load_image(path, size=...)) or build the parts with that height and width."
        )
    if images.numel() and not bool(((images >= 0) & (images <= 1)).all()):
        raise ConfigError(
            "`images` must hold values in [0, 1] (sdo's image convention), not e.g. [-1, 1] or [0, 255]."
        )


def _latent_statistics(vae, like: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float, float]:
    """``(mean, std, scaling)`` with ``latents = (z - mean) * scaling / std``: SDXL's per-channel
    ``latents_mean``/``latents_std`` as ``[1, C, 1, 1]`` tensors, else ``(shift_factor or 0, 1)``."""
    config = vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        view = (1, len(mean), 1, 1)
        as_tensor = lambda values: torch.tensor(values, device=like.device, dtype=like.dtype).view(view)  # noqa: E731
        return as_tensor(mean), as_tensor(std), config.scaling_factor
    return getattr(config, "shift_factor", None) or 0.0, 1.0, config.scaling_factor


def encoder(vae, family: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``images in [0, 1] -> latents``: the exact inverse of ``decoder``'s arithmetic around the VAE (map to
    ``[-1, 1]``, ``vae.encode(...).latent_dist.mean``, scale and shift, pack for Flux)."""

    def encode(images: torch.Tensor) -> torch.Tensor:
        dtype = images.dtype
        latents = vae.encode((2 * images - 1).to(vae.dtype)).latent_dist.mean.to(dtype)
        mean, std, scaling = _latent_statistics(vae, latents)
        latents = (latents - mean) * scaling / std
        return pack_latents(latents) if family == "flux" else latents

    return encode


def decoder(
    vae, slicing: bool, tiling: bool, checkpointed: bool, image_shape: tuple[int, ...], family: str
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``latents -> images in [0, 1]``: unpack (Flux), undo the latent scaling (with SDXL's per-channel
    ``latents_mean``/``latents_std``, or SD3/Flux's ``shift_factor``), decode in the VAE's dtype, and map
    ``[-1, 1]`` to ``[0, 1]`` with the clamp of diffusers' ``VaeImageProcessor`` (no gradient past the clamp).
    ``slicing``/``tiling`` switch on the VAE's own; ``checkpointed`` recomputes the decoder in backward."""
    if slicing:
        vae.enable_slicing()
    if tiling:
        vae.enable_tiling()

    def decode_now(latents: torch.Tensor) -> torch.Tensor:
        if family == "flux":
            latents = unpack_latents(latents, *image_shape[2:])
        mean, std, scaling = _latent_statistics(vae, latents)
        latents = latents * std / scaling + mean
        image = vae.decode(latents.to(vae.dtype)).sample
        return (image.to(latents.dtype) / 2 + 0.5).clamp(0, 1)

    def decode(latents: torch.Tensor) -> torch.Tensor:
        if checkpointed and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(decode_now, latents, use_reentrant=False)
        return decode_now(latents)

    return decode
