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

Process ``r`` of ``P`` (``accelerate launch``) runs the items ``i`` with ``i mod P == r``, each through
``sdo.app.optimization.optimize_and_write`` as a single run goes. Each finished item leaves ``OUT/items/<i>/``:
``samples.safetensors`` (before/after images in [0, 1]), ``image.png`` (before row over after row), then what
``sdo.app.results.save_result`` writes for any optimization: ``latent.safetensors`` (the optimized latent, with the
settings that replay it and the item in its metadata; not for FreeDoM and DOODL), ``images/before-<i>.png`` and
``images/after-<i>.png`` at full resolution and, last, ``metrics.json`` - the item's "done" marker, which records
each file's size and SHA-256. Every file is written atomically, so a killed run loses at most the items in flight. A
rerun with the same ``--out`` checks each item once: it skips an item whose marker matches it and whose files are
all there with their recorded sizes (and whole safetensors headers; ``--verify`` also compares the hashes), and
redoes the rest; settings that differ from the finished items', or inputs whose content changed since (the pipeline,
CLIP and PickScore folders, aesthetic head, style image: each item's marker records their fingerprints,
``sdo.app.fingerprints``), are refused before anything is written. When all processes are done, the main process
writes ``summary.md``, ``summary.json`` and ``grid.png``. Under ``accelerate launch``, a process whose launcher has
died stops before its next item.

