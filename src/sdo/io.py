"""Files: every write is atomic (temporary file in the same folder, then ``os.replace``); every read is
safetensors or JSON, and a corrupt or truncated file raises ``CorruptFileError`` naming the file."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import ConfigError, CorruptFileError, SdoError, WriteFailedError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DIR_MODE",
    "FILE_MODE",
    "IMAGE_SUFFIXES",
    "CorruptFileError",
    "WriteFailedError",
    "atomic_path",
    "convert_hint",
    "file_sha256",
    "has_pickled_weights",
    "image_size",
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


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex), read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def save_json(data: Any, path: str | os.PathLike) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def load_json(path: str | os.PathLike, hint: str = "") -> Any:
    """Read a JSON file; a missing or malformed file raises ``CorruptFileError``."""
    return _read(path, lambda p: json.loads(Path(p).read_text()), "JSON", hint)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff")
"""The image files ``load_image`` reads (through Pillow), and a folder of images is taken to hold."""

DEFAULT_MAX_PIXELS = 64_000_000
"""The most pixels (width x height) ``load_image`` reads by default: 64 megapixels (``--max-pixels`` raises it)."""

_HIGH_BIT_RANGE = {"I;16": 65535.0, "I": 65535.0, "F": 1.0}
"""Grey modes Pillow cannot convert to RGB without clipping: the value that is white (16-bit integers, 32-bit
integers holding 16-bit values, floats in [0, 1])."""

_PILLOW_LIMIT_LOCK = threading.Lock()


def load_image(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    *,
    size: tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> torch.Tensor:
    """An image file (PNG, JPEG, WebP, TIFF, ...) as ``[1, 3, H, W]`` float32 in [0, 1], read with Pillow.

    As diffusers' ``load_image``: the EXIF orientation is applied, and any mode is converted to RGB (an alpha channel
    dropped, grey repeated, a palette looked up, CMYK converted). Grey images of more than 8 bits keep their true
    values: 16-bit ones (``I;16`` modes) are divided by 65535, 32-bit integer ones (``I``) too when their values fit
    in [0, 65535], float ones (``F``) are taken as they are, in [0, 1]. With ``size = (height, width)`` the image is
    resized to it (Lanczos, as diffusers' ``VaeImageProcessor``), else kept at its size.

    Args:
        max_pixels: the most pixels (width x height) accepted, checked from the file's header before anything is
            decoded (``--max-pixels``).

    Raises:
        CorruptFileError: the file does not exist, is not an image Pillow can read, or holds values outside what
            its mode allows (a 32-bit integer image beyond [0, 65535], a float image beyond [0, 1]); the message
            names it.
        ConfigError: the image has more than ``max_pixels`` pixels.
    """
    from PIL import ImageOps

    def read(p: Path) -> torch.Tensor:
        with _open_image(p, max_pixels) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
            if _high_bit_mode(image.mode):
                return _high_bit_pixels(image, p, size)
            return _rgb_pixels(image.convert("RGB"), size)

    return _read(path, read, _image_kind(path), "").to(device)


def image_size(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """``(width, height)`` of an image file, read from its header alone (nothing decoded): what the commands check
    before any model loads.

    Raises:
        CorruptFileError: the file does not exist or is not an image Pillow can read; the message names it.
        ConfigError: the image has more than ``max_pixels`` pixels.
    """

    def read(p: Path) -> tuple[int, int]:
        with _open_image(p, max_pixels) as opened:
            return opened.size

    return _read(path, read, _image_kind(path), "")


def _image_kind(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    return suffix[1:].upper() if suffix in IMAGE_SUFFIXES else "image"


def _open_image(path: Path, max_pixels: int):
    """``PIL.Image.open(path)`` (lazy: the header only), refused with one line beyond ``max_pixels`` pixels.

    Pillow's own decompression-bomb guard (a warning above ``PIL.Image.MAX_IMAGE_PIXELS``, an error above twice
    that) never surfaces: below it sdo's bound decides; a ``max_pixels`` above it lifts it for this one call."""
    from PIL import Image

    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ConfigError(f"`max_pixels` (--max-pixels) must be a positive integer, got {max_pixels!r}.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            opened = Image.open(path)
        except Image.DecompressionBombError as error:
            pillow_limit = Image.MAX_IMAGE_PIXELS  # Pillow raises above twice it
            if max_pixels <= 2 * pillow_limit:
                found = re.search(r"\((\d+) pixels\)", str(error))
                pixels = f"{int(found[1]):,} pixels" if found else f"more than {2 * pillow_limit:,} pixels"
                raise _too_large(path, pixels, max_pixels) from None
            with _PILLOW_LIMIT_LOCK:  # a bound above Pillow's: Pillow's is lifted for this one header read
                Image.MAX_IMAGE_PIXELS = None
                try:
                    opened = Image.open(path)
                finally:
                    Image.MAX_IMAGE_PIXELS = pillow_limit
    width, height = opened.size
    if width * height > max_pixels:
        opened.close()
        raise _too_large(path, f"{width}x{height} ({width * height:,} pixels)", max_pixels)
    return opened


def _too_large(path: Path, pixels: str, max_pixels: int) -> ConfigError:
    return ConfigError(
        f"{path}: the image is {pixels}, more than --max-pixels {max_pixels} (`max_pixels`); downscale it, or raise "
        "--max-pixels if the machine has the memory for it."
    )


def _high_bit_mode(mode: str) -> str | None:
    """The key of ``_HIGH_BIT_RANGE`` for Pillow ``mode`` (``I;16``, ``I;16B``, ``I;16L``, ... share one), or None."""
    return "I;16" if mode.startswith("I;16") else mode if mode in _HIGH_BIT_RANGE else None


def _rgb_pixels(image, size: tuple[int, int] | None) -> torch.Tensor:
    """An RGB Pillow image as ``[1, 3, H, W]`` in [0, 1] (resized to ``size`` first, when given)."""
    from PIL import Image

    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.Resampling.LANCZOS)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image.height, image.width, 3)
    return (pixels.permute(2, 0, 1)[None].float() / 255).contiguous()


