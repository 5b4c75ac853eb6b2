"""Training checkpoints: written atomically as a folder (temporary name, then one rename), read back with the
previous one as a fallback when the newest is damaged. Only safetensors and JSON, never pickle.

A checkpoint is whole only when its files are: ``state.json`` records each tensor file's size and SHA-256, and a
checkpoint whose files are missing, of another size or another hash is skipped like any damaged one. A write that
fails (a full disk) removes the half-built folder and leaves the previous checkpoints as they were."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from sdo.app.runs import damaged_file, file_records
from sdo.io import DIR_MODE, CorruptFileError, load_json, load_tensors, make_dir, save_json, save_tensors

__all__ = ["Checkpoint", "latest_checkpoint", "optimizer_from_tensors", "optimizer_to_tensors", "save_checkpoint"]

_PREFIX = "step-"
_TENSOR_FILES = ("weights.safetensors", "optimizer.safetensors")


@dataclass
class Checkpoint:
    """A loaded checkpoint: the step it was taken after, trainable weights, optimizer state, and its folder."""

    step: int
    weights: dict[str, torch.Tensor]
    optimizer_tensors: dict[str, torch.Tensor]
    state: dict
    path: Path


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Adam-style optimizer state as flat tensors ``state.{param}.{key}`` plus JSON-able param groups."""
    state = optimizer.state_dict()
    tensors = {
        f"state.{index}.{key}": torch.as_tensor(value)
        for index, entry in state["state"].items()
        for key, value in entry.items()
    }
    return tensors, {"param_groups": state["param_groups"]}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: dict) -> None:
    """Inverse of ``optimizer_to_tensors``."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups["param_groups"]})


def save_checkpoint(
    folder: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    extra: dict,
    keep: int = 2,
) -> Path:
    """Write ``folder/step-NNNNNN/`` atomically (built under a temporary name, then renamed); keep the newest
    ``keep`` checkpoints. A process killed at any moment leaves either the previous set or the new one; a write
    that fails removes the half-built folder and raises (the previous checkpoints are untouched)."""
    make_dir(folder)
    final = folder / f"{_PREFIX}{step:06d}"
    building = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=folder))
    try:
        os.chmod(building, DIR_MODE)  # mkdtemp creates 0700
        optimizer_tensors, groups = optimizer_to_tensors(optimizer)
        save_tensors(weights, building / "weights.safetensors")
        save_tensors(optimizer_tensors, building / "optimizer.safetensors")
        files = file_records(building, list(_TENSOR_FILES))
        save_json({"step": step, **groups, **extra, "files": files}, building / "state.json")
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(building, final)
    for old in _checkpoint_folders(folder)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _checkpoint_folders(folder: Path) -> list[Path]:
    """Finished checkpoint folders, newest first (temporary ones, starting with '.', are ignored)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]), reverse=True)


def latest_checkpoint(folder: Path) -> Checkpoint | None:
    """The newest checkpoint that loads; a damaged one is reported (warning naming the file) and skipped."""
    for path in _checkpoint_folders(folder):
        try:
            state = _check_state(path / "state.json", load_json(path / "state.json"))
            if "files" in state:  # checkpoints written before the record was kept are checked by loading only
                problem = damaged_file(path, state["files"], verify=True)
                if problem:
                    raise CorruptFileError(problem)
            optimizer_tensors = load_tensors(path / "optimizer.safetensors")
            for name in optimizer_tensors:
                if not re.fullmatch(r"state\.\d+\..+", name):
                    raise CorruptFileError(f"{path / 'optimizer.safetensors'}: unexpected tensor {name!r}.")
            return Checkpoint(
                state["step"], load_tensors(path / "weights.safetensors"), optimizer_tensors, state, path
            )
        except (CorruptFileError, KeyError, ValueError, TypeError) as error:
            warnings.warn(f"Skipping damaged checkpoint {path}: {error}", stacklevel=2)
    return None


def _check_state(path: Path, state: object) -> dict:
    """``state.json`` must be an object with an integer ``step`` matching its folder and a list of
    ``param_groups`` objects that each list their ``params``."""
    if not isinstance(state, dict):
        raise CorruptFileError(f"{path}: expected a JSON object, got {type(state).__name__}.")
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or f"{_PREFIX}{step:06d}" != path.parent.name:
        raise CorruptFileError(f"{path}: 'step' is {step!r}, which does not match the folder {path.parent.name}.")
    groups = state.get("param_groups")
    if not isinstance(groups, list) or not groups or not all(isinstance(g, dict) and "params" in g for g in groups):
        raise CorruptFileError(f"{path}: 'param_groups' is missing or not a list of optimizer parameter groups.")
    return state
