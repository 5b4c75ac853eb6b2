"""Images on disk at full resolution: ``OUT/images/<stem>-<i>.png``, one file per image of a batch.

sdo's image convention is float ``[B, C, H, W]`` in ``[0, 1]`` (``PipelineParts.decode``, ``sdo.zoo.to_images``).
Pixels are quantized as diffusers' ``numpy_to_pil`` does (``round(255 x)``), so a PNG written here equals the image
a plain pipeline returns for the same latent, up to that rounding.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdo.io import atomic_path, make_dir

__all__ = ["save_images", "to_uint8"]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` floats in [0, 1] -> ``[B, H, W, 3]`` uint8 (clamped; one channel repeated to RGB)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"`images` must be [B, 1 or 3, H, W], got shape {tuple(images.shape)}.")
    pixels = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous()


def save_images(images: torch.Tensor, folder: str | Path, stem: str) -> list[Path]:
    """Write image ``i`` of ``images`` (``[B, C, H, W]`` in [0, 1]) as ``folder/<stem>-<i>.png``, atomically.

    Returns the paths written, in batch order.
    """
    from PIL import Image

    folder = make_dir(folder)
    paths = []
    for index, pixels in enumerate(to_uint8(images)):
        path = folder / f"{stem}-{index}.png"
        with atomic_path(path) as tmp:
            Image.fromarray(pixels.numpy()).save(tmp, format="PNG")
        paths.append(path)
    return paths
