"""Fingerprints of what a run reads, so that a resume notices an input that changed behind its back.

A run records one fingerprint per input (``{name: fingerprint}``, a JSON object):

- a file (an aesthetic head, a style image): ``{"kind": "file", "path", "bytes", "mtime_ns", "sha256"}``, and for a
  safetensors file ``header_sha256``, the sha256 of its JSON header;
- a folder (a pipeline, a CLIP or PickScore model): ``{"kind": "folder", "path", "files": {relative path: the
  record of a file}}`` over every file sdo may read (names starting with ``.`` and pickled weights, which sdo never
  loads, are left out);
- a Hub id: ``{"kind": "hub", "id", "revision"}``, the commit its cached snapshot (or the Hub) resolves ``main`` to;
- a loaded pipeline: ``{"kind": "weights", "name", "sha256"}``, a digest over each component's state-dict tensors
  (names, shapes, dtypes, the first and last 16 values and the sum of their bit patterns; sdo's own LoRA left out).

Each file's content is hashed when a run starts, except where a record of the same file (``known``: the folder's
earlier record) has the same path, size and modification time and, for safetensors, the same header: then the
recorded hash is taken (``verify`` rehashes anyway). ``input_changes`` compares two records by content only, so a
copy with new modification times matches. ``callable_fingerprint`` describes a reward function given from Python.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import numbers
import os
import struct
from pathlib import Path

import torch

from sdo.errors import MissingWeightsError
from sdo.hub import hub_cache, model_source, offline
from sdo.io import file_sha256

__all__ = [
    "callable_fingerprint",
    "fingerprint_inputs",
    "fingerprint_path",
    "input_changes",
    "pipeline_fingerprint",
]

_NEVER_READ = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".msgpack", ".h5", ".onnx", ".ot")
"""Weight formats sdo never loads (it reads safetensors only): left out of a folder's fingerprint."""

_SAMPLE = 16  # values taken from each end of a tensor by ``pipeline_fingerprint``


def fingerprint_inputs(paths: dict[str, str], known: dict | None = None, verify: bool = False) -> dict[str, dict]:
    """``{name: fingerprint_path(path)}`` for each input ``paths`` names (``known``: the earlier record by name)."""
    known = known if isinstance(known, dict) else {}
    return {name: fingerprint_path(path, known.get(name), verify) for name, path in paths.items()}


def fingerprint_path(path: str | os.PathLike, known: dict | None = None, verify: bool = False) -> dict:
    """The fingerprint of a file, a folder or a Hub id ``org/name`` (anything else: ``{"kind": "missing"}``, which
    the loader reports). ``known``: an earlier fingerprint of the same input, whose hashes are reused for files of
    unchanged path, size and modification time unless ``verify``."""
    known = known if isinstance(known, dict) and not verify else {}
    local = Path(path).expanduser()
    if local.is_file():
        resolved = str(local.resolve())
        earlier = known if known.get("kind") == "file" and known.get("path") == resolved else None
        return {"kind": "file", "path": resolved, **_file_record(local, earlier)}
    if local.is_dir():
        return _folder_fingerprint(local, known)
    try:
        source = model_source(path, "model")
    except MissingWeightsError:  # not a folder and not a Hub id: the loader says so in its own words
        return {"kind": "missing", "path": os.fspath(path)}
    return {"kind": "hub", "id": source.name, "revision": hub_revision(source.name)}


def _folder_fingerprint(folder: Path, known: dict) -> dict:
    resolved = str(folder.resolve())
    earlier = known.get("files") if known.get("kind") == "folder" and known.get("path") == resolved else None
    earlier = earlier if isinstance(earlier, dict) else {}
    files = {name: _file_record(folder / name, earlier.get(name)) for name in _folder_files(folder)}
    return {"kind": "folder", "path": resolved, "files": files}


def _folder_files(folder: Path) -> list[str]:
    """The relative paths (``/``-separated, sorted) of the files under ``folder`` that sdo may read."""
    names = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            path = Path(root) / name
            if name.startswith(".") or name.endswith(_NEVER_READ) or not path.is_file():
                continue
            names.append(path.relative_to(folder).as_posix())
    return sorted(names)


def _file_record(path: Path, earlier: dict | None) -> dict:
    """``bytes``, ``mtime_ns``, ``sha256`` and (safetensors) ``header_sha256`` of ``path``; the hash is taken from
    ``earlier`` when size, modification time and header are unchanged."""
    status = path.stat()
    record = {"bytes": status.st_size, "mtime_ns": status.st_mtime_ns}
    if path.name.endswith(".safetensors"):
        record["header_sha256"] = _header_sha256(path)
    earlier = earlier if isinstance(earlier, dict) else {}
    unchanged = all(earlier.get(key) == value for key, value in record.items())
    record["sha256"] = earlier["sha256"] if unchanged and isinstance(earlier.get("sha256"), str) else file_sha256(path)
    return record


