"""Output folders of ``sdo`` runs: checked writable and sdo's own before any work, locked against a second writer,
cleaned of a killed run's leftovers, and recording the settings of the run they hold (``config.json``).

Ownership: sdo writes into, and removes from, only folders it made. Every output folder a run takes holds the marker
``OUT/.sdo-run.json``, written atomically (before ``config.json``) when the run starts writing results::

    {"sdo_run": 1, "version": "<sdo version>", "command": "optimize", "kind": "edit", "task": "clip"}

- ``command``: ``demo``, ``optimize``, ``finetune``, ``bench`` or ``train-zoo``;
- ``kind``: for ``optimize`` ``latent`` (one run), ``edit`` (``--image``/``--images``) or ``items``
  (``--conditions``/``--prompts``); for ``bench`` ``bench`` or ``plan`` (``--plan``); else the command;
- ``task``: for ``demo`` and ``optimize`` the embedded model's ``--task`` or a pipeline's ``--reward``; else null.

A folder holds one run: a rerun whose command, kind or task differs from its marker's is refused
(``check_run``). An existing non-empty ``--out`` is sdo's when it holds the marker or, for folders written before the
marker existed, a ``config.json`` with a ``"command"`` key (``check_owned``); anything else is refused before any
model loads, and so is an ``--out`` that is, holds or lies inside an input folder (``check_apart``). A pipeline
that ``sdo finetune --save-pipeline DIR`` saved holds the marker too, with ``kind`` ``saved-pipeline`` and ``out``
(the run's ``--out``, an absolute path), so that a rerun of that run may replace it (``check_save_folder``).
A refused or failed run leaves no folder it made and no record it wrote in a folder that was empty
(``remove_unused_folders``, ``remove_unused_records``).

The lock is ``OUT/.sdo.lock``: an exclusive ``flock`` on it is held for the run and released by the kernel when
the process ends, however it ends. The file names the holder (process id, host, command). A lock file whose lock
nobody holds was left by a run that was killed: it is reported and taken over. A lock file written by another
host (a shared filesystem, where the holder's process cannot be checked) is refused unless ``--break-lock``.

Only one kind of process runs without taking the lock: a process of an initialized ``torch.distributed`` group
(``accelerate launch``) that is not its main process; it waits for the main process to open the folder and stops
with it if that fails (``open_output``). Environment variables alone (``RANK``, ``WORLD_SIZE``) change nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sdo.errors import ConfigError, OutputLockedError, ResumeMismatchError, SdoError, WriteFailedError
from sdo.io import FILE_MODE, file_sha256, load_json, make_dir, save_json

try:
    import fcntl
except ImportError:  # pragma: no cover (not POSIX): fall back to process-id checks
    fcntl = None

__all__ = [
    "LOCK_NAME",
    "MARKER_NAME",
    "SAVED_PIPELINE",
    "RunLock",
    "check_apart",
    "check_command",
    "check_owned",
    "check_run",
    "check_save_folder",
    "check_writable",
    "clean_leftovers",
    "clean_temporary_files",
    "damaged_file",
    "describe_run",
    "differing_flags",
    "file_records",
    "input_folders",
    "is_sdo_folder",
    "is_secondary_process",
    "is_vacant",
    "model_bytes",
    "open_output",
    "read_marker",
    "remove_unused_folders",
    "remove_unused_records",
    "replace_saved_folder",
    "saved_for",
    "write_config",
    "write_marker",
]

LOCK_NAME = ".sdo.lock"
CONFIG_NAME = "config.json"
MARKER_NAME = ".sdo-run.json"
"""The ownership marker of every folder sdo writes a run into (see the module docstring)."""
SAVED_PIPELINE = "saved-pipeline"
"""The marker ``kind`` of a pipeline folder that ``sdo finetune --save-pipeline`` wrote."""
# Temporary names: ``atomic_path`` files (``.NAME.XXXXXXXX.tmp``, mkstemp), checkpoint and diffusers folders being
# built (``.step-NNNNNN.XXXXXXXX``, ``.diffusers.XXXXXXXX``, mkdtemp) and writability probes (``.sdo-probe-PID.tmp``).
_TEMP_FILE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$|^\.sdo-probe-\d+\.tmp$")
_TEMP_FOLDER = re.compile(r"^\.step-\d+\.[a-z0-9_]{8}$|^\.diffusers\.[a-z0-9_]{8}$")
# What a folder may hold and still count as empty: a killed run's lock file and a writability probe.
_BOOKKEEPING = re.compile(r"^\.sdo\.lock$|^\.sdo-probe-\d+\.tmp$")
# A run's own record: what a refused or failed run may leave, and what is removed after it.
_RECORDS = (CONFIG_NAME, MARKER_NAME, LOCK_NAME)
_KINDS = {
    "latent": "latent-optimization run",
    "edit": "image-edit run (--image/--images)",
    "items": "run of many items (--conditions/--prompts)",
    "bench": "benchmark",
    "plan": "benchmark plan (--plan)",
    SAVED_PIPELINE: "saved pipeline (--save-pipeline)",
}


def flag(name: str) -> str:
    """The command-line flag of a config field: ``lora_rank`` -> ``--lora-rank``."""
    return "--" + name.replace("_", "-")


def check_writable(out: str | os.PathLike) -> Path:
    """Create ``out`` if needed and write and remove a probe file in it; a ``ConfigError`` naming ``--out`` if
    that fails (a file in the way, no permission, a read-only filesystem), before any work is done."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"`out` {out} is a file, not a folder; choose another --out.")
    try:
        make_dir(out)
    except OSError as error:
        raise ConfigError(f"`out` {out} cannot be created: {error.strerror or error}; choose another --out.") from None
    probe = out / f".sdo-probe-{os.getpid()}.tmp"
    try:
        with open(probe, "w") as handle:
            handle.write("sdo")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"`out` {out} is not writable: {error.strerror or error}; choose another --out.") from None
    return out


