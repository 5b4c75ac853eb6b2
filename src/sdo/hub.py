"""Where models come from: a local folder, or a Hugging Face Hub id.

Every model ``sdo`` takes (a pipeline, a CLIP or PickScore model) is either a folder written by ``save_pretrained``
or a Hub id ``org/name``, and loads through diffusers' and transformers' own ``from_pretrained``:

- an existing folder is read as it is (local files only);
- otherwise a string ``org/name`` is a Hub id: it comes from the user's Hugging Face cache (``$HF_HUB_CACHE``, or
  ``$HF_HOME/hub``), downloaded into it first when missing, unless ``HF_HUB_OFFLINE=1`` forbids the network;
- anything else is a ``MissingWeightsError`` of one line.

``sdo`` downloads only the Hub ids it is given, safetensors only, and never runs a repository's code
(``trust_remote_code`` stays off). ``huggingface_hub`` (a dependency of diffusers) is imported lazily.

A model is complete or refused: ``load_model`` loads through ``from_pretrained`` with its loading report and
refuses any weight missing from the checkpoint (it would be random), in one line naming the folder; weights of the
checkpoint the model does not use are named in a warning (a checkpoint may legitimately hold more than the model
takes). ``check_tokenizer`` refuses a tokenizer loaded without its files (every word would be unknown).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import CorruptFileError, MissingWeightsError
from .io import convert_hint, has_pickled_weights

__all__ = [
    "HUB_ID",
    "ModelSource",
    "check_tokenizer",
    "hub_cache",
    "hub_error",
    "load_model",
    "model_source",
    "offline",
]

logger = logging.getLogger(__name__)

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


class _TorchvisionFallback(logging.Filter):
    """Drops transformers' notice that an image processor falls back to its PIL version because torchvision is not
    installed (``CLIPImageProcessor`` -> ``CLIPImageProcessorPil``): the fallback is what sdo's preprocessing
    expects, and the notice asks the user for nothing sdo needs. Every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


_QUIET = _TorchvisionFallback()


def quiet_torchvision_fallback() -> None:
    """Silence only transformers' torchvision-fallback notice (``_TorchvisionFallback``), on the one logger that
    emits it, without importing transformers; done before sdo loads a model, idempotent."""
    logging.getLogger("transformers.utils.import_utils").addFilter(_QUIET)


def model_source(value: str | os.PathLike, what: str) -> ModelSource:
    """Classify ``value``: an existing folder, else a Hub id ``org/name``; ``MissingWeightsError`` otherwise.
    Before a model loads from it, transformers' torchvision-fallback notice is silenced
    (``quiet_torchvision_fallback``).

    Args:
        value: a folder path, or a Hub id.
        what: the kind of model, for the message (e.g. "diffusers pipeline", "CLIP model").
    """
    quiet_torchvision_fallback()
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


def load_model(model_class, source: ModelSource, what: str, *, subfolder: str = "", hint: str = "", **options):
    """``model_class.from_pretrained`` of ``source`` (its ``subfolder``), safetensors only, and complete.

    ``model_class`` is a transformers ``PreTrainedModel`` or a diffusers ``ModelMixin`` class; ``options`` go to
    its ``from_pretrained`` (e.g. ``torch_dtype``, ``trust_remote_code=False``); ``hint`` ends the message of a
    refusal (what a wrong folder may be). The loading report decides:
    a weight the model has and the checkpoint lacks, or one of another shape, is refused; weights the checkpoint
    has and the model does not use are named in one warning line (``logging``) and left out.

    Raises:
        MissingWeightsError: the folder holds no such model (no config, no safetensors weights, pickled weights
            only), the Hub id does not load, or weights are missing; one line naming the folder.
    """
    location = f"{source.name}/{subfolder}" if subfolder else source.name
    located = {"subfolder": subfolder} if subfolder else {}
    try:
        model, info = model_class.from_pretrained(
            source.name, use_safetensors=True, output_loading_info=True, **located, **source.options(), **options
        )
    except (OSError, ValueError, RuntimeError) as error:
        raise _load_error(model_class, source, location, what, error) from None
    _check_loading_info(info, location, what, hint)
    return model


