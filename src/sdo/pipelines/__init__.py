"""Text-to-image pipelines from a folder or a Hub id: Stable Diffusion 1.x/2.x and SDXL (UNet), SD3 and Flux
(transformers with FlowMatch); what the sampler and tasks need.

``from_pipeline`` takes a pipeline object or a folder written by ``save_pretrained`` and returns the model function
(classifier-free guidance over prompt embeddings computed once with the pipeline's own tokenizers and text
encoders), a supported scheduler built from the pipeline's scheduler config, the latent shape, and a
differentiable decoder. One contract holds for every family: with ``parts = from_pipeline(folder, prompt, height=h,
width=w)``, the pipeline's own ``pipe(prompt, latents=parts.initial_latent(s), num_inference_steps=n,
guidance_scale=g, height=h, width=w)`` and ``parts.decode(parts.sampler(n).sample(parts.initial_latent(s)))`` give
the same image (``from_pipeline(..., guidance_scale=g)``; ``pipe.scheduler = parts.scheduler`` when the pipeline's
own scheduler is not one ``sdo`` supports). A pipeline is a folder or a Hub id ``org/name`` (``sdo.hub``): only the
Hub ids given are downloaded, through diffusers' own ``from_pretrained``.

The package: ``loading`` (``load_pipeline``, ``from_pipeline``), one module per family (``sd`` for SD 1.x/2.x,
``sdxl``, ``sd3``, ``flux``, with what they share in ``family``), ``parts`` (``PipelineParts``), ``codec`` (the
VAE's encode and decode), ``inversion`` (the model function an image is inverted under) and ``rewards``
(``DecodedReward``, a latent reward from an image reward). Every public name is importable from ``sdo.pipelines``.
"""

from .flux import pack_latents as pack_latents
from .flux import unpack_latents as unpack_latents
from .loading import DEFAULT_GUIDANCE, FAMILIES, from_pipeline, load_pipeline, size_multiple
from .loading import SUPPORTED as SUPPORTED
from .loading import logger as logger
from .parts import PipelineParts, lora_targets
from .rewards import DecodedReward

__all__ = [
    "DEFAULT_GUIDANCE",
    "FAMILIES",
    "DecodedReward",
    "PipelineParts",
    "from_pipeline",
    "load_pipeline",
    "lora_targets",
    "size_multiple",
]