def clean_leftovers(out: str | os.PathLike) -> list[Path]:
    """Remove temporary files and half-built checkpoint folders that a killed run left in ``out`` and
    ``out/checkpoints``; returns what was removed. Call it only while holding the folder's lock. (Item folders,
    ``out/items/<i>/``, are cleaned as their items are checked: ``clean_temporary_files``.)"""
    return [*clean_temporary_files(out), *clean_temporary_files(Path(out) / "checkpoints")]


def clean_temporary_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and half-built checkpoint folders a killed run left directly in ``folder``
    (``atomic_path`` files, ``.step-*`` folders, writability probes); returns what was removed."""
    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        if path.is_dir() and not path.is_symlink() and _TEMP_FOLDER.match(path.name):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        elif path.is_file() and _TEMP_FILE.match(path.name):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def remove_unused_folders(created: list[Path]) -> None:
    """After a refused or failed run: remove each folder of ``created`` (the folders the run made, deepest first)
    that holds nothing but the run's own record (``config.json``, the marker, temporary files) and empty folders. A
    folder with a lock file is in use by another run (which made it meanwhile) and is kept."""
    for folder in created:
        if _only_records(folder):
            shutil.rmtree(folder, ignore_errors=True)


def remove_unused_records(out: str | os.PathLike) -> None:
    """After a refused or failed run into ``out``, a folder that was vacant before it (``is_vacant``):
    if ``out`` holds nothing but what the run wrote as its record (``config.json``, the marker, temporary files)
    and empty folders, remove them, leaving ``out`` as empty as it was. Not while a lock file says a run uses it."""
    out = Path(out)
    if not _only_records(out):
        return
    for path in out.iterdir():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _only_records(folder: Path) -> bool:
    """Whether ``folder`` is a real folder, no run holds its lock file, and it holds nothing but a run's record
    (``config.json``, the marker), temporary files and empty folders."""
    if not folder.is_dir() or folder.is_symlink() or (folder / LOCK_NAME).exists():
        return False
    for path in folder.rglob("*"):
        if path.is_symlink() or not (path.is_dir() or path.name in _RECORDS or _TEMP_FILE.match(path.name)):
            return False
    return True


def is_vacant(out: str | os.PathLike) -> bool:
    """Whether ``out`` is missing, or a folder that holds nothing but a killed run's bookkeeping (no record of a
    run, no file of anyone's): a folder whose records a refused or failed run may remove
    (``remove_unused_records``)."""
    out = Path(out)
    if not out.exists():
        return True
    try:
        return out.is_dir() and not out.is_symlink() and not _foreign(out)
    except OSError:
        return False


def describe_run(command: str, config: dict) -> dict:
    """The ``command``, ``kind`` and ``task`` that the marker records for a run of ``command`` with the settings
    ``config`` (a config's fields as a dict; see the module docstring)."""
    kind, task = command, None
    if command == "optimize":
        if config.get("conditions") or config.get("prompts"):
            kind = "items"
        elif config.get("image") or config.get("images"):
            kind = "edit"
        else:
            kind = "latent"
    elif command == "bench" and config.get("plan"):
        kind = "plan"
    if command in ("demo", "optimize"):
        task = config.get("reward") if config.get("pipeline") else config.get("task")
    return {"command": command, "kind": kind, "task": task}


def read_marker(folder: str | os.PathLike) -> dict | None:
    """The marker of ``folder`` (``MARKER_NAME``), or None when there is none or it is not an sdo marker."""
    try:
        record = json.loads((Path(folder) / MARKER_NAME).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("command"), str) else None


def write_marker(folder: str | os.PathLike, run: dict) -> Path:
    """Write the marker ``{"sdo_run": 1, "version": ..., **run}`` into ``folder``, atomically."""
    from sdo import __version__

    path = Path(folder) / MARKER_NAME
    save_json({"sdo_run": 1, "version": __version__, **run}, path)
    return path


def _legacy_config(folder: Path) -> dict | None:
    """``folder/config.json`` when it is an sdo run's record (a JSON object with a ``"command"``), else None."""
    try:
        recorded = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) and isinstance(recorded.get("command"), str) else None


