"""``sdo optimize --conditions N`` / ``--prompts FILE``: many latent-optimization items, sharded over processes.

An *item* is one ``sdo optimize`` run (a batch of ``--batch`` latents optimized for one condition):

- embedded model, ``--conditions N``: item ``i`` steers class ``source`` towards class ``target`` with
  ``source = i mod 10`` and ``target = (source + 1 + (floor(i / 10) + seed) mod 9) mod 10`` (never the source), so
  the first 90 items cover every ordered pair of distinct digits once and ``--seed`` rotates the targets;
- pipeline, ``--prompts FILE``: item ``i`` is the ``i``-th prompt of the file (blank lines and lines starting
  with ``#`` skipped).

Item ``i``'s noise seed is ``SeedSequence([seed, i])``'s first 32-bit word: a function of the item alone, never of
the process that runs it or of the order, so a run on ``P`` processes gives each item the result a 1-process run
gives it (bit for bit at equal thread counts; within float round-off otherwise).

Process ``r`` of ``P`` (``accelerate launch``) runs the items ``i`` with ``i mod P == r``. Each finished item leaves
``OUT/items/<i>/``: ``samples.safetensors`` (before/after images in [0, 1]), ``image.png`` (before row over after
row), then what ``sdo.app.results.save_result`` writes for any optimization: ``latent.safetensors`` (the optimized
latent, with the settings that replay it and the item in its metadata; not for FreeDoM and DOODL),
``images/before-<i>.png`` and ``images/after-<i>.png`` at full resolution and, last, ``metrics.json`` - the item's
"done" marker. Every file is written atomically, so a killed run loses at most the
items in flight, and a rerun with the same ``--out`` skips every item whose ``metrics.json`` matches it and redoes
the rest. When all processes are done, the main process writes ``summary.md``, ``summary.json`` and ``grid.png``.

Threads: with ``P > 1`` processes each sets ``torch.set_num_threads(max(1, cores // P))`` (cores available to the
process, ``os.sched_getaffinity``), so ``P`` processes do not oversubscribe the machine; ``--threads`` overrides.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sdo import zoo
from sdo.app.report import machine_info, markdown_table
from sdo.app.results import replays, save_result
from sdo.app.tasks.latent import LatentTaskConfig, TaskResources, build_task, load_resources, run_task
from sdo.errors import ConfigError, CorruptFileError
from sdo.io import atomic_path, load_json, save_json, save_tensors

__all__ = ["Item", "item_seed", "items_of", "read_prompts", "run_items"]

# Config fields that change no item's result: a rerun may change them and still reuse finished items.
_FREE_FIELDS = ("out", "device", "conditions", "prompts", "threads", "compile", "prompt", "source", "target")


@dataclass(frozen=True)
class Item:
    """One item: its index, noise seed and condition (classes for the embedded model, a prompt for a pipeline)."""

    index: int
    seed: int
    source: int | None = None
    target: int | None = None
    prompt: str | None = None

    def config(self, run: LatentTaskConfig) -> LatentTaskConfig:
        """The ``sdo optimize`` config of this item within ``run``."""
        if self.prompt is not None:
            return dataclasses.replace(run, prompt=self.prompt, prompts="", seed=self.seed)
        return dataclasses.replace(run, source=self.source, target=self.target, seed=self.seed, conditions=0)

    @property
    def label(self) -> str:
        return f"{self.prompt!r}" if self.prompt is not None else f"{self.source}->{self.target}"


def item_seed(seed: int, index: int) -> int:
    """The noise seed of item ``index`` in a run seeded ``seed``: a 32-bit word of ``SeedSequence([seed, index])``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a prompts file: one per line; blank lines and lines starting with ``#`` are skipped."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--prompts {path}: no such file.")
    prompts = [line.strip() for line in path.read_text().splitlines()]
    prompts = [line for line in prompts if line and not line.startswith("#")]
    if not prompts:
        raise ConfigError(f"--prompts {path}: no prompts (one per line; '#' starts a comment).")
    return prompts


