"""What a family module gives the loader (``Conditioned``), and what the FlowMatch families (SD3, Flux) share:
the dynamic shift ``mu`` of their schedule.

A family module (``sd``, ``sdxl``, ``sd3``, ``flux``) names its diffusers pipeline class (``PIPELINE_CLASS``), the
components it needs (``REQUIRED``), its pipeline's default guidance scale (``DEFAULT_GUIDANCE``), and conditions the
network as its pipeline's ``__call__`` does (``condition``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from ..models import Denoiser

__all__ = ["Conditioned", "dynamic_shift"]


class Conditioned(NamedTuple):
    """A family's network under the prompts' conditioning, and the latent layout its pipeline samples in.

    Attributes:
        model_fn: ``sdo.Denoiser`` over the network with the prompt embeddings and guidance.
        latent_shape: the layout of the pipeline's ``latents=`` argument (packed for Flux).
        image_latent_shape: ``(batch, channels, height / f, width / f)``, the unpacked latent.
        timestep_options: ``num_inference_steps -> set_timesteps`` extra arguments, or None.
    """

    model_fn: Denoiser
    latent_shape: tuple[int, ...]
    image_latent_shape: tuple[int, int, int, int]
    timestep_options: Callable[[int], dict] | None


def dynamic_shift(sequence: int, config) -> float:
    """The dynamic shift ``mu`` of FlowMatch, linear in the image sequence length (diffusers ``calculate_shift``):
    ``base_shift`` at ``base_image_seq_len`` tokens, ``max_shift`` at ``max_image_seq_len``."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return sequence * slope + base_shift - slope * base_len