def is_sdo_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds sdo's marker or, written before markers existed, an sdo ``config.json``."""
    return read_marker(folder) is not None or _legacy_config(Path(folder)) is not None


def _recorded_run(folder: Path) -> dict | None:
    """The run ``folder`` holds, as ``describe_run`` gives it: its marker's, else its ``config.json``'s."""
    marker = read_marker(folder)
    if marker is not None:
        return marker
    recorded = _legacy_config(folder)
    if recorded is None:
        return None
    if not isinstance(recorded.get("config"), dict):
        return {"command": recorded["command"]}
    return describe_run(recorded["command"], recorded["config"])


def _foreign(folder: Path) -> list[str]:
    """The names in ``folder`` that are not a killed run's bookkeeping (its lock file, a probe), sorted."""
    return sorted(name for name in os.listdir(folder) if not _BOOKKEEPING.match(name))


def check_owned(out: str | os.PathLike, flag_name: str = "--out") -> None:
    """Refuse an existing, non-empty ``out`` that is not sdo's (``is_sdo_folder``) with a ``ConfigError`` naming
    ``flag_name``: sdo writes only into a new folder, an empty one (a killed run's lock file aside) or its own. A
    missing ``out`` passes, and so does a file (``check_writable`` names it)."""
    out = Path(out)
    if not out.is_dir():
        return
    try:
        names = _foreign(out)
    except OSError as error:
        reason = error.strerror or error
        raise ConfigError(f"{flag_name} {out} cannot be read: {reason}; choose another {flag_name}.") from None
    if not names or is_sdo_folder(out):
        return
    shown = repr(names[0]) + (f" and {len(names) - 1} more" if len(names) > 1 else "")
    raise ConfigError(
        f"{flag_name} {out} is not empty and was not written by sdo (no {MARKER_NAME} or sdo config.json; it holds "
        f"{shown}); sdo writes only into a new or empty folder or one of its own runs: choose another {flag_name}."
    )


