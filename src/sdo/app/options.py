"""Config dataclass fields that carry their CLI help and their range: one definition serves the Python API, the
flags and the checks.

A numeric field declares its range next to its definition (``option(50, "sampling steps", at_least=1,
at_most=1000)``); every config's ``__post_init__`` calls ``check_options``, which refuses a value out of range, a
non-finite float or a value of the wrong type with one ``ConfigError`` naming the field and its flag.
"""

from __future__ import annotations

import math
from dataclasses import Field, field, fields
from typing import Any

from sdo.checks import SEED_MAX
from sdo.errors import ConfigError

__all__ = ["check_options", "check_value", "is_numeric", "option"]


def option(
    default: Any,
    help: str,
    *,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    multiple_of: int | None = None,
    **metadata: Any,
) -> Any:
    """A dataclass field with ``default`` whose metadata holds the flag's ``help`` (and e.g. ``choices``).

    Numeric fields declare their range: ``at_least`` (``>=``) or ``above`` (``>``), ``at_most`` (``<=``) and
    ``multiple_of``. An integer field needs both ends (work must not grow without limit); a float field is always
    required to be finite. ``check_options`` enforces them.
    """
    bounds = dict(at_least=at_least, above=above, at_most=at_most, multiple_of=multiple_of)
    return field(
        default=default, metadata={"help": help, **{k: v for k, v in bounds.items() if v is not None}, **metadata}
    )


def is_numeric(item: Field) -> bool:
    """Whether a config field is a number: an ``int`` or ``float`` default, or an optional number (default None,
    ``type=int`` or ``float`` in its metadata); flags (``bool``) are not."""
    if isinstance(item.default, bool):
        return False
    return isinstance(item.default, int | float) or item.metadata.get("type") in (int, float)


def check_options(config: object) -> None:
    """Check every numeric field of the dataclass ``config`` against the range its ``option`` declares.

    Raises:
        ConfigError: the first field whose value is of the wrong type, not finite (floats), out of its range or
            not a multiple of its ``multiple_of``; the message names the field and its flag.
    """
    for item in fields(config):
        if is_numeric(item):
            _check_number(item, getattr(config, item.name))


def check_value(config_cls: type, name: str, value: object) -> None:
    """Check ``value`` against the range of ``config_cls``'s numeric field ``name``, as ``check_options`` does (for
    a flag the CLI takes from a config without building one, e.g. ``--threads``).

    Raises:
        ConfigError: as ``check_options``.
    """
    _check_number(next(item for item in fields(config_cls) if item.name == name), value)


def _check_number(item: Field, value: object) -> None:
    if value is None and item.default is None:
        return  # an optional number left to its default (e.g. the task's own)
    bounds = item.metadata
    integer = isinstance(item.default, int) or bounds.get("type") is int
    if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
        ok = False
    else:
        ok = (integer or math.isfinite(value)) and _within(value, bounds)
    if not ok:
        flag = "--" + item.name.replace("_", "-")
        raise ConfigError(f"`{item.name}` must be {_describe(bounds, integer)}, got {value!r} (flag {flag}).")


def _within(value: float, bounds: dict) -> bool:
    if "at_least" in bounds and value < bounds["at_least"]:
        return False
    if "above" in bounds and value <= bounds["above"]:
        return False
    if "at_most" in bounds and value > bounds["at_most"]:
        return False
    return not (bounds.get("multiple_of") and value % bounds["multiple_of"])


def _describe(bounds: dict, integer: bool) -> str:
    """``an integer in [1, 1000]``, ``a finite number > 0``, ``a finite number >= 0 and <= 1``, ..."""
    if integer and "at_least" in bounds and "at_most" in bounds:
        text = f"an integer in [{bounds['at_least']}, {_show(bounds['at_most'])}]"
    else:
        limits = [
            f">= {bounds['at_least']}" if "at_least" in bounds else "",
            f"> {bounds['above']}" if "above" in bounds else "",
        ]
        limits.append(f"<= {_show(bounds['at_most'])}" if "at_most" in bounds else "")
        text = ("an integer " if integer else "a finite number ") + " and ".join(part for part in limits if part)
    if bounds.get("multiple_of"):
        text += f", a multiple of {bounds['multiple_of']}"
    return text.rstrip()


def _show(number: float) -> str:
    return "2**63 - 1" if number == SEED_MAX else str(number)
