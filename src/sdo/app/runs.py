"""Output folders of ``sdo`` runs: checked writable before any work, locked against a second writer, cleaned of a
killed run's leftovers, and recording the settings of the run they hold (``config.json``).

The lock is ``OUT/.sdo.lock``: an exclusive ``flock`` on it is held for the run and released by the kernel when
the process ends, however it ends. The file names the holder (process id, host, command). A lock file whose lock
nobody holds was left by a run that was killed: it is reported and taken over. A lock file written by another
host (a shared filesystem, where the holder's process cannot be checked) is refused unless ``--break-lock``.

Only one kind of process runs without taking the lock: a process of an initialized ``torch.distributed`` group
(``accelerate launch``) that is not its main process; it waits for the main process to open the folder and stops
with it if that fails (``open_output``). Environment variables alone (``RANK``, ``WORLD_SIZE``) change nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import struct
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sdo.errors import ConfigError, OutputLockedError, ResumeMismatchError, SdoError
from sdo.io import FILE_MODE, load_json, make_dir, save_json

try:
    import fcntl
except ImportError:  # pragma: no cover (not POSIX): fall back to process-id checks
    fcntl = None

__all__ = [
    "LOCK_NAME",
    "RunLock",
    "check_command",
    "check_writable",
    "clean_leftovers",
    "clean_temporary_files",
    "damaged_file",
    "differing_flags",
    "file_records",
    "is_secondary_process",
    "open_output",
    "remove_unused_folders",
    "write_config",
]

LOCK_NAME = ".sdo.lock"
CONFIG_NAME = "config.json"
# Temporary names: ``atomic_path`` files (``.NAME.XXXXXXXX.tmp``, mkstemp), checkpoint folders being built
# (``.step-NNNNNN.XXXXXXXX``, mkdtemp) and writability probes (``.sdo-probe-PID.tmp``).
_TEMP_FILE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$|^\.sdo-probe-\d+\.tmp$")
_TEMP_FOLDER = re.compile(r"^\.step-\d+\.[a-z0-9_]{8}$")


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
    """After a refused run: remove each folder of ``created`` (the folders the run made, deepest first) that holds
    nothing but the run's own record (``config.json``, lock, temporary files) and empty folders."""
    for folder in created:
        if not folder.is_dir() or folder.is_symlink():
            continue
        kept = [
            path
            for path in folder.rglob("*")
            if not path.is_dir() and path.name not in (CONFIG_NAME, LOCK_NAME) and not _TEMP_FILE.match(path.name)
        ]
        if not kept:
            shutil.rmtree(folder, ignore_errors=True)


def file_records(folder: str | os.PathLike, names: list[str]) -> dict[str, dict]:
    """``{name: {"bytes": size, "sha256": hex digest}}`` for the files ``names`` in ``folder``: what a done marker
    records so that a rerun can tell a whole file from a missing, short or altered one (``damaged_file``)."""
    records = {}
    for name in names:
        path = Path(folder) / name
        records[name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
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
        if problem is None and verify and _sha256(path) != record.get("sha256"):
            problem = f"{path} does not match its recorded SHA-256"
        if problem:
            return problem
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    """Record a run's settings as ``out/config.json`` (``{"command": ..., "config": {...}}``), atomically."""
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
def open_output(out: str | os.PathLike, command: str, break_lock: bool = False) -> Iterator[dict | None]:
    """Hold ``out`` for a run: take its lock, check it holds no other command's run and clean a killed run's
    leftovers; yields the settings recorded in ``config.json`` (None if none). A secondary process of a process
    group (``is_secondary_process``) takes no lock: it waits for the main process's outcome and raises if that
    failed, so no process writes into a folder its main process could not take."""
    if is_secondary_process():
        _agree(None)
        yield check_command(out, command)
        return
    lock = RunLock(out, command, break_lock)
    try:
        lock.acquire()
        recorded = check_command(out, command)
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
