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
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from . import inversion
from .checks import check_guidance, check_text
from .errors import ConfigError, CorruptFileError, MissingWeightsError
from .hub import ModelSource, check_tokenizer, hub_error, load_model, model_source
from .io import convert_hint, has_pickled_weights, load_json
from .models import Denoiser
from .sampling import Sampler
from .schedulers import SUPPORTED_SCHEDULERS, prediction_type, scheduler_by_name

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

logger = logging.getLogger(__name__)

# Pipeline class -> family, and the components each family needs.
FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}
_REQUIRED = {
    "sd": ("unet", "vae", "text_encoder", "tokenizer"),
    "sdxl": ("unet", "vae", "text_encoder_2", "tokenizer_2"),
    "sd3": ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
    "flux": ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
}
SUPPORTED = (
    "StableDiffusionPipeline (SD 1.x/2.x), StableDiffusionXLPipeline (SDXL), StableDiffusion3Pipeline (SD3) "
    "and FluxPipeline (Flux)"
)
# Each family's own default guidance scale (its pipeline's ``__call__`` default), what ``from_pipeline`` uses.
DEFAULT_GUIDANCE = {"sd": 7.5, "sdxl": 5.0, "sd3": 7.0, "flux": 3.5}
_UNET_LORA_TARGETS = "to_q,to_k,to_v,to_out.0"
_TRANSFORMER_LORA_TARGETS = "to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out"


