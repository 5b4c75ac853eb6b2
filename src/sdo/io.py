"""Files: every write is atomic (temporary file in the same folder, then ``os.replace``); every read is
safetensors or JSON, and a corrupt or truncated file raises ``CorruptFileError`` naming the file."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CorruptFileError, WriteFailedError

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "IMAGE_SUFFIXES",
    "CorruptFileError",
    "WriteFailedError",
    "atomic_path",
    "convert_hint",
    "has_pickled_weights",
    "load_image",
    "load_json",
    "load_tensors",
    "make_dir",
    "save_json",
    "save_tensors",
]


FILE_MODE = 0o644
"""Permissions of every file ``sdo`` writes (owner read-write, everyone read), whatever the umask."""
DIR_MODE = 0o755
"""Permissions of every folder ``sdo`` creates (owner full access, everyone read and list), whatever the umask."""


def make_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and missing parents) with ``DIR_MODE``; folders that already exist are left as they are."""
    path = Path(path)
    missing = [folder for folder in (path, *path.parents) if not folder.exists()]
    path.mkdir(parents=True, exist_ok=True)
    for folder in missing:
        os.chmod(folder, DIR_MODE)
    return path


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename, else it is removed.

    The file ends with ``FILE_MODE`` (0644) whatever the writer did (``mkstemp`` and safetensors create 0600).
    A write that fails with an ``OSError`` (a full disk, ...) raises ``WriteFailedError`` naming ``path`` and the
    free space on its disk; ``path`` is left as it was.
    """
    path = Path(path)
    try:
        make_dir(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as error:
        raise _write_failed(path, error) from error
    try:
        yield Path(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except WriteFailedError:
        raise
    except OSError as error:
        raise _write_failed(path, error) from error
    except SafetensorError as error:
        if "os error" not in str(error).lower() and "Os {" not in str(error):
            raise
        raise _write_failed(path, error) from error
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_failed(path: str | os.PathLike, error: Exception) -> WriteFailedError:
    """The one-line error for a failed write of ``path``: the system's reason and the free space on its disk."""
    path = Path(path)
    folder = next((p for p in (path.parent, *path.parents) if p.exists()), Path("."))
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free on its disk"
    except OSError:
        free = "free space unknown"
    reason = getattr(error, "strerror", None) or str(error)
    return WriteFailedError(f"could not write {path}: {reason} ({free}); free some space or choose another --out.")


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None):
    """Write ``tensors`` as safetensors, atomically (contiguous CPU copies)."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def load_tensors(path: str | os.PathLike, hint: str = "") -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing, truncated or corrupt file raises ``CorruptFileError``."""
    return _read(path, lambda p: load_file(str(p)), "safetensors", hint)


def save_json(data: Any, path: str | os.PathLike) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def load_json(path: str | os.PathLike, hint: str = "") -> Any:
    """Read a JSON file; a missing or malformed file raises ``CorruptFileError``."""
    return _read(path, lambda p: json.loads(Path(p).read_text()), "JSON", hint)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
"""The image files ``load_image`` reads (through Pillow), and a folder of images is taken to hold."""


def load_image(
    path: str | os.PathLike, device: torch.device | str = "cpu", *, size: tuple[int, int] | None = None
) -> torch.Tensor:
    """An image file (PNG, JPEG, WebP, ...) as ``[1, 3, H, W]`` float32 in [0, 1], read with Pillow.

    As diffusers' ``load_image``: the EXIF orientation is applied, and any mode is converted to RGB (an alpha channel
    dropped, grey repeated). With ``size = (height, width)`` the image is resized to it (Lanczos, as diffusers'
    ``VaeImageProcessor``), else kept at its size.

    Raises:
        CorruptFileError: the file does not exist or is not an image Pillow can read; the message names it.
    """
    from PIL import Image, ImageOps

    def read(p: Path) -> torch.Tensor:
        with Image.open(p) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened).convert("RGB")
        if size is not None and image.size != (size[1], size[0]):
            image = image.resize((size[1], size[0]), Image.Resampling.LANCZOS)
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image.height, image.width, 3)
        return (pixels.permute(2, 0, 1)[None].float() / 255).contiguous()

    suffix = Path(path).suffix.lower()
    kind = suffix[1:].upper() if suffix in IMAGE_SUFFIXES else "image"
    return _read(path, read, kind, "").to(device)


def _read(path: str | os.PathLike, reader: Callable[[Path], Any], kind: str, hint: str) -> Any:
    path = Path(path)
    suffix = f" {hint}" if hint else ""
    if not path.is_file():
        raise CorruptFileError(f"{path}: file not found.{suffix}")
    try:
        return reader(path)
    except (
        SafetensorError,
        json.JSONDecodeError,
        UnicodeDecodeError,
        OSError,
        RuntimeError,
        ValueError,
        SyntaxError,
    ) as error:  # PIL reports a malformed PNG as SyntaxError
        raise CorruptFileError(f"{path}: not a valid {kind} file (truncated or corrupt: {error}).{suffix}") from error


def has_pickled_weights(path: Path) -> bool:
    """Whether the folder ``path`` (or its component folders) holds ``.bin``/``.pt``/``.pth``/``.ckpt`` weights."""
    return any(found.suffix in (".bin", ".pt", ".pth", ".ckpt") for found in path.rglob("*") if found.is_file())


def convert_hint(path: Path, loader: str, error: Exception) -> str:
    """The message for a folder of pickled weights that ``loader`` (e.g. ``"DiffusionPipeline"``) could not load
    from safetensors: how to convert it once, and the first line of ``error``."""
    return (
        f"{path} holds pickled (.bin) weights and no safetensors; sdo reads only safetensors. Convert it once, "
        f"on a machine where you trust the files: `{loader}.from_pretrained(DIR, use_safetensors=False)"
        f".save_pretrained(NEW_DIR, safe_serialization=True)`, then pass NEW_DIR. ({str(error).splitlines()[0]})"
    )
