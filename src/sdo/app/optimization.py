"""One latent optimization, run and written: ``sdo optimize``'s single run and each item of a run of many
(``sdo.app.sharded``) both go through ``optimize_and_write``.

A single run's folder gets ``grid.png`` (labelled rows: ``input`` for an edit, ``before``, ``after METHOD``) and
``curves.png``; an item's folder gets ``samples.safetensors`` (the before, after and best images, and the best
latent where the method's latents replay) and ``image.png`` (before row over after row). Then both get what
``sdo.app.results.save_result`` writes, ``metrics.json`` last.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from sdo.app.images import save_grid
from sdo.app.results import replays, save_result
from sdo.app.tasks.latent import LatentTask, LatentTaskConfig, TaskResources, build_task, run_task
from sdo.io import save_tensors
from sdo.latent import OptimizationResult

__all__ = ["ITEM_FILES", "optimize_and_write"]

ITEM_FILES = ("samples.safetensors", "image.png")
"""An item's own files, besides what ``save_result`` writes."""


def optimize_and_write(
    config: LatentTaskConfig,
    folder: str | Path,
    *,
    resources: TaskResources | None = None,
    progress: bool = True,
    item: dict | None = None,
    spec: dict | None = None,
    on_task: Callable[[LatentTask], None] | None = None,
    before_writing: Callable[[], None] | None = None,
    task: LatentTask | None = None,
) -> dict:
    """Build ``config``'s task (from ``resources``; loaded when None), optimize it with ``config.method`` and write
    ``folder`` (module docstring). Returns the metrics written to ``metrics.json``.

    Args:
        item: the item's fields (``sdo.app.sharded.Item``) for an item of a run of many; None for a single run.
        spec: with ``item``, what its result depends on (``metrics.json`` records it, for resuming).
        on_task: called with the built task before the optimization (the CLI prints what it optimizes).
        before_writing: called after the optimization, before the first file is written (the CLI records
            ``config.json`` there, so a run that fails earlier leaves its folder as it was).
        task: ``config``'s task, already built (``--method auto`` planned on it); None builds it.
    """
    folder, started = Path(folder), time.perf_counter()
    task = build_task(config, resources) if task is None else task
    if on_task is not None:
        on_task(task)
    result = run_task(config, task, progress=progress)
    if before_writing is not None:
        before_writing()
    with torch.no_grad():
        run = _Optimized(config, task, result, task.decode(task.original), task.decode(result.sample))
    if item is None:
        metrics, files, metadata = _write_run_pictures(run, folder), (), {}
    else:
        metadata = {f"item_{key}": value for key, value in item.items() if value is not None}
        files = _write_item_samples(run, folder, metadata)
        metrics = {"item": item, "spec": spec, **_item_metrics(run, started)}
    return save_result(folder, config.method, task, result, (run.before, run.after), metrics, metadata, files=files)


@dataclass(frozen=True)
class _Optimized:
    """A finished optimization: its config, task and result, and the images of its first and last latents."""

    config: LatentTaskConfig
    task: LatentTask
    result: OptimizationResult
    before: torch.Tensor
    after: torch.Tensor


def _write_run_pictures(run: _Optimized, folder: Path) -> dict:
    """A single run's ``grid.png`` and ``curves.png``; returns its metrics: the settings (with the batch that ran:
    an edit's is its number of images), the summary and the history."""
    from sdo.app.demo import summarize
    from sdo.app.plots import save_curves

    method, history = run.config.method, run.result.history
    rows = {} if run.task.inputs is None else {"input": run.task.inputs}
    save_grid({**rows, "before": run.before, f"after {method}": run.after}, folder / "grid.png")
    save_curves({method: history}, folder / "curves.png", run.task.description)
    recorded = {**run.config.recorded(), "batch": int(run.before.shape[0])}
    return {"config": recorded, "summary": summarize(history), "history": history}


def _write_item_samples(run: _Optimized, folder: Path, metadata: dict) -> tuple[str, ...]:
    """An item's ``samples.safetensors`` and ``image.png``; returns their names (``ITEM_FILES``)."""
    with torch.no_grad():
        samples = {"before": run.before, "after": run.after, "best": run.task.decode(run.result.best_sample)}
    if replays(run.config.method):  # FreeDoM's and DOODL's latents do not replay (sdo.app.results)
        samples["best_latent"] = run.result.best_latent
    save_tensors(
        samples, folder / "samples.safetensors", metadata={key: str(value) for key, value in metadata.items()}
    )
    save_grid([run.before, run.after], folder / "image.png")
    return ITEM_FILES


def _item_metrics(run: _Optimized, started: float) -> dict:
    """An item's rewards (first, last and best iterate), judge success, seconds per iteration and in all."""
    history = run.result.history
    return {
        "description": run.task.description,
        "method": run.config.method,
        "reward_initial": history[0]["reward"],
        "reward_final": history[-1]["reward"],
        "reward_best": float(run.result.best_reward.mean()),
        "judge_success_initial": history[0].get("judge_success"),
        "judge_success_final": history[-1].get("judge_success"),
        "s_per_iter": statistics.median(r["seconds"] for r in history[:-1]) if len(history) > 1 else 0.0,
        "seconds": time.perf_counter() - started,
        "history": history,
    }