@dataclass
class PipelineParts:
    """The pieces of a pipeline that ``Sampler`` and the tasks use.

    Attributes:
        model_fn: ``sdo.Denoiser`` over the network with the prompt embeddings and guidance.
        scheduler: a supported diffusers scheduler built from the pipeline's scheduler config.
        latent_shape: the layout of the pipeline's ``latents=`` argument: ``(batch, channels, height / f, width / f)``
            with the VAE factor ``f``, or for Flux the packed ``(batch, (height / 2f) (width / 2f), 4 channels)``.
        decode: ``latents -> images [B, 3, H, W] in [0, 1]`` (unpacked, unscaled and unshifted as the pipeline
            does, then ``vae.decode``, then ``(x / 2 + 0.5).clamp(0, 1)`` as diffusers' image processor),
            differentiable. ``[0, 1]`` float images are sdo's image convention (``sdo.ImageReward``).
        unet, vae: the denoising network (the UNet, or the transformer of SD3 and Flux) and the VAE, frozen.
        prompt_embeds, negative_embeds: ``[B, tokens, dim]`` and ``[1, tokens, dim]`` (None where the pipeline
            runs no classifier-free guidance, e.g. Flux without a negative prompt); ``prompt_embeds`` requires grad
            when asked for (embedding optimization).
        pooled_embeds: ``[B, dim]`` pooled prompt embeddings (SDXL, SD3, Flux; None for SD 1.x/2.x), requiring grad
            with ``prompt_embeds``.
        family: "sd", "sdxl", "sd3" or "flux".
        timestep_options: ``num_inference_steps -> set_timesteps`` extra arguments (Flux and dynamically shifted
            SD3: ``sigmas``/``mu``), as the pipeline passes them.
        image_latent_shape: ``(batch, channels, height / f, width / f)``, the unpacked latent.
        prompts: the prompt batch the embeddings were computed from (what image rewards receive).
    """

    model_fn: Denoiser
    scheduler: object
    latent_shape: tuple[int, ...]
    decode: Callable[[torch.Tensor], torch.Tensor]
    unet: torch.nn.Module
    vae: torch.nn.Module
    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor | None
    pooled_embeds: torch.Tensor | None = None
    family: str = "sd"
    timestep_options: Callable[[int], dict] | None = None
    image_latent_shape: tuple[int, int, int, int] | None = None
    lora_targets: str = field(default=_UNET_LORA_TARGETS)
    prompts: list[str] = field(default_factory=list)

    def latent_reward(self, image_reward: Callable[[torch.Tensor, list[str]], torch.Tensor]) -> DecodedReward:
        """The latent reward ``r(x0, cond) = image_reward(decode(x0), prompts)`` of an image reward (``sdo``'s image
        convention: ``image_reward(images [B, 3, H, W] in [0, 1], prompts) -> [B]``, differentiable in
        ``images``), for ``optimize_latent`` and every other latent-reward API; no decoding by hand."""
        return DecodedReward(image_reward, self.decode, self.prompts)

    def sampler(self, num_inference_steps: int = 50, model_fn: Callable | None = None, **options) -> Sampler:
        """A ``Sampler`` over this pipeline's model (or ``model_fn``) and scheduler, with the pipeline's timestep
        arguments; it takes the initial latent as the pipeline's ``latents=`` does (unit noise, ``scale_noise``).
        ``options`` go to ``Sampler`` (e.g. ``compile``)."""
        timesteps = self.timestep_options(num_inference_steps) if self.timestep_options else None
        return Sampler(
            model_fn or self.model_fn,
            self.scheduler,
            num_inference_steps,
            timestep_options=timesteps,
            scale_noise=True,
            **options,
        )

    def initial_latent(self, seed: int = 0, batch: int | None = None) -> torch.Tensor:
        """Float32 unit Gaussian noise from ``seed`` in the layout the pipeline's ``latents=`` takes
        (``latent_shape``; for Flux, the noise of ``image_latent_shape`` packed into 2x2 patches), of ``batch``
        samples (defaults to the prompt batch)."""
        shape = self.image_latent_shape or self.latent_shape
        shape = (batch or shape[0], *shape[1:])
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        if self.family == "flux":
            noise = pack_latents(noise)
        return noise.to(self.prompt_embeds.device)

    @property
    def image_size(self) -> tuple[int, int]:
        """``(height, width)`` of this pipeline's images (what ``decode`` returns and ``encode`` takes)."""
        shape = self.image_latent_shape or self.latent_shape
        factor = _vae_factor(self.vae)
        return shape[2] * factor, shape[3] * factor

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]`` at ``image_size`` -> latents ``[B, ...]`` in the layout of
        ``initial_latent`` and the sampler (``latent_shape`` with batch ``B``), the inverse of ``decode``.

        ``vae.encode(2 images - 1).latent_dist.mean`` (the posterior mean: deterministic, no sampling), then the
        latent scaling as the pipelines' image-to-image variants do it: ``(z - shift_factor) * scaling_factor``
        (SD3, Flux; shift 0 for SD), or ``(z - latents_mean) * scaling_factor / latents_std`` when the VAE has
        per-channel statistics (SDXL variants), then Flux's 2x2 packing. Float32 out, whatever the VAE's dtype.
        ``decode(encode(x))`` is ``x`` up to the VAE's own reconstruction error; ``encode`` undoes ``decode``'s
        arithmetic exactly. Differentiable.

        Raises:
            ConfigError: ``images`` is not ``[B, 3, H, W]`` (``B >= 1``) at this pipeline's size, or holds values
                outside [0, 1].
        """
        _check_images(images, self.image_size)
        return _encoder(self.vae, self.family)(images)

    def invert(
        self,
        images: torch.Tensor,
        step: int,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        *,
        fixed_point_iters: int = 0,
    ) -> torch.Tensor:
        """The latent at schedule index ``step`` of ``num_inference_steps`` whose sampling gives ``images``:
        ``encode``, then deterministic inversion under the prompts' conditioning (``sdo.inversion.invert``: DDIM
        inversion for DDIM with epsilon or v-prediction; for Euler and FlowMatch the ODE run backwards).

        ``self.sampler(num_inference_steps).sample(latent, sdo.NoGrad(), start_step=step)`` then reconstructs
        the encoded latent (exactly when the network's output does not depend on its input; otherwise up to the
        inversion error, smallest with the inversion's and the sampler's guidance equal). Image ``b`` is inverted
        under prompt ``b`` (or the one prompt, for any batch).

        Args:
            images: ``[B, 3, H, W]`` in ``[0, 1]`` at ``image_size``.
            step: the schedule index to invert to, in ``[0, num_inference_steps - 1]`` (the ``start_step`` of
                the sampling or optimization that continues from it).
            num_inference_steps: length of the schedule.
            guidance_scale: classifier-free guidance of the inversion (1.0: the conditional prediction alone, the
                usual choice); for a guidance-distilled Flux, the embedded guidance. Record it with the latent.
            fixed_point_iters: refinements of each inverted state (``sdo.inversion.invert``).

        Raises:
            ConfigError: bad ``images`` (as ``encode``), ``step`` or ``num_inference_steps`` out of range, or a
                ``guidance_scale`` that is not a finite number in [0, 1000].
        """
        check_guidance(guidance_scale, "guidance_scale")
        latents = self.encode(images)
        model_fn = self.model_fn
        if latents.shape[0] != model_fn.encoder_hidden_states.shape[0]:
            if model_fn.encoder_hidden_states.shape[0] != 1:
                raise ConfigError(
                    f"{latents.shape[0]} images but {model_fn.encoder_hidden_states.shape[0]} prompts; pass one "
                    "prompt, or one per image."
                )
            model_fn = model_fn.rows(torch.zeros(latents.shape[0], dtype=torch.long))
        if model_fn.guidance_embedding is not None:  # guidance-distilled Flux: the guidance is an input
            model_fn = replace(model_fn, guidance_embedding=guidance_scale)
        else:
            model_fn = replace(model_fn, guidance_scale=guidance_scale)
        sampler = self.sampler(num_inference_steps, model_fn=model_fn)
        return inversion.invert(sampler, latents, step, fixed_point_iters=fixed_point_iters)


class DecodedReward:
    """A latent reward from an image reward: ``r(x0, cond) = image_reward(decode(x0), prompts)``.

    ``image_reward(images, prompts) -> [B]`` takes float images ``[B, 3, H, W]`` in ``[0, 1]`` and the prompt batch
    (``sdo.ImageReward``); ``cond``, when it is a ``[B]`` tensor of prompt indices, picks the prompts. ``last_terms``
    passes a weighted reward's unweighted terms through (``sdo.rewards.WeightedReward``).
    """

    def __init__(
        self,
        image_reward: Callable[[torch.Tensor, list[str]], torch.Tensor],
        decode: Callable[[torch.Tensor], torch.Tensor],
        prompts: list[str] | None = None,
    ) -> None:
        self.image_reward = image_reward
        self.decode = decode
        self.prompts = list(prompts or [])

    @property
    def last_terms(self) -> dict[str, torch.Tensor]:
        """The unweighted terms of the last call (a weighted reward), else empty."""
        return getattr(self.image_reward, "last_terms", {})

    def __call__(self, x0: torch.Tensor, cond: object = None) -> torch.Tensor:
        prompts = self.prompts
        if torch.is_tensor(cond) and prompts:
            prompts = [prompts[int(index)] for index in cond]
        elif len(prompts) == 1 and x0.shape[0] > 1:
            prompts = prompts * x0.shape[0]
        return self.image_reward(self.decode(x0), prompts)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """Flux's 2x2 patch packing: ``[B, C, h, w] -> [B, (h/2)(w/2), 4C]`` (``FluxPipeline._pack_latents``)."""
    batch, channels, height, width = latents.shape
    latents = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of ``pack_latents`` for a latent image ``height x width``: ``[B, (h/2)(w/2), 4C] -> [B, C, h, w]``."""
    batch, _, packed = latents.shape
    latents = latents.view(batch, height // 2, width // 2, packed // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(batch, packed // 4, height, width)


def lora_targets(network: torch.nn.Module) -> str:
    """The attention projections LoRA adapts in ``network``, comma-separated (peft ``target_modules``): the
    query/key/value/output projections of a UNet, and of both streams of an SD3 or Flux transformer."""
    names = {name.rsplit(".", 1)[-1] for name, _ in network.named_modules()}
    return _TRANSFORMER_LORA_TARGETS if "add_q_proj" in names else _UNET_LORA_TARGETS


def load_pipeline(path: str | Path, dtype: torch.dtype | None = None):
    """Load a diffusers pipeline once, for several ``from_pipeline`` calls (one per prompt): a folder written by
    ``save_pretrained``, or a Hub id ``org/name`` (the user's Hugging Face cache, downloaded into it when missing,
    see ``sdo.hub``); safetensors only, never remote code. Raises ``MissingWeightsError`` (one line) for anything
    else, or for a Hub id that is offline and not cached."""
    return _load(path, None, dtype)


def _load(pipe_or_path, device, dtype):
    """``pipe_or_path`` itself when it is a pipeline; else the pipeline of that folder or Hub id, complete or refused:
    every component ``model_index.json`` lists is there, every network has all its weights (``sdo.hub.load_model``)
    and every tokenizer its files (``sdo.hub.check_tokenizer``)."""
    if not isinstance(pipe_or_path, (str, Path)):
        return pipe_or_path
    from diffusers import DiffusionPipeline

    source = model_source(pipe_or_path, "diffusers pipeline")
    # Components saved as absent (e.g. SD3 without its T5 encoder, SD without a safety checker) are passed as None.
    index = _pipeline_index(source)
    _check_family(index.get("_class_name"), source.name)
    absent = {name: None for name, value in index.items() if value == [None, None] or name == "safety_checker"}
    components = {name: value for name, value in _components(index).items() if name not in absent}
    if not source.hub:
        _check_component_folders(source, components)
    networks = _load_networks(source, components, dtype)
    options = {"torch_dtype": dtype} if dtype is not None else {}
    try:  # safetensors only: a folder saved as pickled .bin files is refused, never unpickled
        pipe = DiffusionPipeline.from_pretrained(
            source.name,
            use_safetensors=True,
            trust_remote_code=False,
            **source.options(),
            **absent,
            **networks,
            **options,
        )
    except (OSError, ValueError, RuntimeError) as error:
        if source.hub:
            raise hub_error(source, "pipeline", error) from None
        path = Path(source.name)
        if not has_pickled_weights(path):
            raise MissingWeightsError(f"{path}: the pipeline could not be loaded: {error}".splitlines()[0]) from error
        raise MissingWeightsError(convert_hint(path, "DiffusionPipeline", error)) from None
    _check_tokenizers(pipe, source)
    return pipe


def _components(index: dict) -> dict[str, tuple[str, str]]:
    """The components ``model_index.json`` lists as ``name -> (library, class name)`` (absent ones left out)."""
    return {
        name: (value[0], value[1])
        for name, value in index.items()
        if isinstance(value, list) and len(value) == 2 and all(isinstance(part, str) for part in value)
    }


def _check_component_folders(source: ModelSource, components: dict[str, tuple[str, str]]) -> None:
    """``MissingWeightsError`` naming the first component of a pipeline folder that has no folder of its own
    (diffusers would otherwise build it from the pipeline's top folder: a tokenizer without a vocabulary)."""
    for name, (_, class_name) in components.items():
        if not (Path(source.name) / name).is_dir():
            raise MissingWeightsError(
                f"{source.name}: the pipeline could not be loaded: its `{name}` ({class_name}) is missing "
                f"(model_index.json lists it, but there is no folder {Path(source.name) / name}); copy it back from "
                "the pipeline this folder came from, or save the whole pipeline again with `save_pretrained(DIR)`."
            )


def _load_networks(source: ModelSource, components: dict[str, tuple[str, str]], dtype) -> dict[str, torch.nn.Module]:
    """The pipeline's networks (UNet or transformer, VAE, text encoders), each loaded with ``sdo.hub.load_model``:
    a missing weight is refused in one line naming the component's folder, rather than initialized at random.
    Tokenizers, schedulers and the rest are left to diffusers."""
    import diffusers

    networks = {}
    for name, (library, class_name) in components.items():
        options = {}
        if library == "diffusers":
            model_class = getattr(diffusers, class_name, None)
            base = diffusers.ModelMixin
            options = {"torch_dtype": dtype} if dtype is not None else {}
        elif library == "transformers":
            import transformers

            model_class = getattr(transformers, class_name, None)
            base = transformers.PreTrainedModel
            options = {"trust_remote_code": False, **_transformers_dtype(dtype)}
        else:
            continue
        if isinstance(model_class, type) and issubclass(model_class, base):
            what = f"pipeline's `{name}` ({class_name})"
            networks[name] = load_model(model_class, source, what, subfolder=name, **options)
    return networks


def _transformers_dtype(dtype: torch.dtype | None) -> dict:
    """The dtype argument a transformers ``from_pretrained`` takes (``dtype`` from 4.56, ``torch_dtype`` before),
    as diffusers passes it; none when ``dtype`` is None."""
    if dtype is None:
        return {}
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__).release >= (4, 56) else "torch_dtype": dtype}


