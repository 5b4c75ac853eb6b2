"""Checks of common arguments (seeds, devices, learning rates), shared by the library and the ``sdo`` command, so
that a bad value fails up front with one line naming it instead of deep inside a run."""

from __future__ import annotations

import math

import torch

from .errors import ConfigError

__all__ = ["SEED_MAX", "check_device", "check_positive", "check_seed"]

SEED_MAX = 2**63 - 1
"""The largest seed: seeds are integers in ``[0, 2**63 - 1]`` (what ``torch.Generator.manual_seed`` takes
without wrapping negative values around)."""


def check_seed(seed: object, name: str = "seed") -> int:
    """``seed`` if it is an integer in ``[0, 2**63 - 1]``, else a ``ConfigError`` naming ``name``."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"`{name}` must be an integer in [0, 2**63 - 1], got {seed!r}.")
    return seed


def check_positive(value: object, name: str, *, allow_zero: bool = False) -> float:
    """``value`` if it is a finite number > 0 (>= 0 with ``allow_zero``), else a ``ConfigError`` naming ``name``."""
    bound = ">= 0" if allow_zero else "> 0"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"`{name}` must be a finite number {bound}, got {value!r}.") from None
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        raise ConfigError(f"`{name}` must be a finite number {bound}, got {value!r}.")
    return number


def check_device(device: object, name: str = "device") -> torch.device:
    """``device`` as a ``torch.device`` if this machine has it; ``--device cuda`` without CUDA is a ``ConfigError``
    (nothing silently falls back to the CPU)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        parsed = None
    if parsed is None:
        raise ConfigError(f"`{name}` must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got {device!r}.")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"`{name}` is {device!r}, but CUDA is not available on this machine "
                "(torch.cuda.is_available() is False); use --device cpu."
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ConfigError(
                f"`{name}` is {device!r}, but this machine has {torch.cuda.device_count()} CUDA device(s)."
            )
    elif parsed.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"`{name}` is {device!r}, but MPS is not available on this machine; use --device cpu.")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"`{name}` must be 'cpu', 'cuda' (or 'cuda:N') or 'mps', got {device!r}.")
    return parsed