def check_run(out: str | os.PathLike, run: dict) -> None:
    """Refuse (``ResumeMismatchError``) to run ``run`` (``describe_run``) into ``out`` when ``out`` holds a run of
    another command, kind or task: a folder holds one run."""
    recorded = _recorded_run(Path(out))
    if recorded is None:
        return
    if recorded["command"] != run["command"]:
        raise ResumeMismatchError(
            f"{out} holds a `sdo {recorded['command']}` run, not a `sdo {run['command']}` one; choose another --out."
        )
    differs = [key for key in ("kind", "task") if recorded.get(key) is not None and recorded[key] != run.get(key)]
    if differs:
        raise ResumeMismatchError(
            f"{out} holds a `sdo {recorded['command']}` {_describe_kind(recorded)}, not a "
            f"{_describe_kind(run)}; a folder holds one run: choose another --out."
        )


def _describe_kind(run: dict) -> str:
    kind = run.get("kind") or run["command"]
    words = _KINDS.get(kind, f"{kind} run")
    return words + (f" of task {run['task']!r}" if run.get("task") is not None else "")


def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def input_folders(config: object, pipeline: object = None) -> dict[str, Path]:
    """The local folders a run of ``config`` reads, by flag: ``--pipeline`` (a folder, not a Hub id; or a loaded
    ``pipeline``'s ``name_or_path`` when that is a folder), ``--clip-path`` and ``--pickscore-path`` (or
    ``$SDO_CLIP_PATH`` / ``$SDO_PICKSCORE_PATH``) when folders, and ``--images``. Fields ``config`` lacks count as
    empty."""
    candidates = {
        "--pipeline": getattr(config, "pipeline", ""),
        "--images": getattr(config, "images", ""),
    }
    for name, variable in (("clip_path", "SDO_CLIP_PATH"), ("pickscore_path", "SDO_PICKSCORE_PATH")):
        if hasattr(config, name):
            candidates[flag(name)] = getattr(config, name) or os.environ.get(variable, "")
    if isinstance(pipeline, (str, os.PathLike)):
        candidates["--pipeline"] = pipeline
    elif pipeline is not None:
        candidates["`pipeline` (its name_or_path)"] = getattr(pipeline, "name_or_path", "")
    return {
        name: Path(value)
        for name, value in candidates.items()
        if isinstance(value, (str, os.PathLike)) and str(value) and Path(value).expanduser().is_dir()
    }


def check_apart(flag_name: str, path: str | os.PathLike, inputs: dict[str, Path]) -> None:
    """Refuse (``ConfigError`` naming ``flag_name``) a ``path`` that is, contains or lies inside one of the folders
    ``inputs`` (``{flag: folder}``, e.g. ``input_folders``): sdo would write into what the run reads."""
    mine = _resolved(path)
    for other_flag, folder in inputs.items():
        other = _resolved(folder)
        if mine == other:
            relation = "is"
        elif other in mine.parents:
            relation = "lies inside"
        elif mine in other.parents:
            relation = "contains"
        else:
            continue
        raise ConfigError(
            f"{flag_name} {path} {relation} the {other_flag} folder {folder}; they must be separate folders: "
            f"choose another {flag_name}."
        )


def saved_for(folder: Path, out: str | os.PathLike) -> bool:
    """Whether ``folder`` is a pipeline that ``--save-pipeline`` wrote for the run of ``out`` (its marker)."""
    marker = read_marker(folder)
    return bool(marker) and marker.get("kind") == SAVED_PIPELINE and marker.get("out") == str(_resolved(out))


def check_save_folder(folder: str | os.PathLike, out: str | os.PathLike, inputs: dict[str, Path], size: int) -> None:
    """Before any training, the checks of ``finetune --save-pipeline folder`` (each a one-line ``ConfigError``
    naming ``--save-pipeline``): ``folder`` is missing, empty, or a pipeline saved earlier for this same ``out``
    (``saved_for``), not a file or a link; it is not, does not contain and does not lie inside ``out`` or the
    ``inputs`` folders, nor is or contains the current directory; its nearest existing parent is a writable folder
    with ``size`` bytes free (the pipeline's estimated size, ``model_bytes``; 0: not checked)."""
    name, folder = "--save-pipeline", Path(folder)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        what = "a link" if folder.is_symlink() else "a file"
        raise ConfigError(f"{name} {folder} is {what}, not a folder; choose a new folder for {name}.")
    check_apart(name, folder, {"--out": Path(out), **inputs})
    here = Path.cwd().resolve()
    if _resolved(folder) == here or _resolved(folder) in here.parents:
        raise ConfigError(
            f"{name} {folder} is or contains the current directory ({here}); choose a new folder for {name}."
        )
    if folder.is_dir() and any(folder.iterdir()) and not saved_for(folder, out):
        raise ConfigError(
            f"{name} {folder} is not empty and is not a pipeline sdo saved for --out {out} (no {MARKER_NAME} naming "
            f"it); sdo replaces only its own: choose a new or empty folder for {name}."
        )
    parent = next((p for p in _resolved(folder).parents if p.exists()), Path("/"))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{name} {folder}: its folder {parent} is not writable; choose another {name}.")
    free = shutil.disk_usage(parent).free
    if size > free:
        raise ConfigError(
            f"{name} {folder}: the pipeline needs about {size / 2**20:.1f} MiB and its disk has {free / 2**20:.1f} "
            f"MiB free; free some space or choose another {name}."
        )


