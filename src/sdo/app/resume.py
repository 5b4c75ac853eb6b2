"""The resume protocol of ``sdo finetune``: open the output folder, decide whether a rerun resumes, restore it.

A fine-tuning folder records its run's settings (``config.json``, and each checkpoint's ``state.json``). A rerun
with the same result-changing settings resumes from the newest checkpoint; one with other settings is refused with
the flags that differ (``ResumeMismatchError``). The settings are the config's fields plus what describes data
given as Python objects: the pipeline's ``name_or_path`` and the sha256 of the prompt lists (``prompt_digest``), a
reward function's name and hashes (``REWARD_KEYS``), and the fingerprint of every input file, folder, Hub id or
loaded pipeline (``inputs``, ``sdo.app.fingerprints``), compared by content: a changed input is refused like a
changed flag, naming it. A folder recorded before inputs were fingerprinted resumes with a warning.
The folder's ownership (its marker), lock and leftovers are handled by ``sdo.app.runs``; ``check_finetune_paths``
checks ``--out`` and ``--save-pipeline`` against the run's inputs before any model loads.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from sdo.app.checkpoints import Checkpoint, latest_checkpoint, optimizer_from_tensors
from sdo.app.fingerprints import input_changes
from sdo.app.lora import load_trainable
from sdo.app.runs import (
    RunLock,
    check_apart,
    check_command,
    check_owned,
    check_run,
    check_save_folder,
    check_writable,
    clean_leftovers,
    describe_run,
    differing_flags,
    flag,
    input_folders,
    model_bytes,
    write_config,
)
from sdo.errors import OutputLockedError, ResumeMismatchError, SdoError
from sdo.io import CorruptFileError, atomic_path

__all__ = [
    "INPUTS_KEY",
    "PROMPT_DIGESTS",
    "RESUME_FREE",
    "REWARD_KEYS",
    "MetricsLog",
    "check_finetune_paths",
    "check_resume",
    "open_finetune_output",
    "prompt_digest",
    "recorded_inputs",
    "restore",
]

RESUME_FREE = frozenset(
    {
        "out",
        "eval_every",
        "checkpoint_every",
        "checkpoint_kept",
        "device",
        "tensorboard",
        "report_to",
        "save_pipeline",
        "eval_prompts",
        "verify",
        "max_pixels",
        "memory_budget",
        "auto",
    }
)
"""Settings a rerun may change without changing the trained weights: where the folder is, how often it
evaluates and checkpoints, what it evaluates on, whether the graphed steps are recomputed in backward (same
gradient, less memory), the device (same computation, other hardware), logging, where the fused pipeline
goes, whether the inputs are rehashed, and ``--method auto``'s budget and choice (a resume takes the recorded
choice). ``steps`` may grow; every other setting must match the run the folder
holds."""

PROMPT_DIGESTS = {"prompts_sha256": "training prompt list"}
"""Recorded digests that must match on resume, and what each describes in the refusal message."""

REWARD_KEYS = {
    "reward_function": "reward function",
    "reward_source_sha256": "source of the reward function (sha256)",
    "reward_values_sha256": "reward function's closure values, defaults or attributes (sha256)",
}
"""What a run trained on a Python reward function records (``sdo.app.fingerprints.callable_fingerprint``), and
what each describes in the refusal message."""

INPUTS_KEY = "inputs"
"""The recorded fingerprints of the run's inputs: ``{name: fingerprint}`` (``sdo.app.fingerprints``)."""


def prompt_digest(prompts: list[str]) -> str:
    """The sha256 of a prompt list (its JSON form: order and every character count), as ``config.json`` records
    it in place of the list."""
    return hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()


