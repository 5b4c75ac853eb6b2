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
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import subprocess
from collections.abc import Callable, Sequence
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
