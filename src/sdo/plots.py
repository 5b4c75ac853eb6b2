"""Pictures: image grids and reward curves, written atomically as PNG (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .io import atomic_path  # noqa: E402

__all__ = ["save_curves", "save_image_grid"]


def _save(figure, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)


def save_image_grid(rows: dict[str, torch.Tensor], path: str | Path, captions: dict[str, list[str]] | None = None):
    """One labelled row per entry of ``rows`` (``[N, 1, H, W]`` images in [-1, 1]); optional per-image captions."""
    n_cols = max(len(images) for images in rows.values())
    figure, axes = plt.subplots(len(rows), n_cols, figsize=(1.1 * n_cols + 1.2, 1.25 * len(rows)), squeeze=False)
    for row, (label, images) in enumerate(rows.items()):
        for col in range(n_cols):
            axis = axes[row][col]
            axis.set_xticks([])
            axis.set_yticks([])
            if col < len(images):
                pixels = images[col, 0].detach().float().cpu().clamp(-1, 1)
                axis.imshow(pixels, cmap="gray", vmin=-1, vmax=1)
                if captions and label in captions:
                    axis.set_title(captions[label][col], fontsize=7)
            else:
                axis.axis("off")
        axes[row][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    _save(figure, path)


def save_curves(histories: dict[str, list[dict]], path: str | Path, title: str = "") -> None:
    """Mean reward against iteration and against wall-clock seconds, one line per method."""
    figure, (by_iter, by_time) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, history in histories.items():
        rewards = [record["reward"] for record in history]
        by_iter.plot([record["iter"] for record in history], rewards, marker=".", label=name)
        by_time.plot([record["elapsed"] for record in history], rewards, marker=".", label=name)
    by_iter.set_xlabel("iteration")
    by_time.set_xlabel("seconds (optimization only)")
    for axis in (by_iter, by_time):
        axis.set_ylabel("mean reward")
        axis.grid(alpha=0.3)
        axis.legend()
    if title:
        figure.suptitle(title)
    _save(figure, path)