def check_finetune_paths(config, pipeline) -> None:
    """Before any model loads or training, the paths of a fine-tuning run of ``config`` on ``pipeline`` (a folder,
    a Hub id or a loaded pipeline): ``--out`` apart from the folders the run reads (``input_folders``: the
    pipeline, CLIP and PickScore folders), and ``--save-pipeline`` a folder sdo may write (``check_save_folder``:
    new, empty or this run's earlier save, apart from ``--out``, the inputs and the current directory, with room
    for the pipeline). Each refusal is a one-line ``ConfigError`` naming the flag."""
    inputs = input_folders(config, pipeline)
    check_apart("--out", config.out, inputs)
    if config.save_pipeline:
        check_save_folder(config.save_pipeline, config.out, inputs, model_bytes(pipeline))


def open_finetune_output(accelerator, out: Path, settings: dict, defaults: dict, break_lock: bool):
    """Before any model loads: on the main process, check ``out`` is new, empty or sdo's (``check_owned``) and
    writable, lock it, check that it holds a fine-tuning run (``check_run``) with the same ``settings``
    (``check_resume``), clean a killed run's leftovers and record the marker and ``config.json``.
    Every process then gets the outcome (the lock is shared through the main process). Returns the lock (None on
    other processes) and the checkpoint to resume from (None if there is none)."""
    lock, error, checkpoint = None, None, None
    if accelerator.is_main_process:
        try:
            check_owned(out)
            check_writable(out)
            lock = RunLock(out, "finetune", break_lock).acquire()
            check_run(out, describe_run("finetune", settings))
            checkpoint = check_resume(out, settings, defaults)
            clean_leftovers(out)
            write_config(out, "finetune", settings)
        except SdoError as caught:
            error = caught
            if lock is not None:
                lock.release()
    if accelerator.num_processes > 1:
        failed = accelerator.reduce(torch.tensor(float(error is not None), device=accelerator.device), "sum")
        if float(failed) and error is None:
            raise OutputLockedError(f"{out}: the main process could not open the output folder (see its error).")
    if error is not None:
        raise error
    if not accelerator.is_main_process:
        checkpoint = latest_checkpoint(out / "checkpoints")
    return lock, checkpoint


def check_resume(out: Path, settings: dict, defaults: dict) -> Checkpoint | None:
    """The checkpoint to resume from in ``out``, if any. Its run (the checkpoint's settings, else ``config.json``)
    must have the same result-changing ``settings`` (a field it lacks counts as its entry in ``defaults``; a
    digest it lacks is not compared); ``steps`` may not drop below the updates done."""
    recorded = check_command(out, "finetune")
    checkpoint = latest_checkpoint(out / "checkpoints")
    if checkpoint is None:
        return None  # nothing to resume: the run starts over
    saved = checkpoint.state.get("config") if isinstance(checkpoint.state.get("config"), dict) else recorded
    if saved is None:
        return checkpoint
    _refuse_former_alignprop(out, saved)
    changes = [
        f"a different {what} (sha256 {settings.get(key)}; the folder's run used {saved[key]})"
        for key, what in PROMPT_DIGESTS.items()
        if key in saved and saved[key] != settings.get(key)
    ]
    changes += _input_changes(out, saved, settings)
    free = RESUME_FREE | {"steps", INPUTS_KEY, "task", "reward"} | set(PROMPT_DIGESTS) | set(REWARD_KEYS)
    if not (INPUTS_KEY not in saved and settings.get("reward_function")):  # else recorded before a Python reward
        changes += _reward_change(saved, settings)  # left them unset: they named no reward then
    changes += differing_flags(saved, settings, defaults, free)
    if settings["steps"] < checkpoint.step:
        changes.insert(0, f"--steps {settings['steps']} is below the {checkpoint.step} updates already done")
    if changes:
        free = ", ".join(flag(name) for name in sorted(RESUME_FREE - {"out"}))
        raise ResumeMismatchError(
            f"{out} holds a run with other settings: {'; '.join(changes)}. To resume it, rerun with its settings "
            f"(only --steps may grow; {free} may change), or choose another --out."
        )
    return checkpoint


