"""Loading: a pipeline folder or Hub id to a complete diffusers pipeline (``load_pipeline``: every component
there, every network with all its weights, every tokenizer with its files, or one line refusing it), and a
pipeline to ``PipelineParts`` (``from_pipeline``: the family's conditioning, the scheduler, the size, the VAE
codec). What each family conditions is in its own module (``sd``, ``sdxl``, ``sd3``, ``flux``)."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch

from ..checks import check_guidance, check_text
from ..errors import ConfigError, CorruptFileError, MissingWeightsError
from ..hub import ModelSource, check_tokenizer, hub_error, load_model, model_source
from ..io import convert_hint, has_pickled_weights, load_json
from ..models import Denoiser
from ..schedulers import SUPPORTED_SCHEDULERS, prediction_type, scheduler_by_name
from . import flux, sd, sd3, sdxl
from .codec import decoder, vae_factor
from .parts import PipelineParts, lora_targets

__all__ = [
    "DEFAULT_GUIDANCE",
    "FAMILIES",
    "SUPPORTED",
    "check_family",
    "from_pipeline",
    "load_pipeline",
    "logger",
    "size_multiple",
]

logger = logging.getLogger("sdo.pipelines")  # the package's one logger (the replaced-scheduler warning)

_FAMILY_MODULES = {"sd": sd, "sdxl": sdxl, "sd3": sd3, "flux": flux}
# Pipeline class -> family.
FAMILIES = {module.PIPELINE_CLASS: family for family, module in _FAMILY_MODULES.items()}
SUPPORTED = (
    "StableDiffusionPipeline (SD 1.x/2.x), StableDiffusionXLPipeline (SDXL), StableDiffusion3Pipeline (SD3) "
    "and FluxPipeline (Flux)"
)
# Each family's own default guidance scale (its pipeline's ``__call__`` default), what ``from_pipeline`` uses.
DEFAULT_GUIDANCE = {family: module.DEFAULT_GUIDANCE for family, module in _FAMILY_MODULES.items()}


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
    pipe = load_pipeline(pipe_or_path, dtype) if isinstance(pipe_or_path, (str, Path)) else pipe_or_path
    family = check_family(type(pipe).__name__, type(pipe).__name__)
    _check_components(pipe, family)
    network = _prepare_modules(pipe, family, device, dtype)
    height, width, factor = _size(pipe, family, network, height, width)
    guidance = DEFAULT_GUIDANCE[family] if guidance_scale is None else guidance_scale
    with torch.no_grad():
        conditioned = _FAMILY_MODULES[family].condition(
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
    model_fn = _with_leaf_conditioning(conditioned.model_fn) if embeds_require_grad else conditioned.model_fn
    sampler_scheduler = _scheduler(pipe, scheduler)
    model_fn = Denoiser(**{**vars(model_fn), "prediction_type": prediction_type(sampler_scheduler)})
    image_latent_shape = conditioned.image_latent_shape
    return PipelineParts(
        model_fn=model_fn,
        scheduler=sampler_scheduler,
        latent_shape=conditioned.latent_shape,
        decode=decoder(pipe.vae, vae_slicing, vae_tiling, checkpoint_decoder, image_latent_shape, family),
        network=network,
        vae=pipe.vae,
        prompt_embeds=model_fn.encoder_hidden_states,
        negative_embeds=model_fn.negative_encoder_hidden_states,
        pooled_embeds=_pooled(model_fn),
        family=family,
        timestep_options=conditioned.timestep_options,
        image_latent_shape=image_latent_shape,
        lora_targets=lora_targets(network),
        prompts=prompts,
    )


def _check_components(pipe, family: str) -> None:
    """``ConfigError`` naming the first component the family needs that ``pipe`` lacks."""
    for name in _FAMILY_MODULES[family].REQUIRED:
        if getattr(pipe, name, None) is None:
            raise ConfigError(
                f"{type(pipe).__name__} has no `{name}`, which sdo needs for the {family} family; "
                f"sdo.from_pipeline supports {SUPPORTED} with their text encoders, VAE and denoising network."
            )


def _prepare_modules(pipe, family: str, device, dtype) -> torch.nn.Module:
    """Move ``pipe`` to ``device`` (and ``dtype``), freeze its network, VAE and text encoders, and return the
    network (the UNet, or the transformer)."""
    pipe = pipe.to(device) if dtype is None else pipe.to(device, dtype)
    network = getattr(pipe, "transformer", None) or pipe.unet
    for module in (network, pipe.vae, *_text_encoders(pipe)):
        module.requires_grad_(False).eval()
    if family == "sdxl" and pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast:
        pipe.vae.to(torch.float32)  # as the pipeline does before decoding: the fp16 SDXL VAE overflows
    return network


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
    factor = vae_factor(pipe.vae)
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
    family = check_family(type(pipe).__name__, type(pipe).__name__)
    factor = vae_factor(pipe.vae)
    multiples = {"sd": 8, "sdxl": 8, "flux": factor * 2}
    return multiples[family] if family in multiples else factor * pipe.transformer.config.patch_size


def _text_encoders(pipe) -> list[torch.nn.Module]:
    """The pipeline's text encoders, in order."""
    names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    return [module for name in names if (module := getattr(pipe, name, None)) is not None]


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
    """The pooled prompt embeddings of ``model_fn`` (SDXL's ``text_embeds``, or SD3's and Flux's projections)."""
    if model_fn.added_cond_kwargs is not None:
        return model_fn.added_cond_kwargs["text_embeds"]
    return model_fn.pooled_projections


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


