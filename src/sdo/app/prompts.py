"""Prompt files (``--prompts FILE``), read the same way by every command.

One prompt per line, UTF-8 (a leading byte-order mark is ignored); surrounding whitespace is stripped, blank lines
are skipped, and a line whose first non-blank character is ``#`` is a comment. A file that is missing, is not
UTF-8 (the message names the line) or holds no prompt is a ``ConfigError`` naming ``--prompts`` (or the flag the
file came from) and the file, in one line.
"""

from __future__ import annotations

import os
from pathlib import Path

from sdo.errors import ConfigError

__all__ = ["read_prompts"]


def read_prompts(path: str | os.PathLike, flag: str = "--prompts") -> list[str]:
    """The prompts of the prompt file ``path``, in file order (see the module docstring for the format); errors
    name ``flag``, the option the file came from (``--eval-prompts``, ...).

    Raises:
        ConfigError: the file is missing or unreadable, is not UTF-8 (naming the first bad line), or holds no
            prompt.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{flag} {path}: no such file (a text file with one prompt per line).")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{flag} {path}: cannot be read ({error.strerror or error}).") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ConfigError(f"{flag} {path}, line {line}: not UTF-8 text (byte {data[error.start]:#04x}).") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [line for line in prompts if line and not line.startswith("#")]
    if not prompts:
        raise ConfigError(f"{flag} {path}: no prompts (one per line; blank lines and '#' comments are skipped).")
    return prompts