def _check_tokenizers(pipe, source: ModelSource) -> None:
    """Each tokenizer of ``pipe`` has its vocabulary and fits its text encoder's positions
    (``sdo.hub.check_tokenizer``)."""
    for suffix in ("", "_2", "_3"):
        tokenizer = getattr(pipe, f"tokenizer{suffix}", None)
        if tokenizer is None:
            continue
        encoder = getattr(pipe, f"text_encoder{suffix}", None)
        positions = getattr(getattr(encoder, "config", None), "max_position_embeddings", None)
        where = f"{source.name}/tokenizer{suffix}"
        check_tokenizer(tokenizer, where, f"pipeline's `tokenizer{suffix}`", max_length=positions)


def _pipeline_index(source: ModelSource) -> dict:
    """The pipeline's ``model_index.json`` (from the folder, or from the Hub id's cache or download)."""
    if source.hub:
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(source.name, "model_index.json", **source.options()))
        except Exception as error:  # any Hub failure (offline, not found, gated, network) is one line
            raise hub_error(source, "pipeline", error) from None
    else:
        path = Path(source.name) / "model_index.json"
        if not path.is_file():
            raise MissingWeightsError(
                f"{source.name} is not a diffusers pipeline folder (no model_index.json). Save one with "
                "`pipeline.save_pretrained(DIR)` on a machine that has the weights, and pass DIR."
            )
    index = load_json(path)
    if not isinstance(index, dict):
        raise CorruptFileError(f"{path}: expected a JSON object (a model index), not {type(index).__name__}.")
    return index


