"""The one block of pipeline and reward options that ``sdo optimize`` and ``sdo finetune`` share.

``PipelineOptions`` is a frozen dataclass base of ``LatentTaskConfig`` and ``FinetuneConfig``: its fields (the
pipeline folder, the image reward and the files it reads, the image size and the guidance scale) are written once,
validated once (their ranges by ``check_options``, which each config's ``__post_init__`` runs first; the rest by
this block's ``__post_init__``, which each config's own calls) and turned into an image reward by one method.
The CLI still generates one flat flag per field (``--pipeline``, ``--reward``, ``--clip-path``, ...).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from sdo.app.options import option
from sdo.clip_rewards import CLIP_REWARDS
from sdo.errors import ConfigError, CorruptFileError
from sdo.io import DEFAULT_MAX_PIXELS, image_size

__all__ = ["DEFAULT_REWARD", "REWARD_HELP", "ZOO_GUIDANCE", "PipelineOptions"]

DEFAULT_REWARD = "clip"
"""The image reward of a ``--pipeline`` run that names none."""
REWARD_HELP = f"--pipeline: one of {', '.join(CLIP_REWARDS)}, or a weighted sum such as clip=1.0,aesthetic=0.5"
"""The help of ``--reward``, in every command that has it."""

ZOO_GUIDANCE = 3.0
"""The embedded model's classifier-free guidance scale, what ``guidance`` 0 means without ``--pipeline``."""


@dataclass(frozen=True)
class PipelineOptions:
    """Where a run's images come from and how they are scored (every field is a flag of the commands that use it).

    ``reward`` is a spec of ``sdo.app.reward_spec``: one name of ``sdo.clip_rewards.CLIP_REWARDS`` or a weighted sum
    such as ``clip=1.0,aesthetic=0.5``. A config whose default reward depends on another of its fields (fine-tuning's,
    on ``pipeline`` and ``task``) overrides ``reward_spec``.
    """

    pipeline: str = option(
        "",
        "use a diffusers pipeline instead of the embedded model: a save_pretrained folder or a Hub id org/name "
        "(SD 1.x/2.x, SDXL, SD3, Flux)",
    )
    reward: str = option(DEFAULT_REWARD, REWARD_HELP)
    clip_path: str = option("", "--pipeline: CLIP model for the rewards, a folder or a Hub id (or $SDO_CLIP_PATH)")
    pickscore_path: str = option(
        "", "--pipeline, pickscore: PickScore model, a folder or a Hub id (or $SDO_PICKSCORE_PATH)"
    )
    aesthetic_head: str = option("", "--pipeline, aesthetic: head safetensors (or $SDO_AESTHETIC_HEAD)")
    style_image: str = option("", "--pipeline, style: reference image (PNG, JPEG, WebP, TIFF)")
    height: int = option(0, "--pipeline: image height (0: the pipeline's default)", at_least=0, at_most=16384)
    width: int = option(0, "--pipeline: image width (0: the pipeline's default)", at_least=0, at_most=16384)
    guidance: float = option(
        0.0,
        f"classifier-free guidance scale (0: the model's default: {ZOO_GUIDANCE} for the embedded model, the "
        "family's own for --pipeline: 7.5 SD, 5.0 SDXL, 7.0 SD3, 3.5 Flux)",
        at_least=0,
        at_most=1000,
    )
    max_pixels: int = option(
        DEFAULT_MAX_PIXELS,
        "--pipeline: refuse an input image (an image to edit, the style image) of more pixels than this, before any "
        "model loads",
        at_least=1,
        at_most=2**31,
    )

    def __post_init__(self) -> None:
        """The checks across fields; the ranges are ``check_options``', which each config runs over all its fields
        (this block's included) before anything else."""
        if not self.pipeline:
            return
        if "style" in self.reward_terms():
            self._check_style_image()

    def _check_style_image(self) -> None:
        """``style_image`` is given, and its header names an image of at most ``max_pixels`` pixels (read before any
        model loads; ``ConfigError`` or ``CorruptFileError`` naming the flag and the file otherwise)."""
        if not self.style_image:
            raise ConfigError("`style_image` (an image: PNG, JPEG, WebP, TIFF) is required with the style reward.")
        try:
            image_size(self.style_image, max_pixels=self.max_pixels)
        except (ConfigError, CorruptFileError) as error:
            raise type(error)(f"`style_image` (--style-image): {error}") from None

    def reward_spec(self) -> str:
        """The reward spec of a ``--pipeline`` run: ``reward``."""
        return self.reward

    def reward_terms(self) -> dict[str, float]:
        """The ``--pipeline`` reward terms and their weights (``reward_spec`` parsed)."""
        from sdo.app.reward_spec import parse_reward_spec

        return parse_reward_spec(self.reward_spec())

    def image_reward(self, prompts: list[str], device: torch.device | str):
        """The image reward ``reward(images, prompts) -> [B]`` of ``reward_spec`` (``sdo.app.reward_spec``), with
        the CLIP, PickScore, aesthetic-head and style-image files of these options; only the weights its terms
        need are loaded."""
        from sdo.app.reward_spec import image_reward

        return image_reward(
            self.reward_spec(),
            prompts,
            device=device,
            clip_path=self.clip_path,
            pickscore_path=self.pickscore_path,
            aesthetic_head=self.aesthetic_head,
            style_image=self.style_image,
            max_pixels=self.max_pixels,
        )

    def reward_inputs(self) -> dict[str, str]:
        """The files and folders the ``reward_spec`` image reward reads, by field (``clip_path``,
        ``pickscore_path``, ``aesthetic_head``, ``style_image``), each as given or from its environment variable
        (``$SDO_CLIP_PATH``, ...); only those its terms load, and only those that are named."""
        terms = self.reward_terms()
        chosen = {}
        if set(terms) - {"pickscore"}:
            chosen["clip_path"] = self.clip_path or os.environ.get("SDO_CLIP_PATH", "")
        if "pickscore" in terms:
            chosen["pickscore_path"] = self.pickscore_path or os.environ.get("SDO_PICKSCORE_PATH", "")
        if "aesthetic" in terms:
            chosen["aesthetic_head"] = self.aesthetic_head or os.environ.get("SDO_AESTHETIC_HEAD", "")
        if "style" in terms:
            chosen["style_image"] = self.style_image
        return {name: path for name, path in chosen.items() if path}

    def size(self) -> dict[str, int | None]:
        """``height`` and ``width`` as ``from_pipeline`` takes them (None: the pipeline's default)."""
        return {"height": self.height or None, "width": self.width or None}
