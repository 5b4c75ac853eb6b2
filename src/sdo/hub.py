"""Where models come from: a local folder, or a Hugging Face Hub id.

Every model ``sdo`` takes (a pipeline, a CLIP or PickScore model) is either a folder written by ``save_pretrained``
or a Hub id ``org/name``, and loads through diffusers' and transformers' own ``from_pretrained``:

- an existing folder is read as it is (local files only);
- otherwise a string ``org/name`` is a Hub id: it comes from the user's Hugging Face cache (``$HF_HUB_CACHE``, or
  ``$HF_HOME/hub``), downloaded into it first when missing, unless ``HF_HUB_OFFLINE=1`` forbids the network;
- anything else is a ``MissingWeightsError`` of one line.

``sdo`` downloads only the Hub ids it is given, safetensors only, and never runs a repository's code
(``trust_remote_code`` stays off). ``huggingface_hub`` (a dependency of diffusers) is imported lazily.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import MissingWeightsError

__all__ = ["HUB_ID", "ModelSource", "hub_cache", "hub_error", "model_source", "offline"]

# A Hub repository id: exactly one "/" between an organization (or user) and a name.
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class ModelSource:
    """Where one model comes from: ``name`` is a local folder (``hub=False``) or a Hub id ``org/name``."""

    name: str
    hub: bool

    def options(self) -> dict:
        """The ``from_pretrained`` keyword arguments for this source, besides the model's own: local files only for a
        folder; for a Hub id the cache the environment names now and, under ``HF_HUB_OFFLINE``, the cache alone."""
        if not self.hub:
            return {"local_files_only": True}
        return {"cache_dir": hub_cache(), **({"local_files_only": True} if offline() else {})}


def model_source(value: str | os.PathLike, what: str) -> ModelSource:
    """Classify ``value``: an existing folder, else a Hub id ``org/name``; ``MissingWeightsError`` otherwise.

    Args:
        value: a folder path, or a Hub id.
        what: the kind of model, for the message (e.g. "diffusers pipeline", "CLIP model").
    """
    text = os.fspath(value)
    folder = Path(text).expanduser()
    if folder.is_dir():
        return ModelSource(str(folder), hub=False)
    if HUB_ID.fullmatch(text) and not folder.exists():
        return ModelSource(text, hub=True)
    reason = "a file, not a folder" if folder.exists() else "no such folder"
    raise MissingWeightsError(
        f"{text} is not a {what} folder ({reason}) and not a Hugging Face Hub id (`org/name`): pass a folder written "
        "by `save_pretrained(DIR)`, or a Hub id."
    )


def offline() -> bool:
    """Whether the Hub may not be reached: ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set now or when
    ``huggingface_hub`` was imported."""
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if flag.strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_cache() -> str:
    """The Hugging Face cache folder the environment names now: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``huggingface_hub``'s default."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def hub_error(source: ModelSource, what: str, error: BaseException) -> MissingWeightsError:
    """One line for a Hub id that did not load: offline and not cached names ``HF_HUB_OFFLINE``; otherwise the first
    line of the loader's ``error``."""
    cache = hub_cache()
    cached = (Path(cache) / ("models--" + source.name.replace("/", "--"))).is_dir()
    if offline() and not cached:
        return MissingWeightsError(
            f"{what} {source.name!r} (no such folder, so a Hub id) is not in the Hugging Face cache ({cache}) and "
            "HF_HUB_OFFLINE is set, so it "
            f"cannot be downloaded: unset HF_HUB_OFFLINE, or download it once where the Hub is reachable "
            f"(`hf download {source.name}`) and copy the cache here."
        )
    detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return MissingWeightsError(
        f"{what} {source.name!r} (no such folder, so a Hub id) could not be loaded from the Hugging Face Hub: {detail}"
    )