def _check_family(class_name: object, where: object) -> str:
    """The family of pipeline class ``class_name``; ``ConfigError`` naming the supported ones otherwise."""
    if not isinstance(class_name, str) or class_name not in FAMILIES:
        raise ConfigError(f"{where}: {class_name} is not supported; sdo.from_pipeline supports {SUPPORTED}.")
    return FAMILIES[class_name]


def _scheduler(pipe, name: str | None):
    """The scheduler ``name``, else the pipeline's own when supported, else DDIM from its config; a replaced
    scheduler is named in one warning line (``logging``, stderr by default)."""
    config = pipe.scheduler.config
    if name is None:
        if type(pipe.scheduler) in SUPPORTED_SCHEDULERS:
            return type(pipe.scheduler).from_config(config)
        replaced = scheduler_by_name("ddim", config)
        logger.warning(
            "sdo replaces the pipeline's scheduler: %s -> %s (sdo supports %s; to sample with one of them, save the "
            "pipeline with it: pipe.scheduler = NAME.from_config(pipe.scheduler.config); pipe.save_pretrained(DIR); "
            'in Python, sdo.from_pipeline(..., scheduler="ddim") chooses one too).',
            type(pipe.scheduler).__name__,
            type(replaced).__name__,
            ", ".join(cls.__name__ for cls in SUPPORTED_SCHEDULERS),
        )
        return replaced
    return scheduler_by_name(name, config)


