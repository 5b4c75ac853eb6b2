"""sdo: Shortcut Diffusion Optimization - gradients through diffusion sampling at the cost of one step.

Method: Dou et al., "You Only Look One Step: Accelerating Backpropagation in Diffusion Sampling with Gradient
Shortcuts" (arXiv 2505.07477). ``Sampler`` owns the denoising loop; a gradient mode (``Shortcut``, ``Full``,
``Checkpointed``, ``Truncated``, ``RandomTruncation``, ``NoGrad``, ``Adjoint``) decides what each step keeps for
backward. The paper's other baselines: ``EDICTSampler`` with ``Invertible`` and ``optimize_latent_doodl`` (DOODL),
and ``freedom_sample`` (FreeDoM guidance).

Layout (``docs/design.md``): the library is the modules of this package (the core: ``gradients``, ``sampling``,
``schedulers``); the callables a user writes are typed in ``protocols`` (``ModelFn``, ``LatentReward``,
``ImageReward``); the applications (the ``sdo`` command, demo, bench, fine-tuning runs) are in ``sdo.app`` and the
embedded model in ``sdo.zoo``. ``import sdo`` loads neither, nor peft, Accelerate, matplotlib or transformers:
``sdo.finetune`` and ``sdo.FinetuneConfig`` are loaded from ``sdo.app.finetuning`` when first used.
"""

from __future__ import annotations

import importlib
from typing import Any

from .adjoint import Adjoint, AdjointStats
from .doodl import optimize_latent_doodl
from .edict import EDICTSampler, Invertible
from .errors import (
    ConfigError,
    CorruptFileError,
    MissingExtraError,
    MissingWeightsError,
    NonFiniteRewardError,
    SdoError,
    WriteFailedError,
)
from .freedom import GuidanceResult, freedom_sample
from .gradients import Checkpointed, Full, GradientMode, NoGrad, RandomTruncation, Shortcut, Truncated
from .latent import OptimizationResult, invert, load_latent, optimize_latent, save_latent
from .models import Denoiser
from .pipelines import from_pipeline
from .protocols import ImageReward, LatentReward, ModelFn
from .sampling import Sampler

# The one place the version is written: pyproject.toml reads it (setuptools `dynamic`), so the installed metadata of
# `shortcut-diffusion` always says the same.
__version__ = "0.2.0"

# Names loaded on first use (PEP 562): the public names that live in the applications layer, and the two errors only
# the applications raise (outside `__all__`; `sdo.errors` is their home, `sdo.OutputLockedError` keeps working).
_LAZY = {
    "finetune": "sdo.app.finetuning",
    "FinetuneConfig": "sdo.app.finetuning",
    "finetuning": "sdo.finetuning",
    "OutputLockedError": "sdo.errors",
    "ResumeMismatchError": "sdo.errors",
}

__all__ = [
    "Adjoint",
    "AdjointStats",
    "Checkpointed",
    "ConfigError",
    "CorruptFileError",
    "Denoiser",
    "EDICTSampler",
    "FinetuneConfig",
    "Full",
    "GradientMode",
    "GuidanceResult",
    "ImageReward",
    "Invertible",
    "LatentReward",
    "MissingExtraError",
    "MissingWeightsError",
    "ModelFn",
    "NoGrad",
    "NonFiniteRewardError",
    "OptimizationResult",
    "RandomTruncation",
    "Sampler",
    "SdoError",
    "Shortcut",
    "Truncated",
    "WriteFailedError",
    "finetune",
    "freedom_sample",
    "from_pipeline",
    "invert",
    "load_latent",
    "optimize_latent",
    "optimize_latent_doodl",
    "save_latent",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'sdo' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    return module if module.__name__ == f"sdo.{name}" else getattr(module, name)
