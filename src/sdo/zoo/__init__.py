"""The embedded model zoo: an MNIST class-conditional diffusion model and two digit classifiers, shipped as
safetensors inside the package (trained by ``sdo train-zoo``; see ``sdo.zoo.train``), so everything runs offline.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..gradients import NoGrad
from ..io import CorruptFileError, load_json, load_tensors
from ..models import Denoiser
from ..sampling import Sampler
from ..schedulers import scheduler_by_name
from .nets import IMAGE_SIZE, NULL_CLASS, NUM_CLASSES, UNET_CONFIG, JudgeNet, RewardNet, build_unet

__all__ = [
    "IMAGE_SIZE",
    "NULL_CLASS",
    "NUM_CLASSES",
    "UNET_CONFIG",
    "WEIGHTS_DIR",
    "ddim_sampler",
    "denoiser",
    "load_digits",
    "load_judge",
    "load_reward_classifier",
    "load_unet",
    "noise",
    "sample_digits",
    "scheduler",
    "weights_dir",
    "zoo_info",
]

WEIGHTS_DIR = Path(__file__).parent / "weights"
_HINT = "Reinstall sdo, or retrain the zoo with `sdo train-zoo --out DIR` and set SDO_ZOO_DIR to that folder."


def weights_dir(override: Path | str | None = None) -> Path:
    """Where the zoo's files are: ``override``, else ``$SDO_ZOO_DIR``, else the weights shipped in the package."""
    return Path(override or os.environ.get("SDO_ZOO_DIR") or WEIGHTS_DIR)


def _load_module(module: torch.nn.Module, name: str, folder: Path | None, device) -> torch.nn.Module:
    path = weights_dir(folder) / f"{name}.safetensors"
    state = load_tensors(path, hint=_HINT)
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        raise CorruptFileError(f"{path}: weights do not fit {type(module).__name__} ({error}). {_HINT}") from error
    return module.to(device).eval().requires_grad_(False)


def load_unet(device: torch.device | str = "cpu", folder: Path | None = None):
    """The embedded ``UNet2DModel`` (epsilon prediction, classes 0-9 and null class 10), frozen, in eval mode."""
    return _load_module(build_unet(), "unet", folder, device)


def load_reward_classifier(device: torch.device | str = "cpu", folder: Path | None = None) -> RewardNet:
    """The classifier the built-in rewards use (frozen)."""
    return _load_module(RewardNet(), "reward_classifier", folder, device)


def load_judge(device: torch.device | str = "cpu", folder: Path | None = None) -> JudgeNet:
    """The independent judge classifier, which no reward sees (frozen)."""
    return _load_module(JudgeNet(), "judge_classifier", folder, device)


def load_digits(device: torch.device | str = "cpu", folder: Path | None = None):
    """The 500 held-out real digits (50 per class, never trained on): ``[500, 1, 32, 32]`` in [-1, 1], labels."""
    from .data import to_model_space

    path = weights_dir(folder) / "digits.safetensors"
    tensors = load_tensors(path, hint=_HINT)
    if set(tensors) != {"images", "labels"}:
        raise CorruptFileError(f"{path}: expected tensors 'images' and 'labels', found {sorted(tensors)}. {_HINT}")
    return to_model_space(tensors["images"]).to(device), tensors["labels"].long().to(device)


def zoo_info(folder: Path | None = None) -> dict:
    """The zoo's ``zoo.json``: the UNet config, the training config, and the measured quality figures."""
    return load_json(weights_dir(folder) / "zoo.json", hint=_HINT)


def scheduler(kind: str = "ddim"):
    """The noise schedule the zoo was trained with (linear betas, 1000 steps), as a ``kind`` sampler.

    ``kind``: "ddim" (default), "ddpm", "dpm++" (DPM-Solver++ order 2) or "euler" (``sdo.schedulers.
    SCHEDULER_NAMES``). Sample clipping is off, so gradients are never cut by a clamp.
    """
    return scheduler_by_name(kind, num_train_timesteps=1000)


def noise(batch: int, seed: int | torch.Generator = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """Initial noise ``[batch, 1, 32, 32]`` for the embedded model, drawn on the CPU from ``seed`` (or from a
    generator, which advances), so that one seed gives the same latents on every device."""
    generator = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator).to(device)


def denoiser(unet, classes: torch.Tensor, guidance_scale: float = 3.0) -> Denoiser:
    """``model_fn`` for the embedded UNet conditioned on ``classes`` ``[batch]``, with classifier-free guidance."""
    return Denoiser(unet, class_labels=classes, null_class_label=NULL_CLASS, guidance_scale=guidance_scale)


def ddim_sampler(unet, classes: torch.Tensor, steps: int, guidance_scale: float = 3.0) -> Sampler:
    """A DDIM ``Sampler`` of ``steps`` over the embedded UNet conditioned on ``classes`` ``[batch]``, guided."""
    return Sampler(denoiser(unet, classes, guidance_scale), scheduler("ddim"), steps)


def to_images(x0: torch.Tensor) -> torch.Tensor:
    """Digits ``[B, 1, 32, 32]`` in [-1, 1] as images in [0, 1] (sdo's image convention, for pictures and PNGs)."""
    return (x0.clamp(-1, 1) + 1) / 2


@torch.no_grad()
def sample_digits(unet, classes: torch.Tensor, guidance_scale: float = 3.0, steps: int = 50, seed: int = 0):
    """Class-conditional DDIM samples ``[len(classes), 1, 32, 32]`` in [-1, 1] (plain sampling, no gradient)."""
    device = next(unet.parameters()).device
    sampler = ddim_sampler(unet, classes.to(device), steps, guidance_scale)
    return sampler.sample(noise(len(classes), seed, device), grad=NoGrad()).clamp(-1, 1)