def _high_bit_pixels(image, path: Path, size: tuple[int, int] | None) -> torch.Tensor:
    """A grey image of more than 8 bits (``_HIGH_BIT_RANGE``) at its true values, as ``[1, 3, H, W]`` in [0, 1]:
    divided by its white, refused (``CorruptFileError``) when a value lies outside [0, white]; resized in float."""
    import numpy as np
    from PIL import Image

    white = _HIGH_BIT_RANGE[_high_bit_mode(image.mode)]
    values = np.asarray(image).astype(np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if not (np.isfinite(values).all() and low >= 0 and high <= white):
        kind = "floats" if image.mode == "F" else "integers"
        raise CorruptFileError(
            f"{path}: an image of {kind} (mode {image.mode}) with values in [{low:g}, {high:g}], outside [0, "
            f"{white:g}], the range sdo reads as black to white; save it scaled to that range, or as 8 or 16 bits."
        )
    grey = Image.fromarray((values / white).astype(np.float32))  # mode F
    if size is not None and grey.size != (size[1], size[0]):
        grey = grey.resize((size[1], size[0]), Image.Resampling.LANCZOS)
    pixels = torch.from_numpy(np.array(grey, dtype=np.float32)).clamp(0, 1)  # clamps Lanczos' ringing alone
    return pixels[None, None].expand(1, 3, *pixels.shape).contiguous()


def _read(path: str | os.PathLike, reader: Callable[[Path], Any], kind: str, hint: str) -> Any:
    path = Path(path)
    suffix = f" {hint}" if hint else ""
    if not path.is_file():
        raise CorruptFileError(f"{path}: file not found.{suffix}")
    try:
        return reader(path)
    except SdoError:  # already one line naming the file (an image too large, out of range)
        raise
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
