"""sdo: Shortcut Diffusion Optimization - gradients through diffusion sampling at the cost of one step.

Method: Dou et al., "You Only Look One Step: Accelerating Backpropagation in Diffusion Sampling with Gradient
Shortcuts" (arXiv 2505.07477). ``Sampler`` owns the denoising loop; a gradient mode (``Shortcut``, ``Full``,
``Checkpointed``, ``Truncated``, ``RandomTruncation``, ``NoGrad``) decides what each step keeps for backward.
"""

from .gradients import Checkpointed, Full, GradientMode, NoGrad, RandomTruncation, Shortcut, Truncated
from .models import Denoiser
from .sampling import Sampler

__version__ = "0.1.0"

__all__ = [
    "Checkpointed",
    "Denoiser",
    "Full",
    "GradientMode",
    "NoGrad",
    "RandomTruncation",
    "Sampler",
    "Shortcut",
    "Truncated",
]