def _header_sha256(path: Path) -> str | None:
    """The sha256 of a safetensors file's JSON header (None when it has none that fits the file)."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > path.stat().st_size - 8:
                return None
            return hashlib.sha256(handle.read(length)).hexdigest()
    except (OSError, struct.error):
        return None


def hub_revision(repo_id: str) -> str | None:
    """The commit a Hub id's ``main`` resolves to where the model is loaded from: the Hub when it may be reached,
    else the Hugging Face cache's ``refs/main`` (None when neither says)."""
    if not offline():
        try:
            from huggingface_hub import HfApi

            return HfApi().model_info(repo_id).sha
        except Exception:  # unreachable, gated, unknown: the loader falls back to the cache too
            pass
    ref = Path(hub_cache()) / ("models--" + repo_id.replace("/", "--")) / "refs" / "main"
    try:
        return ref.read_text().strip() or None
    except OSError:
        return None


def pipeline_fingerprint(pipe) -> dict:
    """A loaded pipeline's fingerprint: its ``name_or_path`` and a sha256 over each ``torch.nn.Module`` component
    (its name and class, then per tensor of its state dict: name, dtype, shape, the bit patterns of the first and
    last 16 values and the sum of all bit patterns, exact on any device). sdo's LoRA (peft's ``default`` adapter)
    is left out, so a pipeline trained in place by an earlier run fingerprints as its base weights."""
    components = getattr(pipe, "components", None)
    if not isinstance(components, dict):
        components = {"network": pipe} if isinstance(pipe, torch.nn.Module) else {}
    digest = hashlib.sha256()
    for name, component in sorted(components.items()):
        if not isinstance(component, torch.nn.Module):
            continue
        digest.update(f"{name}:{type(component).__qualname__}\n".encode())
        _digest_tensors(digest, _base_state(component))
    name = str(getattr(pipe, "name_or_path", "") or type(pipe).__name__)
    return {"kind": "weights", "name": name, "sha256": digest.hexdigest()}


