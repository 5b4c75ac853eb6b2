"""Rewards on decoded images: ``DecodedReward`` makes a latent reward of an image reward by decoding first."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["DecodedReward"]


class DecodedReward:
    """A latent reward from an image reward: ``r(x0, cond) = image_reward(decode(x0), prompts)``.

    ``image_reward(images, prompts) -> [B]`` takes float images ``[B, 3, H, W]`` in ``[0, 1]`` and the prompt batch
    (``sdo.ImageReward``); ``cond``, when it is a ``[B]`` tensor of prompt indices, picks the prompts. ``last_terms``
    passes a weighted reward's unweighted terms through (``sdo.rewards.WeightedReward``).
    """

    def __init__(
        self,
        image_reward: Callable[[torch.Tensor, list[str]], torch.Tensor],
        decode: Callable[[torch.Tensor], torch.Tensor],
        prompts: list[str] | None = None,
    ) -> None:
        self.image_reward = image_reward
        self.decode = decode
        self.prompts = list(prompts or [])

    @property
    def last_terms(self) -> dict[str, torch.Tensor]:
        """The unweighted terms of the last call (a weighted reward), else empty."""
        return getattr(self.image_reward, "last_terms", {})

    def __call__(self, x0: torch.Tensor, cond: object = None) -> torch.Tensor:
        prompts = self.prompts
        if torch.is_tensor(cond) and prompts:
            prompts = [prompts[int(index)] for index in cond]
        elif len(prompts) == 1 and x0.shape[0] > 1:
            prompts = prompts * x0.shape[0]
        return self.image_reward(self.decode(x0), prompts)
