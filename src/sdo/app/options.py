"""Config dataclass fields that carry their CLI help: one definition serves the Python API and the flags."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def option(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field with ``default`` whose metadata holds the flag's ``help`` (and e.g. ``choices``)."""
    return field(default=default, metadata={"help": help, **metadata})