def _base_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state dict without sdo's LoRA tensors and with peft's ``base_layer`` names put back."""
    state = {}
    for key, value in module.state_dict().items():
        parts = key.split(".")
        if any(part.startswith("lora_") for part in parts) and "default" in parts:
            continue
        state[".".join(part for part in parts if part != "base_layer")] = value
    return state


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _digest_tensors(digest, state: dict[str, torch.Tensor]) -> None:
    sums, described = [], []
    for key in sorted(state):
        tensor = state[key].detach()
        described.append(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}")
        bits = _BITS.get(tensor.element_size())
        if tensor.is_meta or bits is None or tensor.numel() == 0 or tensor.is_quantized:
            continue
        flat = tensor.reshape(-1).view(bits)
        digest.update(flat[:_SAMPLE].cpu().numpy().tobytes() + flat[-_SAMPLE:].cpu().numpy().tobytes())
        sums.append(flat.sum(dtype=torch.int64).cpu())
    digest.update("\n".join(described).encode())
    if sums:
        digest.update(torch.stack(sums).numpy().tobytes())


def callable_fingerprint(fn) -> dict:
    """What identifies a reward given as a Python callable: ``function`` (``module.qualname``; for a callable object
    its class's), ``source_sha256`` (of ``inspect.getsource``, None where Python cannot read it) and
    ``values_sha256``, a hash of the values it carries that are numbers, strings, bools, None or tensors (or
    tuples and lists of them): a function's closure variables and defaults, a ``functools.partial``'s arguments,
    an object's attributes (``vars``), a bound method's object's attributes. So ``make_reward(3)`` and
    ``make_reward(8)`` differ."""
    values: list = []
    target = fn
    while isinstance(target, functools.partial):
        values += [("partial_args", target.args), ("partial_keywords", sorted(target.keywords.items()))]
        target = target.func
    owner = getattr(target, "__self__", None)
    function = getattr(target, "__func__", target)
    if inspect.isfunction(function):
        described = function
        values += _function_values(function)
        if owner is not None:
            values += sorted(_attributes(owner), key=lambda item: item[0])
    else:  # a callable object: its class, and its attributes
        described = type(target)
        values += sorted(_attributes(target), key=lambda item: item[0])
    name = f"{getattr(described, '__module__', '?')}.{getattr(described, '__qualname__', type(described).__name__)}"
    try:
        source_sha256 = hashlib.sha256(inspect.getsource(described).encode()).hexdigest()
    except (OSError, TypeError):
        source_sha256 = None
    digest = hashlib.sha256()
    for label, value in values:
        token = _token(value)
        if token is not None:
            digest.update(f"{label}={token}\n".encode())
    return {"function": name, "source_sha256": source_sha256, "values_sha256": digest.hexdigest()}


def _function_values(function) -> list[tuple[str, object]]:
    values = []
    for name, cell in zip(function.__code__.co_freevars, function.__closure__ or (), strict=False):
        try:
            values.append((f"closure {name}", cell.cell_contents))
        except ValueError:  # an empty cell
            continue
    values.append(("defaults", function.__defaults__ or ()))
    values += [(f"default {k}", v) for k, v in sorted((function.__kwdefaults__ or {}).items())]
    return values


def _attributes(owner) -> list[tuple[str, object]]:
    try:
        return [(f"attribute {key}", value) for key, value in vars(owner).items()]
    except TypeError:  # no __dict__
        return []


def _token(value) -> str | None:
    """A stable text for a value of the kinds a fingerprint covers, else None (left out)."""
    if value is None or isinstance(value, (bool, str)):
        return json.dumps(value)
    if isinstance(value, numbers.Number):
        return f"{type(value).__name__}:{value!r}"
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        bits = _BITS.get(tensor.element_size())
        data = tensor.reshape(-1).view(bits).numpy().tobytes() if bits and tensor.numel() else b""
        return f"tensor:{tensor.dtype}:{tuple(tensor.shape)}:{hashlib.sha256(data).hexdigest()}"
    if isinstance(value, (tuple, list)):
        tokens = [_token(item) for item in value]
        return None if any(t is None for t in tokens) else f"{type(value).__name__}[{','.join(tokens)}]"
    return None


def input_changes(recorded: dict, current: dict, labels: dict[str, str] | None = None) -> list[str]:
    """One line per input whose content differs between the fingerprints ``recorded`` (the folder's run) and
    ``current`` (this run), compared by content only (hashes, revisions), each naming the input by its entry in
    ``labels`` (default: the flag of its name, ``clip_path`` -> ``--clip-path``)."""
    labels = labels or {}
    changes = []
    for name in sorted(set(recorded) | set(current), key=lambda n: (n not in current, n)):
        old, new = recorded.get(name), current.get(name)
        label = labels.get(name) or _label(name, new if isinstance(new, dict) else old)
        detail = _difference(old if isinstance(old, dict) else {}, new if isinstance(new, dict) else {})
        if detail:
            changes.append(f"{label} changed since the folder's run ({detail})")
    return changes


def _label(name: str, fingerprint: dict | None) -> str:
    fingerprint = fingerprint or {}
    if fingerprint.get("kind") == "weights":
        return f"`{name}=` (a loaded pipeline, {fingerprint.get('name')})"
    where = fingerprint.get("path") or fingerprint.get("id") or ""
    return f"--{name.replace('_', '-')}" + (f" {where}" if where else "")


def _content(fingerprint: dict) -> object:
    kind = fingerprint.get("kind")
    if kind == "file":
        return fingerprint.get("sha256")
    if kind == "folder":
        files = fingerprint.get("files")
        return {k: v.get("sha256") for k, v in files.items() if isinstance(v, dict)} if isinstance(files, dict) else {}
    if kind == "hub":
        return fingerprint.get("revision")
    if kind == "weights":
        return fingerprint.get("sha256")
    return None


def _short(value: object) -> str:
    return value[:12] if isinstance(value, str) else json.dumps(value)


def _difference(old: dict, new: dict) -> str | None:
    """What differs between two fingerprints of one input, in a few words (None: the same content)."""
    if not old:
        return "the folder's run did not read it"
    if not new:
        return "this run does not read it"
    if old.get("kind") != new.get("kind"):
        return f"a {old.get('kind')} then, a {new.get('kind')} now"
    before, after = _content(old), _content(new)
    if before == after:
        return None
    kind = new.get("kind")
    if kind == "hub":
        return f"revision {_short(before)} -> {_short(after)}"
    if kind == "folder":
        return _folder_difference(before, after)
    return f"sha256 {_short(before)} -> {_short(after)}"


def _folder_difference(before: dict, after: dict) -> str:
    lines = []
    for name in sorted(set(before) | set(after), key=lambda n: (not n.endswith(".safetensors"), n)):  # weights first
        if name not in after:
            lines.append(f"{name} removed")
        elif name not in before:
            lines.append(f"{name} added")
        elif before[name] != after[name]:
            lines.append(f"{name}: sha256 {_short(before[name])} -> {_short(after[name])}")
    more = f"; and {len(lines) - 1} more file{'s' if len(lines) > 2 else ''}" if len(lines) > 1 else ""
    return lines[0] + more