def _load_error(model_class, source: ModelSource, location: str, what: str, error: Exception) -> MissingWeightsError:
    """One line for a model that did not load: the Hub's reason, the conversion of pickled weights, or the first
    line of the loader's ``error`` with what a folder must hold."""
    if source.hub:
        return hub_error(source, what, error)
    folder = Path(location)
    loader = f"{model_class.__module__.split('.')[0]}.{model_class.__name__}"
    if folder.is_dir() and has_pickled_weights(folder):
        return MissingWeightsError(convert_hint(folder, loader, error))
    detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return MissingWeightsError(
        f"{location}: the {what} could not be loaded ({detail}); pass a folder written by `{loader}"
        ".save_pretrained(DIR)`, with its config.json and safetensors weights."
    )


def _check_loading_info(info: dict, location: str, what: str, hint: str) -> None:
    """Refuse missing or reshaped weights (``MissingWeightsError``); name unused ones in a warning."""
    missing = sorted(map(str, info.get("missing_keys") or ()))
    reshaped = [str(item[0] if isinstance(item, tuple | list) else item) for item in info.get("mismatched_keys") or ()]
    if missing or reshaped or info.get("error_msgs"):
        problem = _count(len(missing), "missing") if missing else _count(len(reshaped), "of another shape")
        raise MissingWeightsError(
            f"{location}: the {what} is incomplete: {problem} in its safetensors ({_some(missing or reshaped)}), "
            f"so it would be partly random; pass the complete folder `save_pretrained` wrote for this model{hint}."
        )
    unexpected = sorted(map(str, info.get("unexpected_keys") or ()))
    if unexpected:
        logger.warning(
            "%s: %d weight(s) of the checkpoint are not used by the %s (%s); they are left out.",
            location,
            len(unexpected),
            what,
            _some(unexpected),
        )


def _count(count: int, state: str) -> str:
    return f"{count} weight{'s' if count != 1 else ''} {'are' if count != 1 else 'is'} {state}"


def _some(names: list[str], count: int = 3) -> str:
    """The first ``count`` of ``names``, comma-separated, with "..." when there are more."""
    return ", ".join(names[:count]) + (", ..." if len(names) > count else "")


def check_tokenizer(tokenizer, location: str, what: str, max_length: int | None = None) -> None:
    """Refuse a tokenizer that was loaded without its files, or that would overrun its text encoder.

    transformers builds a tokenizer of its special tokens alone from a folder that lacks the tokenizer files; every
    word would then be ``<unk>``. Without ``tokenizer_config.json`` its ``model_max_length`` is a huge placeholder,
    past the ``max_length`` positions of the text encoder (when given).

    Raises:
        MissingWeightsError: no vocabulary beyond the special tokens.
        CorruptFileError: ``model_max_length`` beyond ``max_length``.
    """
    specials = set(getattr(tokenizer, "all_special_tokens", ()))
    if len(tokenizer) <= len(specials):
        raise MissingWeightsError(
            f"{location}: the {what} has no tokenizer files (vocab.json and merges.txt, tokenizer.json, or "
            f"spiece.model): its vocabulary is {len(tokenizer)} special tokens, so every word would be unknown; copy "
            "the tokenizer files saved with the model (`tokenizer.save_pretrained(DIR)`) into it."
        )
    if max_length is not None and tokenizer.model_max_length > max_length:
        raise CorruptFileError(
            f"{location}: the {what} takes up to {tokenizer.model_max_length:g} tokens but its text encoder has "
            f"{max_length} positions: its tokenizer_config.json is missing or wrong; copy the one saved with the "
            "model."
        )
