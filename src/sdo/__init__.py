"""sdo: Shortcut Diffusion Optimization - gradients through diffusion sampling at the cost of one step.

Method: Dou et al., "You Only Look One Step: Accelerating Backpropagation in Diffusion Sampling with Gradient
Shortcuts" (arXiv 2505.07477). ``Sampler`` owns the denoising loop; a gradient mode (``Shortcut``, ``Full``,
``Checkpointed``, ``Truncated``, ``RandomTruncation``, ``NoGrad``) decides what each step keeps for backward.
"""

from .finetuning import FinetuneConfig, finetune
from .gradients import Checkpointed, Full, GradientMode, NoGrad, RandomTruncation, Shortcut, Truncated
from .latent import OptimizationResult, invert, load_latent, optimize_latent, save_latent
from .models import Denoiser
from .pipelines import from_pipeline
from .sampling import Sampler

__version__ = "0.1.0"

__all__ = [
    "Checkpointed",
    "Denoiser",
    "FinetuneConfig",
    "Full",
    "GradientMode",
    "NoGrad",
    "OptimizationResult",
    "RandomTruncation",
    "Sampler",
    "Shortcut",
    "Truncated",
    "finetune",
    "from_pipeline",
    "invert",
    "load_latent",
    "optimize_latent",
    "save_latent",
]