Threads: with ``P > 1`` processes each sets ``torch.set_num_threads(max(1, cores // P))`` (cores available to the
process, ``os.sched_getaffinity``), so ``P`` processes do not oversubscribe the machine; ``--threads`` overrides.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sdo import zoo
from sdo.app.fingerprints import fingerprint_inputs, input_changes
from sdo.app.optimization import optimize_and_write
from sdo.app.prompts import read_prompts
from sdo.app.report import machine_info, markdown_table
from sdo.app.runs import (
    check_owned,
    check_run,
    clean_temporary_files,
    damaged_file,
    describe_run,
    read_marker,
    write_marker,
)
from sdo.app.tasks.latent import LatentTaskConfig, TaskResources, load_resources
from sdo.errors import ConfigError, CorruptFileError, ResumeMismatchError, SdoError
from sdo.io import atomic_path, load_json, make_dir, save_json

__all__ = ["Item", "item_seed", "items_of", "process_state", "run_items", "torch_threads"]

# Config fields that change no item's result: a rerun may change them and still reuse finished items.
_FREE_FIELDS = (
    "out",
    "device",
    "conditions",
    "prompts",
    "threads",
    "compile",
    "checkpoint_kept",
    "checkpoint_decoder",
    "prompt",
    "source",
    "target",
    "max_pixels",
)


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


def item_at(config: LatentTaskConfig, index: int, prompts: list[str] | None = None) -> Item:
    """Item ``index`` of the run ``config`` describes (``prompts``: the ``--prompts`` file's lines, read once by
    the caller); only this item's seed is computed."""
    seed = item_seed(config.seed, index)
    if prompts is not None:
        return Item(index, seed, prompt=prompts[index])
    source = index % zoo.NUM_CLASSES
    target = (source + 1 + (index // zoo.NUM_CLASSES + config.seed) % (zoo.NUM_CLASSES - 1)) % zoo.NUM_CLASSES
    return Item(index, seed, source=source, target=target)


def _item_count(config: LatentTaskConfig, prompts: list[str] | None) -> int:
    if prompts is not None:
        return len(prompts)
    if config.conditions < 1:
        raise ConfigError("A run of many items needs --conditions N (N >= 1) or --pipeline with --prompts FILE.")
    return config.conditions


def items_of(config: LatentTaskConfig) -> list[Item]:
    """Every item of the run ``config`` describes, in index order (see the module docstring for the mapping)."""
    prompts = read_prompts(config.prompts) if config.prompts else None
    return [item_at(config, index, prompts) for index in range(_item_count(config, prompts))]


def _spec(config: LatentTaskConfig, verify: bool = False) -> dict:
    """What every item's result depends on (besides the item itself): the config's fields but the free ones, and
    under ``inputs`` the fingerprints of the files and folders a pipeline run reads (the pipeline, the reward's
    models and images; ``sdo.app.fingerprints``), taken once per run: unchanged files take their hashes from the
    newest finished item's record unless ``verify``."""
    spec = {key: value for key, value in dataclasses.asdict(config).items() if key not in _FREE_FIELDS}
    paths = {"pipeline": config.pipeline, **config.reward_inputs()} if config.pipeline else {}
    spec[_INPUTS] = fingerprint_inputs(paths, _newest_inputs(Path(config.out)), verify) if paths else {}
    return spec


_INPUTS = "inputs"
_DEFAULTS = {
    item.name: item.default for item in dataclasses.fields(LatentTaskConfig) if item.default is not dataclasses.MISSING
}
"""Every ``LatentTaskConfig`` field's default (its flag's), for items recorded before a field existed."""


def _newest_inputs(out: Path) -> dict:
    """The input fingerprints recorded by the newest finished item of ``out`` (empty when there is none)."""
    markers = []
    for marker in (out / "items").glob("*/metrics.json"):
        try:
            markers.append((marker.stat().st_mtime_ns, marker))
        except OSError:
            continue
    if not markers:
        return {}
    newest = _marker(max(markers)[1].parent) or {}
    inputs = newest.get("spec", {}).get(_INPUTS) if isinstance(newest.get("spec"), dict) else None
    return inputs if isinstance(inputs, dict) else {}


def _spec_problem(out: Path, index: int, recorded: object, spec: dict) -> SdoError | None:
    """Why a finished item of ``recorded`` settings may not be reused under ``spec``, or None: other settings
    (a ``ConfigError`` naming them) or other inputs by content (a ``ResumeMismatchError`` naming the input; a
    copy with new modification times is the same input). Items recorded before inputs were fingerprinted are
    compared on their settings alone. A setting an item lacks (recorded before its flag existed, e.g.
    ``lr_schedule``) counts as the flag's default."""
    recorded = recorded if isinstance(recorded, dict) else {}
    settings = {key: value for key, value in recorded.items() if key != _INPUTS}
    if settings:
        settings = {**{key: value for key, value in _DEFAULTS.items() if key in spec}, **settings}
    if not recorded or settings != {key: value for key, value in spec.items() if key != _INPUTS}:
        return ConfigError(
            f"{out} holds results of other settings (item {index}: {_difference(settings, spec)}); "
            "rerun with the same settings to resume, or choose another --out."
        )
    changes = input_changes(recorded[_INPUTS], spec[_INPUTS]) if isinstance(recorded.get(_INPUTS), dict) else []
    if changes:
        more = f" (and {len(changes) - 1} more inputs)" if len(changes) > 1 else ""
        return ResumeMismatchError(
            f"{out} holds results of other inputs (item {index}): {changes[0]}{more}; rerun with the same inputs "
            "to resume, or choose another --out."
        )
    return None


def _item_dir(out: Path, item: Item) -> Path:
    return out / "items" / str(item.index)


def _marker(folder: Path) -> dict | None:
    """An item folder's done marker (``metrics.json``) if it is there and a JSON object, else None."""
    try:
        metrics = load_json(folder / "metrics.json")
    except CorruptFileError:
        return None
    return metrics if isinstance(metrics, dict) else None


def _finished(out: Path, item: Item, spec: dict, verify: bool = False) -> dict | None:
    """The item's metrics if it finished and its files are whole, else None (unfinished, a damaged marker or
    file, or another prompt at that index). Removes temporary files a killed run left in the item's folder.

    Raises:
        ConfigError: the item finished under other settings (method, steps, lr, ...) or inputs (a changed style
            image, pipeline or CLIP folder: ``ResumeMismatchError``): resuming would mix runs.
    """
    folder = _item_dir(out, item)
    clean_temporary_files(folder)
    metrics = _marker(folder)
    if metrics is None:
        return None
    problem = _spec_problem(out, item.index, metrics.get("spec"), spec)
    if problem is not None:
        raise problem
    if metrics.get("item") != dataclasses.asdict(item):
        return None  # another prompt at this index: redo it
    problem = damaged_file(folder, metrics.get("files"), verify)
    if problem:
        print(f"sdo: item {item.index} is redone: {problem}.", file=sys.stderr)
        return None
    return metrics


def _difference(old: dict | None, new: dict) -> str:
    old = old or {}
    settings = {key: value for key, value in new.items() if key != _INPUTS}
    changed = [f"{key}={old.get(key)!r}, now {value!r}" for key, value in settings.items() if old.get(key) != value]
    return "; ".join(changed) or "unreadable settings"


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's threads set to ``count`` for the block, restored afterwards (``--threads``: a run of many items per
    item, every other command for its run)."""
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


def process_state(device: str):
    """Accelerate's view of the launch (index and count of processes); one process without a launcher. The first
    call joins ``accelerate launch``'s process group; launcher variables without a launcher (``WORLD_SIZE=2``
    alone) are a ``ConfigError``."""
    from accelerate import PartialState

    try:  # The final barrier waits for the slowest shard, which may take hours: a day before a process gives up.
        return PartialState(cpu=torch.device(device).type == "cpu", timeout=timedelta(hours=24))
    except (ValueError, RuntimeError) as error:
        launch = ", ".join(f"{name}={os.environ[name]}" for name in _LAUNCH_VARIABLES if name in os.environ)
        raise ConfigError(
            f"could not join the process group that the environment describes ({launch}): {error}. Start several "
            "processes with `accelerate launch`, or unset these variables."
        ) from None


_LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def run_items(
    config: LatentTaskConfig,
    progress: bool = True,
    *,
    verify: bool = False,
    on_start: Callable[[], None] | None = None,
) -> dict | None:
    """Optimize every item of ``config`` (``--conditions`` or ``--prompts``) on this process's shard.

    ``out`` must be new, empty or sdo's, and a folder holding another kind of run (a single optimization, an edit)
    is refused first (``sdo.app.runs.check_owned``, ``check_run``); the main process marks it as this run's. Each
    process then checks the items of its shard once (``verify``: also each file's SHA-256) and the processes agree
    on the outcome: settings that differ from the finished items' are refused on every process before anything is
    written. Then the main process calls ``on_start`` (the CLI records ``config.json`` there) and the items left
    are run. Returns the summary (on the main process; None on the others), written after every process is done;
    its ``skipped_as_finished`` counts the items already finished when the run started.
    """
    state = process_state(config.device)
    rank, processes = state.process_index, state.num_processes
    if processes > 1 and torch.device(config.device).type == "cuda":
        config = dataclasses.replace(config, device=str(state.device))  # one GPU per process
    out, spec = Path(config.out), _spec(config, verify)
    run = describe_run("optimize", dataclasses.asdict(config))
    check_owned(out)
    check_run(out, run)  # not into a single run's folder, nor another command's
    prompts = read_prompts(config.prompts) if config.prompts else None
    count = _item_count(config, prompts)
    launcher = os.getppid()
    main = state.is_main_process
    with torch_threads(_thread_count(config, processes)):
        todo, done, problem = _check_shard(out, config, spec, prompts, range(rank, count, processes), verify)
        finished_before = _agree_on_shards(done, problem)
        if main and read_marker(out) is None:
            make_dir(out)
            write_marker(out, run)
        if main and on_start is not None:
            on_start()
        shard = " (the main process's shard)" if processes > 1 else ""
        bar = tqdm(total=count, initial=finished_before, desc=f"items done{shard}", disable=not (progress and main))
        resources = load_resources(config) if todo else None
        for index in todo:
            if processes > 1 and os.getppid() != launcher:
                raise SdoError("the launcher of this run has ended; stopping (rerun the command to resume).")
            metrics = _run_item(config, item_at(config, index, prompts), spec, out, resources, progress and main)
            bar.update(1)
            bar.set_postfix(item=index, reward=f"{metrics['reward_best']:.3f}")
        bar.close()
        state.wait_for_everyone()
    if not main:
        return None
    return write_summary(config, spec, count, prompts, skipped=finished_before, processes=processes)


def _check_shard(
    out: Path, config: LatentTaskConfig, spec: dict, prompts: list[str] | None, indices: range, verify: bool
) -> tuple[list[int], int, str | None]:
    """Check each item of the shard ``indices`` once: the indices left to run, the count finished, and the
    refusal (other settings) if any. An item without a folder is not looked at further (its seed is not drawn)."""
    items = out / "items"
    existing = {int(name) for name in os.listdir(items) if name.isdigit()} if items.is_dir() else set()
    todo, done, unchecked = [], 0, 0
    for index in indices:
        if index not in existing:
            todo.append(index)
            continue
        try:
            finished = _finished(out, item_at(config, index, prompts), spec, verify)
        except ConfigError as error:
            return todo, done, str(error)
        if finished is None:
            todo.append(index)
        else:
            done += 1
            unchecked += _INPUTS not in finished["spec"]
    if unchecked and spec[_INPUTS]:
        print(
            f"sdo: {unchecked} finished items of {out} were recorded before sdo fingerprinted its inputs; they are "
            "reused without checking that the pipeline, reward models and images are the same.",
            file=sys.stderr,
        )
    return todo, done, None


def _agree_on_shards(done: int, problem: str | None) -> int:
    """All processes' finished counts summed, and a refusal on any shard raised on every process (so no process
    writes when one refuses). One process: ``done``, or the refusal."""
    import torch.distributed as dist

    results = [(done, problem)]
    if dist.is_available() and dist.is_initialized():
        results = [None] * dist.get_world_size()
        dist.all_gather_object(results, (done, problem))
    refusals = [refusal for _, refusal in results if refusal]
    if refusals:
        raise ConfigError(refusals[0])
    return sum(count for count, _ in results)


def _run_item(
    config: LatentTaskConfig, item: Item, spec: dict, out: Path, resources: TaskResources, progress: bool
) -> dict:
    """Optimize one item and write its files (``sdo.app.optimization.optimize_and_write``); ``metrics.json``
    last."""
    return optimize_and_write(
        item.config(config),
        _item_dir(out, item),
        resources=resources,
        progress=progress,
        item=dataclasses.asdict(item),
        spec=spec,
    )


def write_summary(
    config: LatentTaskConfig,
    spec: dict,
    count: int,
    prompts: list[str] | None = None,
    skipped: int = 0,
    processes: int = 1,
) -> dict:
    """Read every finished item's marker and write ``summary.json``, ``summary.md`` and ``grid.png`` under
    ``config.out``, all after the reading (the items' files were checked when the run started).

    The table has one row per method: ``before`` (the no-grad samples of the initial latents) and the optimized
    method, each with the mean and median over items of the batch-mean reward (and judge success where the
    task has a judge; no judge column otherwise).
    """
    from sdo.app.images import save_grid
    from sdo.io import load_tensors

    out = Path(config.out)
    done, missing = [], []
    for index in range(count):
        item = item_at(config, index, prompts)
        metrics = _marker(_item_dir(out, item))
        whole = (
            metrics is not None
            and _spec_problem(out, index, metrics.get("spec"), spec) is None
            and metrics.get("item") == dataclasses.asdict(item)
        )
        (done.append((item, metrics)) if whole else missing.append(index))
    shown = done[:16]
    samples = [load_tensors(_item_dir(out, item) / "samples.safetensors") for item, _ in shown]
    per_method = {
        "before": _stats([m["reward_initial"] for _, m in done], [m["judge_success_initial"] for _, m in done]),
        config.method: _stats([m["reward_final"] for _, m in done], [m["judge_success_final"] for _, m in done]),
        f"{config.method} (best iterate)": _stats([m["reward_best"] for _, m in done], []),
    }
    summary = {
        "config": config.recorded(),
        "items": count,
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
        f"{len(done)} of {count} items finished ({processes} processes)\n\n"
        + markdown_table(headers, rows)
        + "\n\n"
        + markdown_table(("item", "condition", "reward before", "reward after", "seconds"), item_rows)
        + "\n"
    )
    with atomic_path(out / "summary.md") as tmp:
        tmp.write_text(text)
    if done:
        captions = [item.label if item.prompt is None else str(item.index) for item, _ in shown]
        save_grid(
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
