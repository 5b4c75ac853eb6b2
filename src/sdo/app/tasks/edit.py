"""Editing real images on a pipeline (``sdo optimize --pipeline DIR --image PATH``): the paper's aesthetic
enhancement and text-guided manipulation of a user's own pictures.

The images are resized to the pipeline's size, encoded (``PipelineParts.encode``) and inverted deterministically to
``--start-step`` under the prompt (``PipelineParts.invert``, guidance ``--inversion-guidance``); the latent there is
then optimized for ``--reward``, optionally plus ``--proximity W`` times the pixel term ``-mean((x - input)^2)``
(``PixelProximity``), which keeps the edit near its input. The run writes ``OUT/images/input-<i>.png``,
``before-<i>.png`` (the reconstruction from the inverted latent, before any update) and ``after-<i>.png``, and the
reconstruction PSNR of ``before`` against ``input`` (``sdo.app.results.save_result``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdo.app.tasks.latent import (
    LatentTask,
    LatentTaskConfig,
    TaskResources,
    load_resources,
    pipeline_parts,
    pipeline_task,
)
from sdo.errors import ConfigError
from sdo.io import IMAGE_SUFFIXES, load_image
from sdo.rewards import WeightedReward

__all__ = ["PixelProximity", "build_image_task", "image_paths"]


class PixelProximity:
    """``r(images) = -mean((images - reference)^2)`` per image (images in [0, 1]): the paper's pixel term, which
    keeps an edited image near its input; a weight ``W`` makes it ``-W x`` the mean squared pixel difference."""

    def __init__(self, reference: torch.Tensor) -> None:
        self.reference = reference.detach()

    def __call__(self, images: torch.Tensor, prompts: object = None) -> torch.Tensor:
        return -(images - self.reference.to(images)).square().flatten(1).mean(dim=1)


def image_paths(config: LatentTaskConfig) -> list[Path]:
    """The ``--image`` files, then the images of ``--images DIR`` (``IMAGE_SUFFIXES``, sorted by name)."""
    paths = [Path(path) for path in config.image]
    if config.images:
        found = sorted(p for p in Path(config.images).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise ConfigError(f"`images`: {config.images} holds no {'/'.join(IMAGE_SUFFIXES)} file.")
        paths += found
    return paths


def _nearest_multiple(value: int, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)


def _size(config: LatentTaskConfig, multiple: int) -> tuple[int | None, int | None, list[str]]:
    """``--height`` / ``--width`` (None: the pipeline's), each a multiple of ``multiple``: else the nearest one,
    and a note saying so."""
    size, notes = [], []
    for name in ("height", "width"):
        value = getattr(config, name) or None
        if value is not None and value % multiple:
            notes.append(
                f"--{name} {value} is not a multiple of {multiple}: using {_nearest_multiple(value, multiple)}"
            )
            value = _nearest_multiple(value, multiple)
        size.append(value)
    return size[0], size[1], notes


def _load_inputs(
    paths: list[Path], size: tuple[int, int], device: str, max_pixels: int
) -> tuple[torch.Tensor, list[str]]:
    """The images as one ``[B, 3, H, W]`` batch at ``size``, and a note for each one that had to be resized; an
    image of more than ``max_pixels`` pixels is refused (``--max-pixels``)."""
    images, notes = [], []
    for path in paths:
        image = load_image(path, device, max_pixels=max_pixels)
        if tuple(image.shape[2:]) != tuple(size):
            height, width = image.shape[2:]
            notes.append(f"{path} is {width}x{height}: resized to the pipeline's {size[1]}x{size[0]}")
            image = load_image(path, device, size=size, max_pixels=max_pixels)
        images.append(image)
    return torch.cat(images), notes


def build_image_task(config: LatentTaskConfig, resources: TaskResources | None = None) -> LatentTask:
    """The image-editing task of ``config.image`` / ``config.images`` on ``config.pipeline`` (module docstring)."""
    from sdo.pipelines import size_multiple

    resources = resources or load_resources(config)
    paths = image_paths(config)
    height, width, notes = _size(config, size_multiple(resources.pipeline))
    parts = pipeline_parts(config, resources.pipeline, len(paths), dict(height=height, width=width))
    inputs, resized = _load_inputs(paths, parts.image_size, config.device, config.max_pixels)
    with torch.no_grad():
        latent = parts.invert(inputs, config.start_step, config.steps, config.inversion_guidance)
    score = config.image_reward([config.prompt], config.device)
    if config.proximity:  # None or 0: no pixel term
        terms = score.terms if isinstance(score, WeightedReward) else {config.reward: (1.0, score)}
        score = WeightedReward({**terms, "proximity": (config.proximity, PixelProximity(inputs))})
    sampler = parts.sampler(config.steps, compile=config.compile)
    description = f"edit {len(paths)} image(s): {config.reward} reward for {config.prompt!r}"
    task = pipeline_task(config, resources.pipeline, parts, sampler, latent, score, description, inputs=inputs)
    task.settings.update(inversion_guidance=config.inversion_guidance, images=[str(path) for path in paths])
    if notes + resized:
        task.notes["notes"] = notes + resized
    return task
