"""The registry of BENCHMARKS.md's generated blocks, and what their generators share.

A block generator is a function of the results folder (``benchmarks/results/cpu`` by default) that returns the
block's markdown from the files stored there, and raises ``FileNotFoundError`` when one is missing (the
``equal-time*`` and ``finetune-comparison*`` blocks, whose runs span sessions, say "No results yet" instead). It is
registered by name with ``@block("NAME")`` in the module of its subject (``sdo.app.report.latent``,
``.estimators``, ``.finetune``, ``.finetune_comparison``, ``.comparison``, ``.equal_time``, ``.chains``,
``.scale``); ``sdo.app.report.document`` fills the markers from them.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from pathlib import Path

__all__ = ["BLOCKS", "GIB", "MEMORY", "block", "fill", "load", "load_records"]

MEMORY = "extra memory (CPU: saved activations)"
GIB = 2**30

Generator = Callable[[Path], str]
BLOCKS: dict[str, Generator] = {}
"""Every block generator by name, by subject (in the order ``sdo.app.report.document`` imports the subjects)."""


def block(name: str) -> Callable[[Generator], Generator]:
    """Register ``function(results_folder) -> markdown`` as the generator of block ``name``."""

    def register(function: Generator) -> Generator:
        if name in BLOCKS:
            raise ValueError(f"block {name!r} is registered twice")
        BLOCKS[name] = function
        return function

    return register


def load(path: Path):
    """The JSON stored at ``path``."""
    return json.loads(path.read_text())


def load_records(path: Path) -> list[dict]:
    """The records of the JSON-lines file ``path`` (blank lines skipped)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def fill(text: str, bullet: bool = False) -> str:
    """Prose wrapped at BENCHMARKS.md's width (a bullet's continuation lines indented by two spaces)."""
    return textwrap.fill(text, 119, subsequent_indent="  " if bullet else "", break_on_hyphens=False)
