"""What one latent optimization leaves in its folder (``sdo optimize``, and each item ``OUT/items/<i>/`` of a run of
many), every file written atomically:

- ``latent.safetensors``: the final iterate (``result.latent``) with, as metadata, the settings that replay it
  (``LatentTask.settings``). For a pipeline: ``pipeline``, ``prompt``, ``guidance_scale``, ``num_inference_steps``,
  ``height``, ``width``, ``scheduler`` (class name), ``scheduler_config`` (JSON) and ``start_step``; for the embedded
  model: ``class``, ``guidance_scale``, ``num_inference_steps``, ``scheduler`` and ``start_step``. At
  ``start_step`` 0 the plain pipeline replays it: ``pipe([prompt] * B, latents=latent, ...)`` with those settings
  gives ``images/after-<i>.png``. Written only when the method's result is such a latent: FreeDoM guides one
  sampling pass from the unchanged noise and DOODL optimizes an EDICT latent, neither of which the plain pipeline
  replays, so for them no latent file is written (an earlier one in the folder is removed) and ``metrics.json``
  says how to reproduce the images.
- ``images/before-<i>.png`` (the samples of the initial latent) and ``images/after-<i>.png`` (the samples of the
  result: the image of the saved latent), one per batch element at full resolution (``sdo.app.images``).
- ``images/input-<i>.png`` (image editing): the input images. An image file of sdo's own names
  (``before-``, ``after-``, ``input-<i>.png``) that this run did not write (an earlier run's, of a larger batch) is
  removed before ``metrics.json`` is written, so the folder holds this run's images only.
- ``metrics.json``, written last (an item's "done" marker): the caller's metrics with ``settings``, ``replay`` (how
  to reproduce the images), ``images`` (the files) and the task's notes (e.g. ``scheduler_replaced``).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from sdo.app.images import psnr, save_images
from sdo.app.runs import file_records
from sdo.io import save_json
from sdo.latent import OptimizationResult, save_latent
from sdo.methods import METHODS

__all__ = ["replays", "save_result"]

# How to reproduce the images of a method whose result is not a latent the plain sampler replays (the runner says
# why: sdo.methods.Runner.not_a_latent).
_RERUN = "rerun `sdo optimize` with this folder's config.json settings (same --seed) to reproduce images/after-<i>.png"


# The image files save_result writes (sdo.app.images.save_images): what it may remove when a rerun did not write them.
_IMAGE_NAME = re.compile(r"^(before|after|input)-\d+\.png$")


def _remove_stale_images(images: Path, written: list[Path]) -> list[Path]:
    """Remove the files of ``images`` named as sdo names its images (``_IMAGE_NAME``) that are not ``written``: an
    earlier run's images of indices (or an input) this run does not have. Returns what was removed."""
    kept = {path.name for path in written}
    stale = [
        path
        for path in images.iterdir()
        if _IMAGE_NAME.match(path.name) and path.name not in kept and path.is_file() and not path.is_symlink()
    ]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def replays(method: str) -> bool:
    """Whether ``method``'s result is a latent that the plain sampler (or pipeline) replays (its runner says)."""
    return METHODS[method].runner.replays


def _replay_note(method: str, settings: dict) -> str:
    """How to reproduce the images of a run of ``method`` (``metrics.json``'s ``replay``)."""
    runner = METHODS[method].runner
    if not runner.replays:
        return f"not a latent: {runner.not_a_latent}; {_RERUN}"
    if int(settings.get("start_step", 0)):
        return (
            "latent.safetensors holds the latent at step start_step, not initial noise: replay the remaining steps "
            "with sdo (`sdo.from_pipeline(...).sampler(num_inference_steps).sample(latent, start_step=start_step)`, "
            "or `sdo.zoo.ddim_sampler` for the embedded model) and decode"
        )
    if "pipeline" in settings:
        return (
            "latent.safetensors replays in the plain pipeline: pipe([prompt] * B, latents=latent, ...) with its "
            "metadata (guidance_scale, num_inference_steps, height, width, scheduler) gives images/after-<i>.png"
        )
    return (
        "latent.safetensors replays with sdo.zoo.ddim_sampler(zoo.load_unet(), torch.full((B,), class), "
        "num_inference_steps, guidance_scale).sample(latent), which gives images/after-<i>.png"
    )


def save_result(
    folder: str | Path,
    method: str,
    task,
    result: OptimizationResult,
    images: tuple[torch.Tensor, torch.Tensor],
    metrics: dict,
    metadata: dict | None = None,
    files: tuple[str, ...] = (),
) -> dict:
    """Write one optimization's outputs into ``folder`` (see the module docstring), ``metrics.json`` last.

    Args:
        folder: the run's (or the item's) folder.
        method: the method name (``sdo.methods.METHODS``) that produced ``result``.
        task: the ``LatentTask`` optimized (``decode``, ``original``, ``settings``, ``notes``).
        result: what the method returned; ``result.sample`` is the sample of ``result.latent``.
        images: ``(before, after)``, ``task.decode`` of ``task.original`` and of ``result.sample`` (the caller has
            decoded them for its own pictures; a pipeline's VAE runs once per image).
        metrics: what the caller records (config, summary, history, ...).
        metadata: extra ``latent.safetensors`` metadata (e.g. the item), besides ``task.settings``.
        files: the caller's own files in ``folder`` (names), recorded with every file written here.

    Returns:
        The metrics written.
    """
    folder = Path(folder)
    before, after = images
    latent_path = folder / "latent.safetensors"
    if replays(method):
        save_latent(latent_path, result.latent, **task.settings, method=method, **(metadata or {}))
    else:
        latent_path.unlink(missing_ok=True)  # an earlier run's latent would pretend to be this run's
    paths = [*save_images(before, folder / "images", "before"), *save_images(after, folder / "images", "after")]
    edit = {}
    if task.inputs is not None:  # image editing: the input, and how well `before` reconstructs it
        paths += save_images(task.inputs, folder / "images", "input")
        values = psnr(before, task.inputs)
        edit = {"reconstruction_psnr": values, "reconstruction_psnr_mean": sum(values) / len(values)}
    _remove_stale_images(folder / "images", paths)
    record = {
        **metrics,
        "settings": task.settings,
        **task.notes,
        **edit,
        "replay": _replay_note(method, task.settings),
        "images": [str(path.relative_to(folder)) for path in paths],
    }
    written = [*files, *([latent_path.name] if replays(method) else []), *record["images"]]
    record["files"] = file_records(folder, written)  # sizes and hashes: a rerun tells a whole file from a damaged one
    save_json(record, folder / "metrics.json")
    return record
