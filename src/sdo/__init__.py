"""sdo: Shortcut Diffusion Optimization - gradients through diffusion sampling at the cost of one step.

Method: Dou et al., "You Only Look One Step: Accelerating Backpropagation in Diffusion Sampling with Gradient
Shortcuts" (arXiv 2505.07477). ``Sampler`` owns the denoising loop; a gradient mode (``Shortcut``, ``Full``,
``Checkpointed``, ``Truncated``, ``RandomTruncation``, ``AlignProp``, ``NoGrad``, ``Adjoint``) decides what each
step keeps for backward. The paper's other baselines: ``EDICTSampler`` with ``Invertible`` and
``optimize_latent_doodl`` (DOODL), and ``freedom_sample`` (FreeDoM guidance).

Layout (``docs/design.md``): the library is the modules of this package (the core: ``gradients``, ``sampling``,
``schedulers``); the callables a user writes are typed in ``protocols`` (``ModelFn``, ``LatentReward``,
``ImageReward``); the applications (the ``sdo`` command, demo, bench, fine-tuning runs) are in ``sdo.app`` and the
embedded model in ``sdo.zoo``. ``import sdo`` loads neither, nor peft, Accelerate, matplotlib or transformers:
``sdo.finetune`` and ``sdo.FinetuneConfig`` are loaded from ``sdo.app.finetuning`` when first used.
"""

from __future__ import annotations

import importlib
from typing import Any

from .adjoint import Adjoint
from .adjoint import AdjointStats as AdjointStats
from .doodl import optimize_latent_doodl
from .edict import EDICTSampler, Invertible
from .errors import ConfigError as ConfigError
from .errors import CorruptFileError as CorruptFileError
from .errors import MissingExtraError as MissingExtraError
from .errors import MissingWeightsError as MissingWeightsError
from .errors import NonFiniteRewardError as NonFiniteRewardError
from .errors import SdoError as SdoError
from .errors import WriteFailedError as WriteFailedError
from .freedom import GuidanceResult as GuidanceResult
from .freedom import freedom_sample
from .gradients import AlignProp, Checkpointed, Full, NoGrad, RandomTruncation, Shortcut, Truncated
from .gradients import GradientMode as GradientMode
from .latent import OptimizationResult as OptimizationResult
from .latent import invert, load_latent, optimize_latent, save_latent
from .models import Denoiser
from .pipelines import from_pipeline
from .protocols import ImageReward as ImageReward
from .protocols import LatentReward as LatentReward
from .protocols import ModelFn as ModelFn
from .sampling import Sampler

# The one place the version is written: pyproject.toml reads it (setuptools `dynamic`), so the installed metadata of
# `shortcut-diffusion` always says the same.
__version__ = "0.2.0"

# Names loaded on first use (PEP 562): the public names that live in the applications layer, and the two errors only
# the applications raise (`sdo.errors` is their home; `sdo.OutputLockedError` keeps working).
_LAZY = {
    "finetune": "sdo.app.finetuning",
    "FinetuneConfig": "sdo.app.finetuning",
    "finetuning": "sdo.finetuning",
    "OutputLockedError": "sdo.errors",
    "ResumeMismatchError": "sdo.errors",
}

# The library's entry points: what a user calls or constructs. Errors (`sdo.errors`), result and statistics types
# (`OptimizationResult`, `GuidanceResult`, `AdjointStats`), the gradient modes' base type and the protocols a user's
# callables satisfy (`sdo.protocols`) stay importable here as `sdo.X` but are not entry points.
__all__ = [
    "Adjoint",
    "AlignProp",
    "Checkpointed",
    "Denoiser",
    "EDICTSampler",
    "FinetuneConfig",
    "Full",
    "Invertible",
    "NoGrad",
    "RandomTruncation",
    "Sampler",
    "Shortcut",
    "Truncated",
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
