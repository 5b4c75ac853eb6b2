"""Editing real images on a pipeline (``sdo optimize --pipeline DIR --image PATH``): the paper's aesthetic
enhancement and text-guided manipulation of a user's own pictures.

The images are fitted to the pipeline's size (their short side resized to it, then centre-cropped: the aspect
ratio kept; ``load_inputs``), encoded (``PipelineParts.encode``) and inverted deterministically to
``--start-step`` under the prompt (``PipelineParts.invert``, guidance ``--inversion-guidance``); the latent there is
then sampled with the same guidance unless ``--guidance`` is given, and optimized for ``--reward``, optionally plus
``--proximity W`` times the pixel term ``-mean((x - input)^2)`` (``PixelProximity``), which keeps the edit near its
input. The run writes ``OUT/images/input-<i>.png``, ``before-<i>.png`` (the reconstruction from the inverted latent,
before any update) and ``after-<i>.png``, and the reconstruction PSNR of ``before`` against ``input``
(``sdo.app.results.save_result``).

This module holds the editing pieces; ``sdo.app.tasks.latent.build_image_task`` builds the task from them (the
one-way import: ``latent`` imports ``edit``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from sdo.errors import ConfigError
from sdo.io import IMAGE_SUFFIXES, load_image

__all__ = ["PixelProximity", "image_paths", "load_inputs", "model_size"]


class PixelProximity:
    """``r(images) = -mean((images - reference)^2)`` per image (images in [0, 1]): the paper's pixel term, which
    keeps an edited image near its input; a weight ``W`` makes it ``-W x`` the mean squared pixel difference."""

    def __init__(self, reference: torch.Tensor) -> None:
        self.reference = reference.detach()

    def __call__(self, images: torch.Tensor, prompts: object = None) -> torch.Tensor:
        return -(images - self.reference.to(images)).square().flatten(1).mean(dim=1)


def image_paths(image: Sequence[str], images: str) -> list[Path]:
    """The ``--image`` files (``image``), then the images of the ``--images`` folder (``images``;
    ``IMAGE_SUFFIXES``, sorted by name)."""
    paths = [Path(path) for path in image]
    if images:
        found = sorted(p for p in Path(images).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise ConfigError(f"--images: {images} holds no {'/'.join(IMAGE_SUFFIXES)} file.")
        paths += found
    return paths


def _nearest_multiple(value: int, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)


def model_size(height: int, width: int, multiple: int) -> tuple[int | None, int | None, list[str]]:
    """``--height`` / ``--width`` (0: None, the pipeline's), each a multiple of ``multiple``: else the nearest one,
    and a note saying so."""
    size, notes = [], []
    for name, value in (("height", height), ("width", width)):
        value = value or None
        if value is not None and value % multiple:
            notes.append(
                f"--{name} {value} is not a multiple of {multiple}: using {_nearest_multiple(value, multiple)}"
            )
            value = _nearest_multiple(value, multiple)
        size.append(value)
    return size[0], size[1], notes


def load_inputs(
    paths: list[Path], size: tuple[int, int], device: str, max_pixels: int
) -> tuple[torch.Tensor, list[str]]:
    """The images as one ``[B, 3, H, W]`` batch at ``size = (H, W)``, each fitted without distortion: its short
    side resized to the size's (Lanczos), then the middle cut out; with one note per image that was resized or
    cropped. An image of more than ``max_pixels`` pixels is refused (``--max-pixels``)."""
    images, notes = [], []
    for path in paths:
        image = load_image(path, device, max_pixels=max_pixels)
        height, width = image.shape[2:]
        scale = max(size[0] / height, size[1] / width)
        scaled = (max(size[0], round(height * scale)), max(size[1], round(width * scale)))
        if scaled != (height, width):
            image = load_image(path, device, size=scaled, max_pixels=max_pixels)
        if scaled != tuple(size):
            image = centre_crop(image, size)
        note = _fit_note(path, (height, width), scaled, size)
        notes += [note] if note else []
        images.append(image)
    return torch.cat(images), notes


def centre_crop(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The middle ``size = (H, W)`` pixels of ``images`` ``[B, C, H', W']`` (``H' >= H``, ``W' >= W``)."""
    top, left = (images.shape[2] - size[0]) // 2, (images.shape[3] - size[1]) // 2
    return images[:, :, top : top + size[0], left : left + size[1]]


def _fit_note(path: Path, original: tuple[int, int], scaled: tuple[int, int], size: tuple[int, int]) -> str:
    """What fitting ``path`` to the pipeline's ``size`` did to it (sizes as ``(height, width)``; the note says
    width x height), or "" when it was already that size."""
    shown = f"{path} is {original[1]}x{original[0]}"
    target = f"the pipeline's {size[1]}x{size[0]}"
    if scaled == tuple(size):
        return "" if original == scaled else f"{shown}: resized to {target}"
    resized = "" if original == scaled else f"resized to {scaled[1]}x{scaled[0]} and "
    return f"{shown}: {resized}centre-cropped to {target} (aspect ratio kept)"