def load_pipeline(path: str | Path, dtype: torch.dtype | None = None):
    """Load a diffusers pipeline once, for several ``from_pipeline`` calls (one per prompt): a folder written by
    ``save_pretrained``, or a Hub id ``org/name`` (the user's Hugging Face cache, downloaded into it when missing,
    see ``sdo.hub``); safetensors only, never remote code. The pipeline is complete or refused: every component
    ``model_index.json`` lists is there, every network has all its weights (``sdo.hub.load_model``) and every
    tokenizer its files (``sdo.hub.check_tokenizer``). Raises ``MissingWeightsError`` (one line) for anything
    else, or for a Hub id that is offline and not cached."""
    source = model_source(path, "diffusers pipeline")
    # Components saved as absent (e.g. SD3 without its T5 encoder, SD without a safety checker) are passed as None.
    index = _pipeline_index(source)
    check_family(index.get("_class_name"), source.name)
    absent = {name: None for name, value in index.items() if value == [None, None] or name == "safety_checker"}
    components = {name: value for name, value in _components(index).items() if name not in absent}
    if not source.hub:
        _check_component_folders(source, components)
    pipe = _from_pretrained(source, {**absent, **_load_networks(source, components, dtype)}, dtype)
    _check_tokenizers(pipe, source)
    return pipe


def _from_pretrained(source: ModelSource, components: dict, dtype: torch.dtype | None):
    """diffusers' ``DiffusionPipeline.from_pretrained`` of ``source`` with ``components`` given (the networks sdo
    loaded, None for the absent ones); safetensors only, never remote code; a failure is one line."""
    from diffusers import DiffusionPipeline

    options = {"torch_dtype": dtype} if dtype is not None else {}
    try:  # safetensors only: a folder saved as pickled .bin files is refused, never unpickled
        return DiffusionPipeline.from_pretrained(
            source.name,
            use_safetensors=True,
            trust_remote_code=False,
            **source.options(),
            **components,
            **options,
        )
    except (OSError, ValueError, RuntimeError) as error:
        if source.hub:
            raise hub_error(source, "pipeline", error) from None
        path = Path(source.name)
        if not has_pickled_weights(path):
            raise MissingWeightsError(f"{path}: the pipeline could not be loaded: {error}".splitlines()[0]) from error
        raise MissingWeightsError(convert_hint(path, "DiffusionPipeline", error)) from None


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


def check_family(class_name: object, where: object) -> str:
    """The family of pipeline class ``class_name``; ``ConfigError`` naming the supported ones otherwise."""
    if not isinstance(class_name, str) or class_name not in FAMILIES:
        raise ConfigError(f"{where}: {class_name} is not supported; sdo.from_pipeline supports {SUPPORTED}.")
    return FAMILIES[class_name]