def items_of(config: LatentTaskConfig) -> list[Item]:
    """Every item of the run ``config`` describes, in index order (see the module docstring for the mapping)."""
    if config.prompts:
        return [Item(i, item_seed(config.seed, i), prompt=p) for i, p in enumerate(read_prompts(config.prompts))]
    if config.conditions < 1:
        raise ConfigError("A run of many items needs --conditions N (N >= 1) or --pipeline with --prompts FILE.")
    items = []
    for i in range(config.conditions):
        source = i % zoo.NUM_CLASSES
        target = (source + 1 + (i // zoo.NUM_CLASSES + config.seed) % (zoo.NUM_CLASSES - 1)) % zoo.NUM_CLASSES
        items.append(Item(i, item_seed(config.seed, i), source=source, target=target))
    return items


def _spec(config: LatentTaskConfig) -> dict:
    """The part of the config every item's result depends on (besides the item itself)."""
    return {key: value for key, value in dataclasses.asdict(config).items() if key not in _FREE_FIELDS}


def _item_dir(out: Path, item: Item) -> Path:
    return out / "items" / str(item.index)


def _finished(out: Path, item: Item, spec: dict) -> dict | None:
    """The item's metrics if it finished, else None (unfinished, corrupt, or another prompt at that index).

    Raises:
        ConfigError: the item finished under other settings (method, steps, lr, ...): resuming would mix runs.
    """
    path = _item_dir(out, item) / "metrics.json"
    if not path.is_file():
        return None
    try:
        metrics = load_json(path)
    except CorruptFileError:
        return None
    if metrics.get("spec") != spec:
        raise ConfigError(
            f"{out} holds results of other settings (item {item.index}: {_difference(metrics.get('spec'), spec)}); "
            "rerun with the same settings to resume, or choose another --out."
        )
    return metrics if metrics.get("item") == dataclasses.asdict(item) else None  # another prompt: redo it


def _difference(old: dict | None, new: dict) -> str:
    old = old or {}
    changed = [f"{key}={old.get(key)!r}, now {value!r}" for key, value in new.items() if old.get(key) != value]
    return "; ".join(changed) or "unreadable settings"


@contextmanager
def _threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _thread_count(config: LatentTaskConfig, processes: int) -> int:
    if config.threads:
        return config.threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return torch.get_num_threads() if processes == 1 else max(1, cores // processes)


def _process_state(device: str):
    """Accelerate's view of the launch (index and count of processes); one process without a launcher."""
    from accelerate import PartialState

    # The final barrier waits for the slowest shard, which may take hours: a day before a process gives up on it.
    return PartialState(cpu=torch.device(device).type == "cpu", timeout=timedelta(hours=24))


def run_items(config: LatentTaskConfig, progress: bool = True) -> dict | None:
    """Optimize every item of ``config`` (``--conditions`` or ``--prompts``) on this process's shard.

    Returns the summary (on the main process; None on the others). Reruns skip finished items; the summary's
    ``skipped_as_finished`` counts the items already finished when the run started.
    """
    items = items_of(config)
    state = _process_state(config.device)
    rank, processes = state.process_index, state.num_processes
    if processes > 1 and torch.device(config.device).type == "cuda":
        config = dataclasses.replace(config, device=str(state.device))  # one GPU per process
    out, spec = Path(config.out), _spec(config)
    mine = [item for item in items if item.index % processes == rank]
    with _threads(_thread_count(config, processes)):
        todo = [item for item in mine if _finished(out, item, spec) is None]
        finished_before = sum(_finished(out, item, spec) is not None for item in items) if state.is_main_process else 0
        bar = tqdm(
            total=len(items),
            initial=_count_done(out, items),
            desc="items done",
            disable=not (progress and state.is_main_process),
        )
        resources = load_resources(config) if todo else None
        for item in todo:
            metrics = _run_item(config, item, spec, out, resources, progress and state.is_main_process)
            bar.n = _count_done(out, items)  # every process's finished items
            bar.set_postfix(item=metrics["item"]["index"], reward=f"{metrics['reward_best']:.3f}")
            bar.refresh()
        bar.close()
        state.wait_for_everyone()
    if not state.is_main_process:
        return None
    return write_summary(config, items, spec, skipped=finished_before, processes=processes)


def _count_done(out: Path, items: list[Item]) -> int:
    """Items with a done marker (a file check only: cheap enough to run after every item)."""
    return sum((_item_dir(out, item) / "metrics.json").is_file() for item in items)


def _run_item(
    config: LatentTaskConfig, item: Item, spec: dict, out: Path, resources: TaskResources, progress: bool
) -> dict:
    """Optimize one item and write its files; ``metrics.json`` last."""
    item_config = item.config(config)
    started = time.perf_counter()
    task = build_task(item_config, resources)
    result = run_task(item_config, task, progress=progress)
    with torch.no_grad():
        before, after, best = (task.decode(x0) for x0 in (task.original, result.sample, result.best_sample))
    folder = _item_dir(out, item)
    metadata = {f"item_{key}": value for key, value in dataclasses.asdict(item).items() if value is not None}
    samples = {"before": before, "after": after, "best": best}
    if replays(config.method):  # FreeDoM's and DOODL's latents do not replay (sdo.app.results)
        samples["best_latent"] = result.best_latent
    save_tensors(
        samples, folder / "samples.safetensors", metadata={key: str(value) for key, value in metadata.items()}
    )
    _save_rows([before, after], folder / "image.png")
    history = result.history
    metrics = {
        "item": dataclasses.asdict(item),
        "spec": spec,
        "description": task.description,
        "method": config.method,
        "reward_initial": history[0]["reward"],
        "reward_final": history[-1]["reward"],
        "reward_best": float(result.best_reward.mean()),
        "judge_success_initial": history[0].get("judge_success"),
        "judge_success_final": history[-1].get("judge_success"),
        "s_per_iter": statistics.median(r["seconds"] for r in history[:-1]) if len(history) > 1 else 0.0,
        "seconds": time.perf_counter() - started,
        "history": history,
    }
    return save_result(folder, config.method, task, result, metrics, metadata)  # metrics.json, the done marker, last


def _save_rows(rows: list[torch.Tensor], path: Path) -> None:
    """Images ``[N, C, H, W]`` in [0, 1], one row per tensor, as one PNG (atomically; no figure, no labels)."""
    import matplotlib.image

    pixels = torch.cat([torch.cat(list(row.detach().float().cpu().clamp(0, 1)), dim=-1) for row in rows], dim=-2)
    pixels = pixels.permute(1, 2, 0)
    if pixels.shape[-1] == 1:
        pixels = pixels.expand(*pixels.shape[:2], 3)
    with atomic_path(path) as tmp:
        matplotlib.image.imsave(tmp, pixels.contiguous().numpy(), format="png")


def write_summary(
    config: LatentTaskConfig, items: list[Item], spec: dict, skipped: int = 0, processes: int = 1
) -> dict:
    """Read every finished item and write ``summary.json``, ``summary.md`` and ``grid.png`` under ``config.out``.

    The table has one row per method: ``before`` (the no-grad samples of the initial latents) and the optimized
    method, each with the mean and median over items of the batch-mean reward (and judge success where the
    task has a judge; no judge column otherwise).
    """
    from sdo.app.plots import save_image_grid
    from sdo.io import load_tensors

    out = Path(config.out)
    finished = [(item, _finished(out, item, spec)) for item in items]
    done = [(item, metrics) for item, metrics in finished if metrics is not None]
    missing = [item.index for item, metrics in finished if metrics is None]
    per_method = {
        "before": _stats([m["reward_initial"] for _, m in done], [m["judge_success_initial"] for _, m in done]),
        config.method: _stats([m["reward_final"] for _, m in done], [m["judge_success_final"] for _, m in done]),
        f"{config.method} (best iterate)": _stats([m["reward_best"] for _, m in done], []),
    }
    summary = {
        "config": config.recorded(),
        "items": len(items),
        "finished": len(done),
        "missing": missing,
        "skipped_as_finished": skipped,
        "processes": processes,
        "machine": machine_info(torch.device(config.device)),
        "methods": per_method,
        "per_item": [
            {
                "index": item.index,
                "condition": item.label,
                "reward_initial": m["reward_initial"],
                "reward_final": m["reward_final"],
                "judge_success_final": m["judge_success_final"],
                "seconds": m["seconds"],
            }
            for item, m in done
        ],
    }
    save_json(summary, out / "summary.json")
    headers = ("method", "items", "mean reward", "median reward", "mean judge success")
    rows = [
        [name, s["items"], _fmt(s["reward_mean"]), _fmt(s["reward_median"]), _fmt(s["judge_success_mean"])]
        for name, s in per_method.items()
    ]
    if all(s["judge_success_mean"] is None for s in per_method.values()):  # no judge (a pipeline): no empty column
        headers, rows = headers[:-1], [row[:-1] for row in rows]
    item_rows = [
        [r["index"], r["condition"], _fmt(r["reward_initial"]), _fmt(r["reward_final"]), _fmt(r["seconds"], 1)]
        for r in summary["per_item"]
    ]
    text = (
        f"{len(done)} of {len(items)} items finished ({processes} processes)\n\n"
        + markdown_table(headers, rows)
        + "\n\n"
        + markdown_table(("item", "condition", "reward before", "reward after", "seconds"), item_rows)
        + "\n"
    )
    with atomic_path(out / "summary.md") as tmp:
        tmp.write_text(text)
    if done:
        shown = done[:16]
        samples = [load_tensors(_item_dir(out, item) / "samples.safetensors") for item, _ in shown]
        captions = [item.label if item.prompt is None else str(item.index) for item, _ in shown]
        save_image_grid(
            {
                "before": torch.stack([s["before"][0] for s in samples]),
                "after": torch.stack([s["after"][0] for s in samples]),
            },
            out / "grid.png",
            captions={"before": captions},
        )
    summary["table"] = text
    return summary


def _stats(rewards: list[float], judged: list[float | None]) -> dict:
    judged = [value for value in judged if value is not None]
    return {
        "items": len(rewards),
        "reward_mean": statistics.fmean(rewards) if rewards else None,
        "reward_median": statistics.median(rewards) if rewards else None,
        "judge_success_mean": statistics.fmean(judged) if judged else None,
    }


def _fmt(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"
