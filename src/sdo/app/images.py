"""Images on disk at full resolution: ``OUT/images/<stem>-<i>.png``, one file per image of a batch.

sdo's image convention is float ``[B, C, H, W]`` in ``[0, 1]`` (``PipelineParts.decode``, ``sdo.zoo.to_images``).
Pixels are quantized as diffusers' ``numpy_to_pil`` does (``round(255 x)``), so a PNG written here equals the image
a plain pipeline returns for the same latent, up to that rounding.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from sdo.io import atomic_path, make_dir

__all__ = ["save_grid", "save_images", "to_uint8"]


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
    folder = make_dir(folder)
    paths = []
    for index, pixels in enumerate(to_uint8(images)):
        paths.append(_write_png(pixels, folder / f"{stem}-{index}.png"))
    return paths


def save_grid(images: torch.Tensor, path: str | Path, columns: int | None = None) -> Path:
    """Write ``images`` (``[B, C, H, W]`` in [0, 1]) as one PNG at ``path``, atomically: a grid of ``columns``
    images per row (default: ceil(sqrt(B))), full resolution, empty cells black."""
    pixels = to_uint8(images)
    count, height, width, _ = pixels.shape
    columns = columns or max(1, math.ceil(math.sqrt(count)))
    rows = math.ceil(count / columns)
    grid = torch.zeros(rows * height, columns * width, 3, dtype=torch.uint8)
    for index, image in enumerate(pixels):
        row, column = divmod(index, columns)
        grid[row * height : (row + 1) * height, column * width : (column + 1) * width] = image
    make_dir(Path(path).parent)
    return _write_png(grid, Path(path))


def _write_png(pixels: torch.Tensor, path: Path) -> Path:
    """``[H, W, 3]`` uint8 pixels as a PNG at ``path``, atomically."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(pixels.numpy()).save(tmp, format="PNG")
    return path


def psnr(images: torch.Tensor, reference: torch.Tensor) -> list[float]:
    """Peak signal-to-noise ratio per image, ``10 log10(1 / mean((images - reference)^2))`` in dB (peak 1)."""
    error = (images.detach().float() - reference.detach().float().to(images.device)).square().flatten(1).mean(dim=1)
    return [math.inf if value == 0 else 10 * math.log10(1 / value) for value in error.tolist()]
