"""Pictures: reward curves, written atomically as PNG (matplotlib, no display needed); image grids are
``sdo.app.images.save_grid``'s."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from sdo.app.images import save_grid
from sdo.io import atomic_path

__all__ = ["save_bench_plot", "save_curves", "save_finetune_curves", "save_image_grid"]


def _save(figure, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)


def save_image_grid(rows: dict[str, torch.Tensor], path: str | Path, captions: dict[str, list[str]] | None = None):
    """One labelled row per entry of ``rows`` (``[N, 1 or 3, H, W]`` images in [0, 1]); optional captions: the grid
    ``sdo.app.images.save_grid`` writes (kept under this name for scripts that call it)."""
    return save_grid(rows, path, captions=captions)


def save_curves(histories: dict[str, list[dict]], path: str | Path, title: str = "") -> None:
    """Mean reward against iteration and against wall-clock seconds, one line per method, its best-so-far (the
    records' ``best_so_far``, where they have it) dashed in the same colour; with a weighted reward, a third panel
    shows each term (``reward_NAME``, unweighted) against iteration."""
    terms = sorted({key for history in histories.values() for r in history for key in r if key.startswith("reward_")})
    figure, axes = plt.subplots(1, 3 if terms else 2, figsize=(15 if terms else 10, 3.6))
    by_iter, by_time = axes[0], axes[1]
    for name, history in histories.items():
        rewards = [record["reward"] for record in history]
        for axis, x in ((by_iter, "iter"), (by_time, "elapsed")):
            (line,) = axis.plot([record[x] for record in history], rewards, marker=".", label=name)
            if all("best_so_far" in record for record in history):
                best = [record["best_so_far"] for record in history]
                axis.plot([r[x] for r in history], best, linestyle="--", color=line.get_color(), label=f"{name} best")
        for term in terms:
            points = [(r["iter"], r[term]) for r in history if term in r]
            axes[2].plot(*zip(*points, strict=True), marker=".", label=f"{name}: {term[len('reward_') :]}")
    by_iter.set_xlabel("iteration")
    by_time.set_xlabel("seconds (optimization only)")
    for axis in (by_iter, by_time):
        axis.set_ylabel("mean reward")
    if terms:
        axes[2].set(xlabel="iteration", ylabel="mean reward term (unweighted)", title="reward terms")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend()
    if title:
        figure.suptitle(title)
    _save(figure, path)


def save_bench_plot(result: dict, path: str | Path) -> None:
    """Benchmark picture: each iterate's reward vs the training time through its update (most steps), seconds per
    iteration vs steps, cosine per kept step."""
    rows = result["rows"]
    most = max(row["steps"] for row in rows)
    panels = 3 if result.get("cosine_sweep") else 2
    figure, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.8))
    for row in (r for r in rows if r["steps"] == most):
        axes[0].plot(
            [seconds for seconds, _ in row["iterates"]],
            [reward for _, reward in row["iterates"]],
            marker=".",
            label=row["method"],
        )
    axes[0].set(xlabel="seconds", ylabel="mean reward", title=f"reward vs wall-clock ({most} steps)")
    for method in dict.fromkeys(row["method"] for row in rows):
        mine = sorted((r["steps"], r["s_per_iter"]) for r in rows if r["method"] == method)
        axes[1].plot(*zip(*mine, strict=True), marker="o", label=method)
    axes[1].set(xlabel="steps", ylabel="seconds / iteration (median)", title="cost vs number of steps")
    if panels == 3:
        for steps in sorted({point["steps"] for point in result["cosine_sweep"]}):
            points = [p for p in result["cosine_sweep"] if p["steps"] == steps]
            axes[2].plot(
                [p["kept_step"] for p in points],
                [p["grad_cosine"] for p in points],
                marker="o",
                label=f"{steps} steps",
            )
        axes[2].set(xlabel="kept step", ylabel="cosine with Full's gradient", title="shortcut gradient fidelity")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    _save(figure, path)


def save_finetune_curves(
    records: list[dict], path: str | Path, title: str = "", evaluation: tuple[str, ...] = ()
) -> list[str]:
    """Reward per update, and one panel per other measure: the ``evaluation`` measures (judge accuracy, Frechet
    distance, evaluation reward, ...) where evaluated, titled "held-out" only when they were measured on held-out
    conditions (not on the training prompts, ``eval_on_training_prompts``), and the training-batch values (reward
    terms, KL penalty) titled as such. Returns the titles of the measure panels."""
    skip = {"step", "reward", "seconds", "eval_on_training_prompts"}
    measures = sorted({key for r in records for key in r} - skip)
    on_training = any(r.get("eval_on_training_prompts") for r in records)
    figure, axes = plt.subplots(1, 1 + len(measures), figsize=(5 * (1 + len(measures)), 3.6), squeeze=False)
    axes[0][0].plot([r["step"] for r in records], [r["reward"] for r in records], marker=".")
    axes[0][0].set(xlabel="update", ylabel="mean reward (training batch)", title=title)
    for axis, key in zip(axes[0][1:], measures, strict=True):
        measured = [r for r in records if key in r]
        label = key.replace("_", " ")
        if key not in evaluation:
            heading = f"training batch: {label}"
        else:
            heading = f"evaluation on the training prompts: {label}" if on_training else f"held-out {label}"
        axis.plot([r["step"] for r in measured], [r[key] for r in measured], marker="o", color="tab:green")
        axis.set(xlabel="update", ylabel=label, title=heading)
    for axis in axes[0]:
        axis.grid(alpha=0.3)
    _save(figure, path)
    return [axis.get_title() for axis in axes[0][1:]]
