"""The one engine for comparing methods on the same work: ``sdo bench`` and every script in ``benchmarks/``.

- **Interleaving** (``interleave``): the runs take turns iteration by iteration in one process, so that machine
  drift hits them alike; a run of fewer rounds sits out the rounds it does not take.
- **Time crediting** (``credited_iterates``, ``reward_at``): iterate k (the variable after k updates; iterate 0 is
  the start) is credited at t_k, the training time through update k (t_0 = 0). Its reward is the one the next
  iteration's forward pass measured (that pass samples iterate k); the final iterate's comes from one untimed
  evaluation. Evaluation is never timed.
- **Stored results** (``stored_record``, ``save_result``): one JSON record per result, written last (its presence
  means the result is complete), so that a comparison may span sessions: a rerun skips what is stored and refuses
  a record made with other settings.
- **Untimed work in parallel** (``in_workers``): work whose result does not depend on the clock (runs at a stored,
  calibrated iteration count) may share the machine, a few spawned processes at a time; timing never does.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import multiprocessing
import os
import subprocess
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from functools import cache
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from sdo.app.report import machine_info
from sdo.errors import ResumeMismatchError
from sdo.io import load_json, save_json, save_tensors

__all__ = [
    "Contender",
    "add_settings_flags",
    "credited_iterates",
    "in_workers",
    "interleave",
    "require_idle",
    "reward_at",
    "save_result",
    "settings_from",
    "source_commit",
    "stored_record",
    "this_machine",
]


class Contender(Protocol):
    """One run of a comparison: ``rounds`` iterations, one per ``iterate()``."""

    name: str
    rounds: int

    def iterate(self) -> object:
        """One iteration (timed by the run itself)."""


def interleave(
    runs: Sequence[Contender],
    description: str,
    progress: bool = True,
    postfix: Callable[[Contender], dict] | None = None,
) -> None:
    """Round by round, every run of ``runs`` that still has rounds takes one iteration, in order; a progress bar
    (``description``; ``postfix(run)``, default the run's name, after each iteration) unless ``progress`` is
    False."""
    postfix = postfix or (lambda run: {"run": run.name})
    with tqdm(total=sum(run.rounds for run in runs), desc=description, disable=not progress) as bar:
        for round_index in range(max((run.rounds for run in runs), default=0)):
            for run in runs:
                if round_index < run.rounds:
                    run.iterate()
                    bar.set_postfix(postfix(run))
                    bar.update()


def credited_iterates(seconds: Sequence[float], rewards: Sequence[float]) -> list[tuple[float, float]]:
    """``(t_k, reward_k)`` for iterates 0 to n of a run of n updates taking ``seconds`` ``[n]``: ``t_k`` is the sum
    of the first k (``t_0 = 0``) and ``rewards`` ``[n + 1]`` holds each iterate's reward (module docstring)."""
    return list(zip(itertools.accumulate(seconds, initial=0.0), rewards, strict=True))


def reward_at(iterates: Sequence[tuple[float, float]], budget: float) -> float | None:
    """The reward of the last iterate whose time ``t_k`` is within ``budget`` seconds (None if none is)."""
    within = [reward for seconds, reward in iterates if seconds <= budget * (1 + 1e-9)]
    return within[-1] if within else None


def stored_record(path: Path, expected: dict) -> dict | None:
    """The record stored at ``path``, or None when there is none yet. Values are compared as JSON stores them (a
    tuple of ``expected`` equals the stored list).

    Raises:
        ResumeMismatchError: the record differs from ``expected`` at one of its keys (made with other settings).
    """
    if not path.exists():
        return None
    stored = load_json(path)
    for key, value in json.loads(json.dumps(expected)).items():
        if stored.get(key) != value:
            raise ResumeMismatchError(
                f"{path} was made with {key}={stored.get(key)!r}, this run has {value!r}; use another output "
                "folder or remove the stale result."
            )
    return stored


def save_result(record: dict, path: Path, tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Store ``record`` at ``path`` (JSON) and ``tensors`` beside it (``.safetensors``), the record last: its
    presence means the result is complete."""
    if tensors is not None:
        save_tensors(tensors, path.with_suffix(".safetensors"))
    save_json(record, path)


def in_workers(task: Callable[[object], object], items: Sequence, jobs: int) -> list:
    """``[task(item) for item in items]``; with ``jobs`` > 1, on ``jobs`` spawned worker processes, each limited to
    ``torch.get_num_threads() // jobs`` threads (at least 1) so that together they use the cores one process would.
    Only for untimed work (the workers share the machine). ``task`` and the items must pickle (module-level
    functions, ``functools.partial``). Each finished item is printed; the first failure cancels the items not
    started and is raised once the running ones end."""
    if jobs <= 1 or len(items) <= 1:
        return [task(item) for item in items]
    threads = max(1, torch.get_num_threads() // jobs)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_limit_threads, initargs=(threads,)) as pool:
        futures = {pool.submit(task, item): item for item in items}
        try:
            for done, future in enumerate(as_completed(futures), 1):
                future.result()
                print(f"[{done}/{len(items)}] done: {futures[future]}", flush=True)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        return [future.result() for future in futures]


def _limit_threads(threads: int) -> None:
    torch.set_num_threads(threads)


@cache
def this_machine() -> dict:
    """The processor the CPU figures come from (``sdo.app.report.machine_info``), read once."""
    return machine_info(torch.device("cpu"))


@cache
def source_commit() -> str:
    """The git commit of the working directory's checkout (``"unknown"`` outside one)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def add_settings_flags(parser: argparse.ArgumentParser, settings_cls: type) -> None:
    """One integer ``--flag`` per field of the frozen dataclass ``settings_cls`` (a comparison's shared settings,
    which its scripts expose so that tests can run them small), defaulting to the field's default."""
    for item in dataclasses.fields(settings_cls):
        parser.add_argument(f"--{item.name.replace('_', '-')}", type=int, default=item.default)


def settings_from(args: argparse.Namespace, settings_cls: type):
    """The ``settings_cls`` of the flags ``add_settings_flags`` added."""
    return settings_cls(**{item.name: getattr(args, item.name) for item in dataclasses.fields(settings_cls)})


def require_idle(max_load: float) -> None:
    """Refuse (exit with one line) to start timed work above a 1-minute load average of ``max_load``
    (``--max-load``): a comparison's times are only comparable on an otherwise idle machine."""
    load = os.getloadavg()[0]
    if load > max_load:
        raise SystemExit(
            f"load average {load:.2f} > --max-load {max_load}: the runs are timed; stop other jobs first."
        )