def _refuse_former_alignprop(out: Path, saved: dict) -> None:
    """Refuse a folder trained with sdo's former ``alignprop`` (one depth per trajectory, recorded with
    ``alignprop_high``): the name now means the official algorithm (a threshold per step), so resuming would switch
    estimators mid-run. Its estimator is ``random-truncation`` now."""
    if saved.get("method") == "alignprop" and "truncation_high" not in saved:
        raise ResumeMismatchError(
            f"{out} was trained with sdo's former alignprop (one depth per trajectory, now --method "
            "random-truncation); alignprop now follows the official code (a threshold per step), so this run "
            "cannot be resumed: choose another --out."
        )


def _reward_change(saved: dict, settings: dict) -> list[str]:
    """``--reward OLD -> NEW`` (``--task`` on the embedded model) when the reward the folder's run chose is not this
    run's. A pipeline's reward is compared whichever flag chose it (a run recorded before ``--reward`` replaced
    ``--task`` there holds it in ``task``)."""
    old, new = (record.get("reward") or record.get("task") for record in (saved, settings))
    name = "--reward" if settings.get("reward") else "--task"
    return [] if old == new else [f"{name} {json.dumps(old)} -> {json.dumps(new)}"]


def _input_changes(out: Path, saved: dict, settings: dict) -> list[str]:
    """The refusal lines for inputs and a reward function that differ from the folder's run. A run recorded before
    they were (no ``inputs`` key) is not checked: a one-line warning on stderr says so."""
    if not isinstance(saved.get(INPUTS_KEY), dict):
        if settings.get(INPUTS_KEY) or settings.get("reward_function"):
            print(
                f"sdo: {out} was recorded before sdo fingerprinted its inputs; resuming without checking that the "
                "pipeline, reward models, images and reward function are the ones it was trained on.",
                file=sys.stderr,
            )
        return []
    changes = [
        f"a different {what} ({json.dumps(settings.get(key))}; the folder's run used {json.dumps(saved.get(key))})"
        for key, what in REWARD_KEYS.items()
        if saved.get(key) != settings.get(key)
    ]
    return changes[:1] + input_changes(saved[INPUTS_KEY], settings.get(INPUTS_KEY) or {})  # the reward: its first


def recorded_inputs(out: str | Path) -> dict:
    """The input fingerprints ``out/config.json`` records (an empty dict when there are none or it is unreadable):
    what a new run of the folder may take its unchanged files' hashes from."""
    try:
        recorded = check_command(out, "finetune")
    except SdoError:
        return {}
    inputs = (recorded or {}).get(INPUTS_KEY)
    return inputs if isinstance(inputs, dict) else {}


def restore(checkpoint: Checkpoint | None, network, optimizer, lora: bool, accelerator) -> int:
    """Put ``checkpoint``'s trainable weights into ``network`` and its state into ``optimizer``; returns the
    update it was taken after (0 without a checkpoint)."""
    if checkpoint is None:
        return 0
    weights = {k: v.to(accelerator.device) for k, v in checkpoint.weights.items()}
    load_trainable(network, weights, lora, source=checkpoint.path / "weights.safetensors")
    optimizer_from_tensors(optimizer, checkpoint.optimizer_tensors, checkpoint.state)
    if accelerator.is_main_process:
        print(f"Resuming from {checkpoint.path} (step {checkpoint.step}).")
    return checkpoint.step


class MetricsLog:
    """``metrics.jsonl``, rewritten atomically at each update; on resume, entries after the checkpoint are dropped."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        self.records: list[dict] = []
        if path.is_file() and resume_step:
            self.records = [record for record in self._read() if record["step"] <= resume_step]

    def _read(self) -> list[dict]:
        records = []
        for number, line in enumerate(self.path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise CorruptFileError(f"{self.path}, line {number}: not valid JSON ({error.msg}).") from None
            if (
                not isinstance(record, dict)
                or isinstance(record.get("step"), bool)
                or not isinstance(record.get("step"), int)
            ):
                raise CorruptFileError(f"{self.path}, line {number}: not a metrics record with an integer 'step'.")
            records.append(record)
        return records

    def append(self, record: dict) -> None:
        """Add ``record`` and rewrite the file atomically."""
        self.records.append(record)
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