def model_bytes(pipeline: object) -> int:
    """An estimate of the bytes a pipeline takes on disk: a folder's safetensors files, or a loaded pipeline's
    weights (each ``torch.nn.Module`` component's parameters and buffers); 0 when unknown (a Hub id)."""
    if isinstance(pipeline, (str, os.PathLike)):
        folder = Path(pipeline)
        return sum(path.stat().st_size for path in folder.rglob("*.safetensors")) if folder.is_dir() else 0
    total = 0
    for component in (getattr(pipeline, "components", None) or {}).values():
        if hasattr(component, "parameters") and hasattr(component, "buffers"):
            tensors = [*component.parameters(), *component.buffers()]
            total += sum(tensor.numel() * tensor.element_size() for tensor in tensors)
    return total


def replace_saved_folder(building: Path, folder: Path, out: str | os.PathLike) -> None:
    """Put the finished folder ``building`` (beside ``folder``) in place of ``folder`` by renames: ``folder`` may be
    missing, empty, or a pipeline saved earlier for ``out`` (``saved_for``), which is moved aside and removed only
    once the new one is in place; anything else is refused (``WriteFailedError``) and left as it is."""
    if folder.is_dir() and not folder.is_symlink() and any(folder.iterdir()):
        if not saved_for(folder, out):
            raise WriteFailedError(
                f"--save-pipeline {folder} now holds files sdo did not save for --out {out}; nothing replaced. "
                "Choose a new or empty folder for --save-pipeline."
            )
        old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
        os.replace(folder, old / folder.name)
        os.replace(building, folder)
        shutil.rmtree(old, ignore_errors=True)
        return
    os.replace(building, folder)  # a missing folder, or an empty one: rename replaces it


