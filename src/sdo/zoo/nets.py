"""Architectures of the embedded model zoo: a class-conditional UNet2DModel and two digit classifiers.

Images are ``[batch, 1, 32, 32]`` in ``[-1, 1]``: 28x28 MNIST digits padded with background (-1) by 2 pixels.
The two classifiers differ in architecture on purpose: ``RewardNet`` serves as the reward, ``JudgeNet`` judges
results and is never seen by any reward, so that an optimizer exploiting the reward's blind spots shows up.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DModel
from torch import nn

IMAGE_SIZE = 32
NUM_CLASSES = 10
NULL_CLASS = 10  # the unconditional class of classifier-free guidance

UNET_CONFIG = {
    "sample_size": IMAGE_SIZE,
    "in_channels": 1,
    "out_channels": 1,
    "layers_per_block": 1,
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    "num_class_embeds": NUM_CLASSES + 1,
    "norm_num_groups": 8,
}


def build_unet() -> UNet2DModel:
    """The embedded diffusion model (epsilon prediction, 1.1M parameters), randomly initialised."""
    return UNet2DModel(**UNET_CONFIG)


class RewardNet(nn.Module):
    """The reward classifier: a small VGG-style CNN. ``features(x)`` gives the conv maps the style reward uses."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2)),
                nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2)),
                nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2)),
            ]
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.SiLU(), nn.Linear(128, NUM_CLASSES))

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of each conv block: ``[B, 16, 16, 16]``, ``[B, 32, 8, 8]``, ``[B, 64, 4, 4]``."""
        maps = []
        for block in self.blocks:
            x = block(x)
            maps.append(x)
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, 10]``."""
        return self.head(self.features(x)[-1])


class JudgeNet(nn.Module):
    """The independent judge: strided convolutions with batch-free (group) norm and a global-pool head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 5, stride=2, padding=2),
            nn.GroupNorm(4, 32),
            nn.GELU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.GroupNorm(8, 64),
            nn.GELU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1),
            nn.GroupNorm(8, 128),
            nn.GELU(),
        )
        self.head = nn.Linear(128, NUM_CLASSES)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``[B, 128]`` (a feature space for Frechet distances)."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, 10]``."""
        return self.head(self.embed(x))
