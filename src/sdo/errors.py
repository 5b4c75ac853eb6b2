"""The ``sdo`` error family: every error the library or the ``sdo`` command raises on purpose is an ``SdoError``.

The ``sdo`` command prints any ``SdoError`` as one line and exits with status 2; anything else is a bug and shows
its traceback. Each subclass also derives from the matching built-in exception, so ``except ValueError`` (or
``ImportError``, ``FileNotFoundError``) keeps working for callers who catch those.
"""

from __future__ import annotations

from typing import Any

# The distribution's name on the package index, named by every install hint; the import name and the command are `sdo`.
DISTRIBUTION = "shortcut-diffusion"

__all__ = [
    "ConfigError",
    "CorruptFileError",
    "MissingExtraError",
    "MissingWeightsError",
    "NonFiniteRewardError",
    "OutputLockedError",
    "ResumeMismatchError",
    "SdoError",
    "WriteFailedError",
    "missing_extra",
]


class SdoError(Exception):
    """Base of every error ``sdo`` raises on purpose (bad input, missing files, diverged runs)."""


class ConfigError(SdoError, ValueError):
    """An argument, flag or config field has a value ``sdo`` cannot use; the message names it."""


class MissingWeightsError(SdoError, FileNotFoundError):
    """Weights the run needs are not on disk; the message says where they were looked for and how to supply them."""


class MissingExtraError(SdoError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class CorruptFileError(SdoError, ValueError):
    """A file we read is missing, truncated or not in the expected format; the message names the file."""


class ResumeMismatchError(ConfigError):
    """A rerun on an output folder asks for settings that differ from the run the folder holds; the message names
    the differing flags."""


class OutputLockedError(SdoError, RuntimeError):
    """Another process is writing into the same output folder (it holds the folder's lock file)."""


class WriteFailedError(SdoError, OSError):
    """A file could not be written (a full disk, a quota, a read-only filesystem); the message names the file and
    the free space left on its disk. Nothing half-written is left in its place."""


class NonFiniteRewardError(SdoError, ValueError):
    """The reward (or its gradient) was NaN or infinite; ``result`` holds the run up to its last finite state.

    ``result`` is an ``sdo.OptimizationResult`` in latent optimization and a dict naming the last good checkpoint
    in fine-tuning.
    """

    def __init__(self, message: str, result: Any = None) -> None:
        super().__init__(message)
        self.result = result


def missing_extra(package: str, extra: str, purpose: str) -> MissingExtraError:
    """The error for an absent optional dependency: ``package`` comes with the extra ``[extra]`` of
    ``shortcut-diffusion``, which is installed from a clone or a built wheel until it is on the package index."""
    return MissingExtraError(
        f"{purpose} needs the optional dependency `{package}`; install it with: pip install {package} "
        f"(or, in a clone of sdo, pip install '.[{extra}]', the extra of {DISTRIBUTION})."
    )