def file_records(folder: str | os.PathLike, names: list[str]) -> dict[str, dict]:
    """``{name: {"bytes": size, "sha256": hex digest}}`` for the files ``names`` in ``folder``: what a done marker
    records so that a rerun can tell a whole file from a missing, short or altered one (``damaged_file``)."""
    records = {}
    for name in names:
        path = Path(folder) / name
        records[name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    return records


def damaged_file(folder: str | os.PathLike, records: object, verify: bool = False) -> str | None:
    """The first problem with the files ``records`` (from ``file_records``) lists in ``folder``, or None when all
    are whole. Always checked (cheap): each file is there with its recorded size, and a safetensors file's header
    fits its size; with ``verify`` also each file's SHA-256."""
    if not isinstance(records, dict) or not records:
        return "no record of its files"
    for name, record in records.items():
        path = Path(folder) / name
        parts = name.split("/")
        if not isinstance(record, dict) or any(not part or part.startswith(".") for part in parts):
            return f"a damaged record of {name!r}"
        try:
            size = path.stat().st_size
        except OSError:
            return f"{path} is missing"
        if size != record.get("bytes"):
            return f"{path} has {size} bytes, not the {record.get('bytes')} recorded (truncated or corrupt)"
        problem = _safetensors_problem(path, size) if name.endswith(".safetensors") else None
        if problem is None and verify and file_sha256(path) != record.get("sha256"):
            problem = f"{path} does not match its recorded SHA-256"
        if problem:
            return problem
    return None


def _safetensors_problem(path: Path, size: int) -> str | None:
    """Whether a safetensors file's header parses and its tensors end exactly at the end of the file (reads the
    header only)."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > size - 8:
                return f"{path}: its safetensors header runs past the end of the file"
            header = json.loads(handle.read(length))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (OSError, struct.error, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return f"{path}: not a readable safetensors file"
    if 8 + length + end != size:
        return f"{path}: its tensors do not fill the file (truncated or padded)"
    return None


def check_command(out: str | os.PathLike, command: str) -> dict | None:
    """The settings recorded in ``out/config.json`` (None if there are none); a ``ResumeMismatchError`` if they
    belong to another command's run."""
    path = Path(out) / CONFIG_NAME
    if not path.is_file():
        return None
    recorded = load_json(path)
    if not isinstance(recorded, dict) or not isinstance(recorded.get("config"), dict):
        return None  # a damaged record: the run's checkpoints (or nothing) decide
    if recorded.get("command", command) != command:
        raise ResumeMismatchError(
            f"{out} holds a `sdo {recorded['command']}` run, not a `sdo {command}` one; choose another --out."
        )
    return recorded["config"]


def write_config(out: str | os.PathLike, command: str, config: dict) -> Path:
    """Record a run's settings as ``out/config.json`` (``{"command": ..., "config": {...}}``), atomically, after
    the folder's marker (``describe_run``; written once, when the folder has none)."""
    if read_marker(out) is None:
        write_marker(out, describe_run(command, config))
    path = Path(out) / CONFIG_NAME
    save_json({"command": command, "config": config}, path)
    return path


def differing_flags(saved: dict, current: dict, defaults: dict, free: frozenset[str]) -> list[str]:
    """``--flag OLD -> NEW`` for each setting of ``current`` that differs from ``saved`` (a field missing from
    ``saved`` counts as its default), except the ``free`` ones."""
    changes = []
    for name, value in current.items():
        if name in free:
            continue
        old = saved.get(name, defaults.get(name))
        if old != value:
            changes.append(f"{flag(name)} {json.dumps(old)} -> {json.dumps(value)}")
    return changes


class RunLock:
    """An exclusive lock on an output folder, held from ``acquire()`` to ``release()`` (or the process's end).

    Args:
        out: the output folder (created if needed).
        command: the holder's command, written into the lock file for the message a second process gets.
        break_lock: take over a lock whose holder cannot be checked (written from another host).
    """

    def __init__(self, out: str | os.PathLike, command: str, break_lock: bool = False) -> None:
        self.out = Path(out)
        self.path = self.out / LOCK_NAME
        self.command = command
        self.break_lock = break_lock
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> RunLock:
        """Take the lock, or raise ``OutputLockedError`` naming the process that holds it."""
        make_dir(self.out)
        if fcntl is None:  # pragma: no cover
            return self._acquire_by_pid()
        for _ in range(20):
            fd = self._open(os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise OutputLockedError(
                    f"{self.out} is in use by {_describe(holder)}; wait for it to finish, or choose another --out."
                ) from None
            except OSError:  # this filesystem has no flock
                os.close(fd)
                return self._acquire_by_pid()
            if not _same_file(fd, self.path):  # the holder removed it between our open and flock: try again
                os.close(fd)
                continue
            try:
                self._take_over(_read(fd))
            except OutputLockedError:
                os.close(fd)
                raise
            self._fd = fd
            self._write(fd)
            return self
        raise OutputLockedError(f"{self.out}: could not take the lock {self.path}; try again.")

    def _write(self, fd: int) -> None:
        """Name this process as the holder in the lock file; a failed write (a full disk) is one line."""
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command, "started": time.time()}
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(record).encode())
            os.fsync(fd)
        except OSError as error:
            self.release()
            raise OutputLockedError(
                f"{self.out}: could not write the lock file {self.path} ({error.strerror})."
            ) from None

    def _open(self, flags: int) -> int:
        """Open the lock file; one that cannot be opened (a folder in its place, no permission) is one line."""
        try:
            return os.open(self.path, flags, FILE_MODE)
        except FileExistsError:
            raise
        except OSError as error:
            raise OutputLockedError(
                f"{self.out}: the lock file {self.path} cannot be opened ({error.strerror or error}); if no run uses "
                "the folder, remove it, or choose another --out."
            ) from None

    def release(self) -> None:
        """Give the lock up and remove the lock file."""
        if self._fd is None:
            return
        try:
            if _same_file(self._fd, self.path):
                self.path.unlink()
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def _take_over(self, holder: dict | None) -> None:
        """The lock was free; a lock file that still names a holder was left by a run that is gone."""
        if not holder:
            return
        if holder.get("host") not in (None, socket.gethostname()) and not self.break_lock:
            raise OutputLockedError(
                f"{self.out} is locked by {_describe(holder)} (lock file {self.path}); the process cannot be "
                "checked from this host. If no run is using the folder, rerun with --break-lock."
            )
        print(  # the lock was free, so that run has ended (its process id may since belong to another process)
            f"sdo: cleared a stale lock on {self.out} left by {_describe(holder)}; that run has ended.",
            file=sys.stderr,
        )

    def _acquire_by_pid(self) -> RunLock:  # pragma: no cover (filesystems without flock)
        for _ in range(20):
            try:
                fd = self._open(os.O_RDWR | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                with open(self.path, "rb") as handle:
                    holder = _parse(handle.read())
                alive = holder and holder.get("host") == socket.gethostname() and _alive(holder.get("pid"))
                if alive or not self.break_lock:
                    state = "in use by" if alive else "locked by"
                    hint = "" if alive else " If that process is gone, rerun with --break-lock to clear the lock."
                    raise OutputLockedError(f"{self.out} is {state} {_describe(holder)}.{hint}") from None
                self.path.unlink(missing_ok=True)
                continue
            self._fd = fd
            self._write(fd)
            return self
        raise OutputLockedError(f"{self.out}: could not take the lock {self.path}; try again.")


def is_secondary_process() -> bool:
    """True only in a process of an initialized ``torch.distributed`` process group that is not its rank 0 (the
    other processes of ``accelerate launch``): such a process shares the main process's lock. ``RANK`` or
    ``WORLD_SIZE`` in the environment without an initialized group change nothing."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_rank() != 0


def _agree(error: SdoError | None) -> None:
    """In a process group, every process learns whether the main process opened the output folder: the main
    process sends its error's message (or None), and a secondary process raises it. Outside a group: nothing."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    message = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(message, src=0)
    if message[0] is not None and dist.get_rank() != 0:
        raise OutputLockedError(f"the main process could not open the output folder ({message[0]}).")


@contextmanager
def open_output(
    out: str | os.PathLike, command: str, break_lock: bool = False, settings: dict | None = None
) -> Iterator[dict | None]:
    """Hold ``out`` for a run: check it is sdo's or empty (``check_owned``), take its lock, check it holds no run
    of another command, or of another kind or task than ``settings`` describe (``check_run``), and clean a killed
    run's leftovers; yields the settings recorded in ``config.json`` (None if none). A secondary process of a
    process group (``is_secondary_process``) takes no lock: it waits for the main process's outcome and raises if
    that failed, so no process writes into a folder its main process could not take."""
    if is_secondary_process():
        _agree(None)
        yield check_command(out, command)
        return
    lock = RunLock(out, command, break_lock)
    try:
        check_owned(out)
        lock.acquire()
        recorded = check_command(out, command)
        if settings is not None:
            check_run(out, describe_run(command, settings))
        clean_leftovers(out)
    except SdoError as error:
        lock.release()
        _agree(error)
        raise
    _agree(None)
    try:
        yield recorded
    finally:
        lock.release()


def _read(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    return _parse(os.read(fd, 4096))


def _parse(data: bytes) -> dict | None:
    try:
        record = json.loads(data.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _describe(holder: dict | None) -> str:
    if not holder:
        return "another process (starting up)"
    command = f"`sdo {holder['command']}` " if holder.get("command") else ""
    return f"{command}process {holder.get('pid')} on host {holder.get('host')}"


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _alive(pid: object) -> bool:  # pragma: no cover (filesystems without flock)
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