def from_pipeline(
    pipe_or_path,
    prompt: str | list[str],
    *,
    negative_prompt: str | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    scheduler: str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    embeds_require_grad: bool = False,
    vae_slicing: bool = False,
    vae_tiling: bool = False,
    checkpoint_decoder: bool = False,
    true_cfg_scale: float = 1.0,
    max_sequence_length: int | None = None,
    original_size: tuple[int, int] | None = None,
    crops_coords_top_left: tuple[int, int] = (0, 0),
    target_size: tuple[int, int] | None = None,
) -> PipelineParts:
    """Adapt a text-to-image pipeline: SD 1.x/2.x, SDXL, SD3 or Flux (see ``FAMILIES``), as its ``__call__`` runs.

    Each family is conditioned as its diffusers pipeline does it:

    - SD 1.x/2.x: CLIP prompt embeddings; guidance ``eps_u + w (eps_c - eps_u)``.
    - SDXL (Podell et al. 2023, arXiv 2307.01952): both CLIP encoders' penultimate states concatenated, the second
      encoder's pooled embedding and the ``time_ids`` (original size, crop corner, target size) as
      ``added_cond_kwargs``; with no negative prompt and ``force_zeros_for_empty_prompt`` the unconditional
      embeddings are zeros; an fp16 VAE with ``force_upcast`` decodes in float32.
    - SD3 (Esser et al. 2024, arXiv 2403.03206): joint CLIP(+T5) embeddings and pooled CLIP embeddings; FlowMatch,
      with the dynamic shift ``mu`` when the scheduler asks for it.
    - Flux: T5 sequence embeddings and the CLIP pooled embedding; packed 2x2 latents with their image/text position
      ids; the guidance scale is embedded (``guidance=``) for guidance-distilled checkpoints, and true
      classifier-free guidance runs when ``negative_prompt`` is given with ``true_cfg_scale > 1``; FlowMatch with
      ``sigmas = linspace(1, 1/n, n)`` and ``mu`` linear in the image sequence length (``calculate_shift``).
      Decoding unpacks the latent and undoes the VAE's scaling and shift.

    Args:
        pipe_or_path: a diffusers pipeline, a folder saved with ``save_pretrained``, or a Hub id ``org/name``
            (loaded by ``load_pipeline``).
        prompt: one prompt or a list (the batch).
        negative_prompt: the unconditional prompt of classifier-free guidance (defaults to the pipeline's own
            default: "" for SD and SD3, zeros for SDXL with ``force_zeros_for_empty_prompt``, none for Flux).
        guidance_scale: ``w`` in ``eps_u + w (eps_c - eps_u)``; for Flux the embedded guidance (defaults to the
            pipeline's default: 7.5 SD, 5.0 SDXL, 7.0 SD3, 3.5 Flux).
        height, width: image size (defaults to the pipeline's); must be a multiple of what the model can take (8
            for SD and SDXL, VAE factor x patch size for SD3, 2 x VAE factor for Flux), else ``ConfigError``.
        scheduler: a name from ``sdo.schedulers.SCHEDULER_NAMES`` ("ddim", "ddpm", "dpm++", "euler",
            "flowmatch"); defaults to the pipeline's own when supported, else DDIM built from the pipeline's
            scheduler config (that replacement is one warning line on the ``sdo.pipelines`` logger, stderr by
            default: e.g. "EulerAncestralDiscreteScheduler -> DDIMScheduler").
        device, dtype: where the modules go, and their precision.
        embeds_require_grad: make the prompt embeddings (and pooled embeddings) leaves that require grad.
        vae_slicing, vae_tiling: decode one image, or one tile, at a time (diffusers' ``enable_slicing`` /
            ``enable_tiling``): less decoder memory.
        checkpoint_decoder: recompute the decoder's activations in backward instead of storing them.
        true_cfg_scale: Flux: scale of true classifier-free guidance with ``negative_prompt`` (1: none).
        max_sequence_length: Flux/SD3: T5 tokens (defaults to the pipeline's: 512 Flux, 256 SD3).
        original_size, crops_coords_top_left, target_size: SDXL's micro-conditioning (defaults: (height, width),
            (0, 0), (height, width)).

    Raises:
        ConfigError: an unsupported pipeline class or size, or a missing component (the message names the
            supported families); an empty prompt list, a prompt that is not UTF-8 text, or a ``guidance_scale``
            or ``true_cfg_scale`` that is not a finite number in [0, 1000] (checked before anything loads).
        MissingWeightsError: neither a pipeline folder nor a Hub id that loads (offline and not cached: the message
            names ``HF_HUB_OFFLINE``), or a component could not be loaded.

    Memory: with ``dtype=torch.bfloat16`` the modules run in bf16 while latents, solver and gradients stay float32
    (``sdo.Denoiser`` and ``decode`` cast at the boundary); add ``sdo.Shortcut(checkpoint=True)`` to recompute the
    kept step. See BENCHMARKS.md for the SD-1.5 memory budget.
    """
    prompts = _check_prompts(prompt)
    if negative_prompt is not None:
        check_text(negative_prompt, "negative_prompt")
    if guidance_scale is not None:
        check_guidance(guidance_scale, "guidance_scale")
    check_guidance(true_cfg_scale, "true_cfg_scale")
    pipe = _load(pipe_or_path, device, dtype)
    family = _check_family(type(pipe).__name__, type(pipe).__name__)
    for name in _REQUIRED[family]:
        if getattr(pipe, name, None) is None:
            raise ConfigError(
                f"{type(pipe).__name__} has no `{name}`, which sdo needs for the {family} family; "
                f"sdo.from_pipeline supports {SUPPORTED} with their text encoders, VAE and denoising network."
            )
    pipe = pipe.to(device) if dtype is None else pipe.to(device, dtype)
    network = getattr(pipe, "transformer", None) or pipe.unet
    for module in (network, pipe.vae, *_text_encoders(pipe)):
        module.requires_grad_(False).eval()
    if family == "sdxl" and pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast:
        pipe.vae.to(torch.float32)  # as the pipeline does before decoding: the fp16 SDXL VAE overflows
    height, width, factor = _size(pipe, family, network, height, width)
    guidance = DEFAULT_GUIDANCE[family] if guidance_scale is None else guidance_scale
    build = {"sd": _sd, "sdxl": _sdxl, "sd3": _sd3, "flux": _flux}[family]
    with torch.no_grad():
        parts = build(
            pipe,
            prompts,
            negative_prompt=negative_prompt,
            guidance=guidance,
            size=(height, width, factor),
            device=torch.device(device),
            true_cfg_scale=true_cfg_scale,
            max_sequence_length=max_sequence_length,
            micro=(original_size or (height, width), tuple(crops_coords_top_left), target_size or (height, width)),
        )
    model_fn, latent_shape, image_latent_shape, timestep_options = parts
    if embeds_require_grad:
        model_fn = _with_leaf_conditioning(model_fn)
    sampler_scheduler = _scheduler(pipe, scheduler)
    model_fn = Denoiser(**{**vars(model_fn), "prediction_type": prediction_type(sampler_scheduler)})
    decode = _decoder(pipe.vae, vae_slicing, vae_tiling, checkpoint_decoder, image_latent_shape, family)
    return PipelineParts(
        model_fn=model_fn,
        scheduler=sampler_scheduler,
        latent_shape=latent_shape,
        decode=decode,
        unet=network,
        vae=pipe.vae,
        prompt_embeds=model_fn.encoder_hidden_states,
        negative_embeds=model_fn.negative_encoder_hidden_states,
        pooled_embeds=_pooled(model_fn),
        family=family,
        timestep_options=timestep_options,
        image_latent_shape=image_latent_shape,
        lora_targets=lora_targets(network),
        prompts=prompts,
    )


