"""``--reward clip=1.0,aesthetic=0.5``: the image rewards of ``--pipeline`` tasks, alone or as a weighted sum.

A spec is ``NAME`` or ``NAME=WEIGHT`` terms separated by commas (``clip``, ``pickscore=1,aesthetic=0.25``); names
are ``sdo.clip_rewards.CLIP_REWARDS``. ``image_reward`` builds it as an image reward ``reward(images, prompts)``
(``PipelineParts.latent_reward`` turns it into a latent one); each term is logged separately (``reward_NAME``)
through ``sdo.rewards.WeightedReward.last_terms``.
"""

from __future__ import annotations

import math

import torch

from sdo.clip_rewards import CLIP_REWARDS
from sdo.errors import ConfigError
from sdo.io import DEFAULT_MAX_PIXELS
from sdo.rewards import WeightedReward

__all__ = ["image_reward", "parse_reward_spec"]


def parse_reward_spec(spec: str, names: tuple[str, ...] = CLIP_REWARDS) -> dict[str, float]:
    """``"clip=1.0,aesthetic=0.5"`` -> ``{"clip": 1.0, "aesthetic": 0.5}`` (a bare name weighs 1).

    Raises:
        ConfigError: empty or malformed terms, an unknown or repeated name, a weight that is not a finite
            number >= 0, or every weight 0 (nothing would be optimized).
    """
    terms: dict[str, float] = {}
    for term in spec.split(","):
        name, sep, weight_text = (part.strip() for part in term.partition("="))
        if not name or (sep and not weight_text):
            raise ConfigError(f"bad reward spec {spec!r}: write NAME or NAME=WEIGHT terms separated by commas.")
        if name not in names:
            raise ConfigError(f"unknown reward {name!r} in {spec!r}; known rewards: {', '.join(names)}.")
        if name in terms:
            raise ConfigError(f"reward {name!r} appears twice in {spec!r}.")
        try:
            weight = float(weight_text) if sep else 1.0
        except ValueError:
            raise ConfigError(f"bad weight {weight_text!r} for reward {name!r} in {spec!r}: not a number.") from None
        if not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"the weight of reward {name!r} must be a finite number >= 0, got {weight_text}.")
        terms[name] = weight
    if not any(terms.values()):
        raise ConfigError(
            f"the reward {spec!r} weighs every term 0, so nothing would be optimized; give a term a weight > 0."
        )
    return terms


def image_reward(
    spec: str,
    prompts: list[str],
    *,
    device: torch.device | str = "cpu",
    clip_path: str = "",
    pickscore_path: str = "",
    aesthetic_head: str = "",
    style_image: str = "",
    max_pixels: int = DEFAULT_MAX_PIXELS,
):
    """The image reward of ``spec`` as ``reward(images, cond) -> [B]``: one named reward as it is, several as a
    ``WeightedReward`` (a single term with a weight other than 1 too). The CLIP encoder is loaded only when a term
    needs it (PickScore loads its own model); ``max_pixels`` bounds the style image (``sdo.io.load_image``)."""
    from sdo.clip_rewards import ClipImageEncoder, clip_reward

    terms = parse_reward_spec(spec)
    encoder = None
    if set(terms) - {"pickscore"}:
        encoder = ClipImageEncoder(clip_path or None, device=device)
    options = dict(
        aesthetic_head=aesthetic_head, style_image=style_image, pickscore_path=pickscore_path, max_pixels=max_pixels
    )
    rewards = {name: clip_reward(name, encoder, prompts, **options) for name in terms}
    if len(terms) == 1 and next(iter(terms.values())) == 1.0:
        return next(iter(rewards.values()))
    return WeightedReward({name: (weight, rewards[name]) for name, weight in terms.items()})
