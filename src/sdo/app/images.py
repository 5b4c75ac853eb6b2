"""Images on disk at full resolution: ``OUT/images/<stem>-<i>.png``, one file per image of a batch.

sdo's image convention is float ``[B, C, H, W]`` in ``[0, 1]`` (``PipelineParts.decode``, ``sdo.zoo.to_images``).
Pixels are quantized as diffusers' ``numpy_to_pil`` does (``round(255 x)``), so a PNG written here equals the image
a plain pipeline returns for the same latent, up to that rounding. ``save_grid`` is sdo's one image-grid writer
(a run's ``grid.png``, an item's ``image.png``, fine-tuning's sample grids).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
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


def save_grid(
    images: torch.Tensor | Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    path: str | Path,
    columns: int | None = None,
    *,
    captions: Mapping[str, Sequence[str]] | None = None,
) -> Path:
    """Write images in [0, 1] as one PNG grid at ``path``, atomically: sdo's one grid writer.

    ``images`` is one batch ``[B, C, H, W]``, laid out ``columns`` per row (default: ceil(sqrt(B))); or rows of
    images ``[N, C, H, W]`` of one size, one row each: a list (no labels) or a dict ``label -> images``, each
    label written left of its row, with ``captions[label]`` (one per image) above that row's images. An
    unlabelled grid is at full resolution; a labelled one is a preview whose images are between
    ``LABELLED_MIN_SIZE`` and ``LABELLED_MAX_SIZE`` pixels (small ones enlarged by a whole factor, their pixels
    kept, so the text is legible). Empty cells are black.

    Raises:
        ValueError: the images are not ``[N, 1 or 3, H, W]``, or the rows' images differ in size.
    """
    if isinstance(images, torch.Tensor):
        pixels = to_uint8(images)
        columns = columns or max(1, math.ceil(math.sqrt(len(pixels))))
        rows, labels = [pixels[start : start + columns] for start in range(0, len(pixels), columns)], []
    else:
        labels = list(images) if isinstance(images, Mapping) else []
        rows = [to_uint8(row) for row in (images.values() if isinstance(images, Mapping) else images)]
    grid = _tile(rows)
    if labels:
        grid = _labelled(grid, rows, labels, captions or {})
    make_dir(Path(path).parent)
    return _write_png(grid, Path(path))


LABELLED_MIN_SIZE, LABELLED_MAX_SIZE = 96, 256
"""Pixels: a labelled grid (``save_grid`` with row labels, a preview) enlarges smaller images to at least
``LABELLED_MIN_SIZE`` (by a whole factor, nearest neighbour: their pixels kept) and shrinks larger ones to
``LABELLED_MAX_SIZE`` on their long side (Lanczos)."""


def _tile(rows: list[torch.Tensor]) -> torch.Tensor:
    """Rows of ``[N, H, W, 3]`` uint8 images as one ``[rows x H, columns x W, 3]`` image, empty cells black."""
    sizes = {tuple(row.shape[1:3]) for row in rows}
    if len(sizes) != 1:
        raise ValueError(f"the grid's images must have one size, got {sorted(sizes)} (height, width).")
    ((height, width),) = sizes
    columns = max(len(row) for row in rows)
    grid = torch.zeros(len(rows) * height, columns * width, 3, dtype=torch.uint8)
    for index, row in enumerate(rows):
        for column, image in enumerate(row):
            grid[index * height : (index + 1) * height, column * width : (column + 1) * width] = image
    return grid


def _labelled(
    grid: torch.Tensor, rows: list[torch.Tensor], labels: list[str], captions: Mapping[str, Sequence[str]]
) -> torch.Tensor:
    """``grid`` (its images resized as ``save_grid`` says) on a white page with each row's label at its left and
    its captions, if any, in a strip above its images."""
    from PIL import Image, ImageDraw, ImageFont

    (height, width), columns = rows[0].shape[1:3], grid.shape[1] // rows[0].shape[2]
    cell_height, cell_width = _cell_size(height, width)
    enlarged = cell_height >= height
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_height = max(draw.textbbox((0, 0), "Ag", font=font)[3], 1) + 4
    margin = max(draw.textbbox((0, 0), label, font=font)[2] for label in labels) + 12
    strips = [text_height if label in captions else 0 for label in labels]
    page = Image.new("RGB", (margin + columns * cell_width, sum(strips) + len(rows) * cell_height), "white")
    draw = ImageDraw.Draw(page)
    top = 0
    for index, label in enumerate(labels):
        for column, caption in enumerate(captions.get(label, ())):
            draw.text((margin + column * cell_width + 2, top + 2), str(caption), fill="black", font=font)
        top += strips[index]
        band = Image.fromarray(grid[index * height : (index + 1) * height].numpy())
        resample = Image.Resampling.NEAREST if enlarged else Image.Resampling.LANCZOS
        page.paste(band.resize((columns * cell_width, cell_height), resample), (margin, top))
        draw.text((6, top + (cell_height - text_height) // 2), label, fill="black", font=font)
        top += cell_height
    return torch.from_numpy(np.asarray(page).copy())


def _cell_size(height: int, width: int) -> tuple[int, int]:
    """The size of an image in a labelled grid: enlarged by a whole factor to ``LABELLED_MIN_SIZE`` pixels, or
    shrunk to ``LABELLED_MAX_SIZE`` (a preview: the images themselves are written at full resolution)."""
    if min(height, width) < LABELLED_MIN_SIZE:
        scale = math.ceil(LABELLED_MIN_SIZE / min(height, width))
        return height * scale, width * scale
    if max(height, width) > LABELLED_MAX_SIZE:
        factor = LABELLED_MAX_SIZE / max(height, width)
        return max(1, round(height * factor)), max(1, round(width * factor))
    return height, width


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