def _check_prompts(prompt: object) -> list[str]:
    """``prompt`` as the prompt batch: one string, or a non-empty list (or tuple) of strings, all UTF-8 text;
    anything else a ``ConfigError`` naming ``prompt``."""
    if isinstance(prompt, str):
        return [check_text(prompt, "prompt")]
    if not isinstance(prompt, list | tuple) or not prompt:
        shown = repr(prompt) if isinstance(prompt, list | tuple) else type(prompt).__name__
        raise ConfigError(f"`prompt` must be a string or a non-empty list of strings, got {shown}.")
    for item in prompt:
        if not isinstance(item, str):
            raise ConfigError(f"`prompt` must be a string or a list of strings, got an item {item!r}.")
        check_text(item, "prompt")
    return list(prompt)


def _size(pipe, family: str, network, height: int | None, width: int | None) -> tuple[int, int, int]:
    """Height, width (the pipeline's defaults when None) and the VAE factor; ``ConfigError`` unless both are
    multiples of what the family takes."""
    factor = _vae_factor(pipe.vae)
    default = getattr(pipe, "default_sample_size", None) or network.config.sample_size
    height, width = height or default * factor, width or default * factor
    multiple = size_multiple(pipe)
    if height % multiple or width % multiple:
        raise ConfigError(
            f"height and width must be multiples of {multiple} for this {family} pipeline (VAE factor {factor}), "
            f"got {height}x{width}; for example {height - height % multiple or multiple}x"
            f"{width - width % multiple or multiple}."
        )
    return height, width, factor


def size_multiple(pipe) -> int:
    """What the image height and width of pipeline ``pipe`` must be multiples of: 8 for SD and SDXL, the VAE factor
    times the patch size for SD3, twice the VAE factor for Flux (its 2x2 packing)."""
    family = _check_family(type(pipe).__name__, type(pipe).__name__)
    factor = _vae_factor(pipe.vae)
    multiples = {"sd": 8, "sdxl": 8, "flux": factor * 2}
    return multiples[family] if family in multiples else factor * pipe.transformer.config.patch_size


def _text_encoders(pipe) -> list[torch.nn.Module]:
    names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    return [module for name in names if (module := getattr(pipe, name, None)) is not None]


def _sd(pipe, prompts, *, negative_prompt, guidance, size, device, **_):
    """SD 1.x/2.x: CLIP embeddings, UNet latents ``[B, C, h, w]``."""
    height, width, factor = size
    negative = [negative_prompt or ""] * len(prompts)
    cond, uncond = pipe.encode_prompt(prompts, device, 1, True, negative_prompt=negative)
    shape = (len(prompts), pipe.unet.config.in_channels, height // factor, width // factor)
    model_fn = Denoiser(
        pipe.unet, encoder_hidden_states=cond, negative_encoder_hidden_states=uncond[:1], guidance_scale=guidance
    )
    return model_fn, shape, shape, None


def _sdxl(pipe, prompts, *, negative_prompt, guidance, size, device, micro, **_):
    """SDXL: both encoders' embeddings, the pooled embedding and ``time_ids`` as ``added_cond_kwargs``."""
    height, width, factor = size
    negative = None if negative_prompt is None else [negative_prompt] * len(prompts)
    cond, uncond, pooled, negative_pooled = pipe.encode_prompt(
        prompt=prompts, device=device, do_classifier_free_guidance=True, negative_prompt=negative
    )
    projection = pipe.text_encoder_2.config.projection_dim
    time_ids = torch.tensor([[*micro[0], *micro[1], *micro[2]]], dtype=cond.dtype, device=device)
    expected = pipe.unet.add_embedding.linear_1.in_features
    if pipe.unet.config.addition_time_embed_dim * time_ids.shape[1] + projection != expected:
        raise ConfigError(
            f"The SDXL UNet expects an added embedding of {expected} values but the text encoder's projection "
            f"({projection}) and 6 time ids give another; the pipeline's config is inconsistent."
        )
    shape = (len(prompts), pipe.unet.config.in_channels, height // factor, width // factor)
    model_fn = Denoiser(
        pipe.unet,
        encoder_hidden_states=cond,
        negative_encoder_hidden_states=uncond[:1],
        guidance_scale=guidance,
        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.expand(len(prompts), -1)},
        negative_added_cond_kwargs={"text_embeds": negative_pooled[:1], "time_ids": time_ids},
    )
    return model_fn, shape, shape, None


def _sd3(pipe, prompts, *, negative_prompt, guidance, size, device, max_sequence_length, **_):
    """SD3: joint embeddings and pooled CLIP embeddings; FlowMatch with ``mu`` under dynamic shifting."""
    height, width, factor = size
    negative = [negative_prompt or ""] * len(prompts)
    options = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    cond, uncond, pooled, negative_pooled = pipe.encode_prompt(
        prompts,
        prompts,
        prompts,
        device=device,
        do_classifier_free_guidance=True,
        negative_prompt=negative,
        negative_prompt_2=negative,
        negative_prompt_3=negative,
        **options,
    )
    transformer = pipe.transformer
    shape = (len(prompts), transformer.config.in_channels, height // factor, width // factor)
    model_fn = Denoiser(
        transformer,
        encoder_hidden_states=cond,
        negative_encoder_hidden_states=uncond[:1],
        guidance_scale=guidance,
        pooled_projections=pooled,
        negative_pooled_projections=negative_pooled[:1],
    )
    timestep_options = None
    if pipe.scheduler.config.get("use_dynamic_shifting", None):
        patch = transformer.config.patch_size
        mu = _shift((shape[2] // patch) * (shape[3] // patch), pipe.scheduler.config)
        timestep_options = lambda steps: {"mu": mu}  # noqa: E731
    return model_fn, shape, shape, timestep_options


def _flux(pipe, prompts, *, negative_prompt, guidance, size, device, true_cfg_scale, max_sequence_length, **_):
    """Flux: T5 + pooled CLIP, packed latents with position ids, embedded guidance, FlowMatch with ``mu``."""
    import numpy as np

    height, width, factor = size
    options = {"max_sequence_length": max_sequence_length or 512}
    cond, pooled, text_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device, **options)
    true_cfg = true_cfg_scale > 1 and negative_prompt is not None
    uncond = negative_pooled = None
    if true_cfg:
        negative = [negative_prompt] * len(prompts)
        uncond, negative_pooled, _ = pipe.encode_prompt(prompt=negative, prompt_2=None, device=device, **options)
        uncond, negative_pooled = uncond[:1], negative_pooled[:1]
    transformer = pipe.transformer
    channels = transformer.config.in_channels // 4
    latent_height, latent_width = 2 * (height // (factor * 2)), 2 * (width // (factor * 2))
    image_shape = (len(prompts), channels, latent_height, latent_width)
    image_ids = pipe._prepare_latent_image_ids(len(prompts), latent_height // 2, latent_width // 2, device, cond.dtype)
    sequence = (latent_height // 2) * (latent_width // 2)
    model_fn = Denoiser(
        transformer,
        encoder_hidden_states=cond,
        negative_encoder_hidden_states=uncond,
        guidance_scale=true_cfg_scale if true_cfg else 1.0,
        pooled_projections=pooled,
        negative_pooled_projections=negative_pooled,
        guidance_embedding=guidance if transformer.config.guidance_embeds else None,
        extra_kwargs={"txt_ids": text_ids, "img_ids": image_ids},
        timestep_divisor=1000.0,
    )
    mu = _shift(sequence, pipe.scheduler.config)
    use_flow_sigmas = pipe.scheduler.config.get("use_flow_sigmas", False)

    def timestep_options(steps: int) -> dict:
        sigmas = None if use_flow_sigmas else np.linspace(1.0, 1 / steps, steps)
        return {"sigmas": sigmas, "mu": mu}

    return model_fn, (len(prompts), sequence, channels * 4), image_shape, timestep_options


def _shift(sequence: int, config) -> float:
    """The dynamic shift ``mu`` of FlowMatch, linear in the image sequence length (diffusers ``calculate_shift``):
    ``base_shift`` at ``base_image_seq_len`` tokens, ``max_shift`` at ``max_image_seq_len``."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return sequence * slope + base_shift - slope * base_len


def _with_leaf_conditioning(model_fn: Denoiser) -> Denoiser:
    """The prompt embeddings and pooled embeddings as leaves that require grad (the rest detached)."""
    cond = model_fn.encoder_hidden_states.detach().clone().requires_grad_(True)
    changes = {"encoder_hidden_states": cond}
    if model_fn.pooled_projections is not None:
        changes["pooled_projections"] = model_fn.pooled_projections.detach().clone().requires_grad_(True)
    if model_fn.added_cond_kwargs is not None:
        pooled = model_fn.added_cond_kwargs["text_embeds"].detach().clone().requires_grad_(True)
        changes["added_cond_kwargs"] = {**model_fn.added_cond_kwargs, "text_embeds": pooled}
    return replace(model_fn, **changes)


def _pooled(model_fn: Denoiser) -> torch.Tensor | None:
    if model_fn.added_cond_kwargs is not None:
        return model_fn.added_cond_kwargs["text_embeds"]
    return model_fn.pooled_projections


def _vae_factor(vae) -> int:
    """The VAE's spatial down-sampling factor (8 for Stable Diffusion's)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _check_images(images: torch.Tensor, size: tuple[int, int]) -> None:
    """``ConfigError`` unless ``images`` is a float ``[B, 3, H, W]`` batch (``B >= 1``) in [0, 1] of
    ``size == (H, W)``."""
    if not torch.is_tensor(images) or not images.is_floating_point() or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ConfigError(f"`images` must be a float [B, 3, H, W] tensor in [0, 1], got {shape}.")
    if images.shape[0] == 0:
        raise ConfigError(f"`images` is an empty batch (shape {tuple(images.shape)}); pass at least one image.")
    if tuple(images.shape[2:]) != tuple(size):
        raise ConfigError(
            f"`images` are {images.shape[2]}x{images.shape[3]} but this pipeline makes {size[0]}x{size[1]} images; "
            "resize them (sdo.io.load_image(path, size=...)) or build the parts with that height and width."
        )
    if images.numel() and not bool(((images >= 0) & (images <= 1)).all()):
        raise ConfigError(
            "`images` must hold values in [0, 1] (sdo's image convention), not e.g. [-1, 1] or [0, 255]."
        )


def _latent_statistics(vae, like: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float, float]:
    """``(mean, std, scaling)`` with ``latents = (z - mean) * scaling / std``: SDXL's per-channel
    ``latents_mean``/``latents_std`` as ``[1, C, 1, 1]`` tensors, else ``(shift_factor or 0, 1)``."""
    config = vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        view = (1, len(mean), 1, 1)
        as_tensor = lambda values: torch.tensor(values, device=like.device, dtype=like.dtype).view(view)  # noqa: E731
        return as_tensor(mean), as_tensor(std), config.scaling_factor
    return getattr(config, "shift_factor", None) or 0.0, 1.0, config.scaling_factor


def _encoder(vae, family: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``images in [0, 1] -> latents``: the exact inverse of ``_decoder``'s arithmetic around the VAE (map to
    ``[-1, 1]``, ``vae.encode(...).latent_dist.mean``, scale and shift, pack for Flux)."""

    def encode(images: torch.Tensor) -> torch.Tensor:
        dtype = images.dtype
        latents = vae.encode((2 * images - 1).to(vae.dtype)).latent_dist.mean.to(dtype)
        mean, std, scaling = _latent_statistics(vae, latents)
        latents = (latents - mean) * scaling / std
        return pack_latents(latents) if family == "flux" else latents

    return encode


def _decoder(
    vae, slicing: bool, tiling: bool, checkpointed: bool, image_shape: tuple[int, ...], family: str
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``latents -> images in [0, 1]``: unpack (Flux), undo the latent scaling (with SDXL's per-channel
    ``latents_mean``/``latents_std``, or SD3/Flux's ``shift_factor``), decode in the VAE's dtype, and map
    ``[-1, 1]`` to ``[0, 1]`` with the clamp of diffusers' ``VaeImageProcessor`` (no gradient past the clamp)."""
    if slicing:
        vae.enable_slicing()
    if tiling:
        vae.enable_tiling()

    def decode_now(latents: torch.Tensor) -> torch.Tensor:
        if family == "flux":
            latents = unpack_latents(latents, *image_shape[2:])
        mean, std, scaling = _latent_statistics(vae, latents)
        latents = latents * std / scaling + mean
        image = vae.decode(latents.to(vae.dtype)).sample
        return (image.to(latents.dtype) / 2 + 0.5).clamp(0, 1)

    def decode(latents: torch.Tensor) -> torch.Tensor:
        if checkpointed and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(decode_now, latents, use_reentrant=False)
        return decode_now(latents)

    return decode
