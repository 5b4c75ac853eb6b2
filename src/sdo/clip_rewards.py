"""CLIP-based rewards for images in [0, 1] (the paper's three image rewards), from a folder or a Hub id.

- ``ClipScoreReward``: CLIP text-image cosine similarity (text-guided manipulation).
- ``AestheticReward``: LAION aesthetic predictor, a linear head on normalized CLIP ViT-L/14 image embeddings.
- ``ClipStyleReward``: Gram matrices of intermediate CLIP vision features against a reference image (style).
- ``PickScoreReward``: PickScore, the human-preference fine-tune of CLIP-H (its own folder, ``$SDO_PICKSCORE_PATH``).

The CLIP and PickScore models are folders saved with ``save_pretrained`` or Hub ids ``org/name`` (``sdo.hub``: the
user's Hugging Face cache, downloaded through transformers' ``from_pretrained`` when missing; safetensors only, never
remote code), given as arguments or by ``$SDO_CLIP_PATH`` / ``$SDO_PICKSCORE_PATH``. The aesthetic head is a local
file, ``$SDO_AESTHETIC_HEAD`` (safetensors with ``weight [1, D]`` and ``bias [1]``). ``transformers`` is imported
lazily (``pip install 'shortcut-diffusion[clip]'``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import ConfigError, MissingWeightsError, missing_extra
from .hub import ModelSource, check_tokenizer, hub_error, load_model, model_source
from .io import DEFAULT_MAX_PIXELS, load_image, load_json, load_tensors
from .rewards import gram_matrix, style_distance

__all__ = [
    "CLIP_REWARDS",
    "AestheticReward",
    "ClipImageEncoder",
    "ClipScoreReward",
    "ClipStyleReward",
    "PickScoreReward",
    "PromptTexts",
    "clip_reward",
    "random_cutouts",
]

CLIP_REWARDS = ("clip", "aesthetic", "style", "pickscore")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _transformers():
    try:
        import transformers
    except ImportError as error:
        raise missing_extra("transformers", "clip", "CLIP, PickScore and aesthetic rewards") from error
    return transformers


_ARGUMENTS = {
    "SDO_CLIP_PATH": "clip_path",
    "SDO_PICKSCORE_PATH": "pickscore_path",
    "SDO_AESTHETIC_HEAD": "aesthetic_head",
}
"""The environment variable of each model file or folder -> the name that gives it in the reward configs
(``PipelineOptions``, ``sdo.app.reward_spec.image_reward``), whose flag the ``sdo`` command names."""


def _chosen(path: str | os.PathLike | None, variable: str, what: str) -> str | os.PathLike:
    """``path``, else ``$variable``; ``MissingWeightsError`` when neither is given."""
    chosen = path or os.environ.get(variable)
    if not chosen:
        raise MissingWeightsError(f"No {what} given: pass its path (`{_ARGUMENTS[variable]}`), or set ${variable}.")
    return chosen


def _local(path: str | os.PathLike | None, variable: str, what: str) -> Path:
    """A local file (the aesthetic head): ``path`` or ``$variable``, which must exist."""
    chosen = Path(_chosen(path, variable, what))
    if not chosen.exists():
        raise MissingWeightsError(
            f"{what} not found at {chosen}: convert it to safetensors (see `sdo.clip_rewards.AestheticReward`), "
            f"copy it here, and pass the path or set ${variable}."
        )
    return chosen


def _model(path: str | os.PathLike | None, variable: str, what: str) -> ModelSource:
    """A CLIP-style model: ``path`` or ``$variable``, a folder or a Hub id (``sdo.hub.model_source``)."""
    return model_source(_chosen(path, variable, f"{what} folder"), what)


def _check_clip_config(source: ModelSource) -> None:
    """A local folder whose ``config.json`` describes another kind of model (a pipeline's ``text_encoder``: a
    ``clip_text_model``) is refused before transformers builds a CLIP model of default size around it."""
    config_path = Path(source.name) / "config.json"
    if source.hub or not config_path.is_file():
        return  # a Hub id, or a folder without a config: from_pretrained's own one-line error
    config = load_json(config_path)
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "clip":
        raise MissingWeightsError(
            f"{source.name}: not a CLIP model folder: its config.json describes a {model_type!r} model, not a whole "
            "CLIP model ('clip', a text and a vision tower; a text encoder alone is not one); pass the folder of a "
            "CLIP model saved with `transformers.CLIPModel.save_pretrained(DIR)`, or its Hub id."
        )


def random_cutouts(
    images: torch.Tensor, count: int, size: int, generator: torch.Generator, min_scale: float = 0.5
) -> torch.Tensor:
    """``count`` random square crops per image (side in ``[min_scale, 1]`` of the image), resized to ``size``:
    ``[count * B, C, size, size]``, in the order crop-major. Seeded by ``generator``."""
    height, width = images.shape[-2:]
    crops = []
    for _ in range(count):
        side = int(min(height, width) * float(torch.empty(1).uniform_(min_scale, 1.0, generator=generator)))
        top = int(torch.randint(0, height - side + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - side + 1, (1,), generator=generator))
        crop = images[..., top : top + side, left : left + side]
        crops.append(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False))
    return torch.cat(crops)


class ClipImageEncoder:
    """A local CLIP model with differentiable preprocessing of ``[0, 1]`` images (resize, CLIP normalization).

    Args:
        path: folder of a ``transformers`` CLIP model (and tokenizer) saved with ``save_pretrained``, or its Hub id
            ``org/name`` (defaults to ``$SDO_CLIP_PATH``); or a ``sdo.hub.ModelSource``.
        cutouts: random crops per image averaged in ``image_embeds`` (0: the whole image; the paper's scripts use
            random cut-outs); seeded by ``seed``.
    """

    def __init__(
        self, path: str | os.PathLike | ModelSource | None = None, device="cpu", cutouts: int = 0, seed: int = 0
    ) -> None:
        transformers = _transformers()
        source = path if isinstance(path, ModelSource) else _model(path, "SDO_CLIP_PATH", "CLIP model")
        _check_clip_config(source)
        # safetensors only (pickled .bin files are refused, never unpickled), and every weight present
        hint = " (a text encoder alone is not a CLIP model)"
        model = load_model(transformers.CLIPModel, source, "CLIP model", hint=hint, trust_remote_code=False)
        self.model = model.to(device).eval()
        self.model.requires_grad_(False)
        self.source = source
        self.tokenizer = None  # loaded on the first text embedding (image-only rewards need none)
        self.size = self.model.config.vision_config.image_size
        self.cutouts = cutouts
        self.generator = torch.Generator().manual_seed(seed)
        self.mean = torch.tensor(CLIP_MEAN, device=device)[:, None, None]
        self.std = torch.tensor(CLIP_STD, device=device)[:, None, None]

    def _load_tokenizer(self):
        """The CLIP tokenizer of this model's folder or Hub id, refused (one line) when its files are missing."""
        source = self.source
        try:
            tokenizer = _transformers().CLIPTokenizer.from_pretrained(source.name, **source.options())
        except (OSError, ValueError) as error:
            if source.hub:
                raise hub_error(source, "CLIP tokenizer", error) from None
            detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise MissingWeightsError(f"{source.name}: the CLIP tokenizer could not be loaded ({detail}).") from None
        positions = self.model.config.text_config.max_position_embeddings
        check_tokenizer(tokenizer, source.name, "CLIP model's tokenizer", max_length=positions)
        return tokenizer

    def preprocess(self, images: torch.Tensor, cutouts: bool = True) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> CLIP pixel values (with ``cutouts``, the encoder's cut-outs, crop-major)."""
        if cutouts and self.cutouts:
            images = random_cutouts(images, self.cutouts, self.size, self.generator)
        else:
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings ``[B, D]`` (averaged over cut-outs)."""
        features = self.model.get_image_features(pixel_values=self.preprocess(images))
        features = getattr(features, "pooler_output", features)
        features = F.normalize(features.float(), dim=-1)
        return features.reshape(-1, images.shape[0], features.shape[-1]).mean(0)

    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings ``[len(prompts), D]``."""
        if self.tokenizer is None:
            self.tokenizer = self._load_tokenizer()
        tokens = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(self.model.device)
        with torch.no_grad():
            features = self.model.get_text_features(**tokens)
        return F.normalize(getattr(features, "pooler_output", features).float(), dim=-1)


class PromptTexts:
    """The text embeddings a prompt-conditioned CLIP reward scores against.

    ``select(cond)``: the prompts given at construction when ``cond`` is None; ``prompts[cond[b]]`` when ``cond`` is a
    ``[B]`` tensor of indices; the embeddings of ``cond`` itself when it is a list of prompts (the image-reward
    convention ``reward(images, prompts)``), encoded once per distinct prompt.
    """

    def __init__(self, encoder: ClipImageEncoder, prompt: str | list[str]) -> None:
        self.encoder = encoder
        self.prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        self.embeds = encoder.text_embeds(self.prompts)
        self.cache = dict(zip(self.prompts, self.embeds, strict=True))

    def select(self, cond: object) -> torch.Tensor:
        """``[1 or B, D]`` normalized text embeddings for ``cond`` (None, index tensor or list of prompts)."""
        if torch.is_tensor(cond):
            return self.embeds[cond]
        if isinstance(cond, (list, tuple)) and cond:
            missing = [prompt for prompt in dict.fromkeys(cond) if prompt not in self.cache]
            if missing:
                self.cache.update(zip(missing, self.encoder.text_embeds(missing), strict=True))
            return torch.stack([self.cache[prompt] for prompt in cond])
        return self.embeds


class ClipScoreReward:
    """CLIP similarity ``r(x) = cos(E_img(x), E_txt(prompt))`` per image (Radford et al. 2021), for images in
    ``[0, 1]``.

    With one prompt every image is scored against it; with several, image ``b`` is scored against prompt ``b``, or
    against ``prompts[cond[b]]`` when the condition ``cond`` is a ``[B]`` tensor of prompt indices; a list of
    prompts as ``cond`` is scored as given (``reward(images, prompts)``, ``sdo.ImageReward``).
    """

    def __init__(self, prompt: str | list[str], encoder: ClipImageEncoder | None = None, **encoder_options) -> None:
        self.encoder = encoder or ClipImageEncoder(**encoder_options)
        self.text = PromptTexts(self.encoder, prompt)

    def __call__(self, images: torch.Tensor, cond: object = None) -> torch.Tensor:
        return (self.encoder.image_embeds(images) * self.text.select(cond)).sum(dim=-1)


class AestheticReward:
    """LAION aesthetic score: ``r(x) = w . E_img(x) / ||E_img(x)|| + b`` (the linear predictor on CLIP ViT-L/14).

    Args:
        head_path: safetensors with ``weight [1, D]`` and ``bias [1]`` (defaults to ``$SDO_AESTHETIC_HEAD``). The
            published head is a PyTorch pickle; convert it once where it is trusted:
            ``safetensors.torch.save_file({"weight": sd["weight"], "bias": sd["bias"]}, "aesthetic.safetensors")``.
        target: when given, the reward is ``-(score - target)^2`` (hit a score rather than maximize it).
    """

    def __init__(
        self,
        head_path: str | os.PathLike | None = None,
        encoder: ClipImageEncoder | None = None,
        target: float | None = None,
        **encoder_options,
    ) -> None:
        path = _local(head_path, "SDO_AESTHETIC_HEAD", "LAION aesthetic head (safetensors)")
        head = load_tensors(path)
        if set(head) != {"weight", "bias"}:
            raise ConfigError(f"{path}: expected tensors 'weight' [1, D] and 'bias' [1], found {sorted(head)}.")
        self.encoder = encoder or ClipImageEncoder(**encoder_options)
        self.weight, self.bias = head["weight"].float(), head["bias"].float()
        self.target = target

    def __call__(self, images: torch.Tensor, cond: object = None) -> torch.Tensor:
        embeds = self.encoder.image_embeds(images)
        score = embeds @ self.weight.to(embeds.device).T + self.bias.to(embeds.device)
        score = score.squeeze(-1)
        return score if self.target is None else -(score - self.target).square()


class ClipStyleReward:
    """Style: ``r(x) = - sum_l || G(h_l(x)) - G(h_l(ref)) ||_F^2`` over CLIP vision layers ``layers``, with
    ``G(h) = h^T h / (T D)`` of the token features ``h [T, D]`` (the paper's style task; Gatys et al. 2016)."""

    def __init__(
        self,
        reference: torch.Tensor,
        layers: tuple[int, ...] = (1, 2),
        scale: float = 1.0,
        encoder: ClipImageEncoder | None = None,
        **encoder_options,
    ) -> None:
        self.encoder = encoder or ClipImageEncoder(**encoder_options)
        self.layers = layers
        self.scale = scale
        with torch.no_grad():
            self.reference = [gram_matrix(features) for features in self._features(reference)]

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Token features of the chosen layers as ``[B, D, T]`` (channels first, as ``gram_matrix`` takes)."""
        pixels = self.encoder.preprocess(images, cutouts=False)
        hidden = self.encoder.model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states
        return [hidden[layer].float().transpose(1, 2) for layer in self.layers]

    def __call__(self, images: torch.Tensor, cond: object = None) -> torch.Tensor:
        return -self.scale * style_distance(self._features(images), self.reference)


class PickScoreReward:
    """PickScore (Kirstain et al. 2023, "Pick-a-Pic", arXiv 2305.01569): ``r(x) = exp(s) cos(E_img(x), E_txt(p))``,
    the logit of the CLIP-H model fine-tuned on human preferences (``s``: its learned ``logit_scale``).

    Prompts are handled as by ``ClipScoreReward`` (one for all, one per image, or indexed by ``cond``). The model is
    a ``transformers`` CLIP model with its tokenizer: a folder saved with ``save_pretrained`` or a Hub id (e.g.
    ``yuvalkirstain/PickScore_v1``), from ``path`` or ``$SDO_PICKSCORE_PATH``; the image preprocessing is the
    differentiable one of ``ClipImageEncoder`` (resize to the vision size, CLIP normalization).
    """

    def __init__(
        self, prompt: str | list[str], path: str | os.PathLike | None = None, device="cpu", cutouts: int = 0
    ) -> None:
        source = _model(path, "SDO_PICKSCORE_PATH", "PickScore model")
        self.encoder = ClipImageEncoder(source, device=device, cutouts=cutouts)
        self.text = PromptTexts(self.encoder, prompt)
        self.scale = float(self.encoder.model.logit_scale.exp())

    def __call__(self, images: torch.Tensor, cond: object = None) -> torch.Tensor:
        return self.scale * (self.encoder.image_embeds(images) * self.text.select(cond)).sum(dim=-1)


def clip_reward(
    name: str,
    encoder: ClipImageEncoder | None,
    prompts: list[str],
    *,
    aesthetic_head: str | os.PathLike | None = None,
    style_image: str | os.PathLike | None = None,
    pickscore_path: str | os.PathLike | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
):
    """The CLIP-based image reward ``name`` (one of ``CLIP_REWARDS``) as ``reward(images, cond) -> [B]``.

    "clip": ``ClipScoreReward(prompts)`` (``cond`` may index the prompts); "aesthetic": ``AestheticReward``
    (``aesthetic_head`` or ``$SDO_AESTHETIC_HEAD``); "style": ``ClipStyleReward`` against the image ``style_image``;
    "pickscore": ``PickScoreReward(prompts)`` from its own model (``pickscore_path`` or ``$SDO_PICKSCORE_PATH``; it
    does not use ``encoder``, which may then be None). ``max_pixels`` bounds the style image
    (``sdo.io.load_image``).
    """
    if name == "pickscore":
        device = encoder.model.device if encoder is not None else "cpu"
        return PickScoreReward(prompts, pickscore_path or None, device=device)
    if encoder is None:
        raise ConfigError(f"the {name!r} reward needs a CLIP image encoder (`encoder`).")
    if name == "clip":
        return ClipScoreReward(prompts, encoder=encoder)
    if name == "aesthetic":
        return AestheticReward(aesthetic_head or None, encoder=encoder)
    if name == "style":
        if not style_image:
            raise ConfigError("the style reward needs a reference image (`style_image`: PNG, JPEG, WebP, TIFF).")
        reference = load_image(style_image, encoder.model.device, max_pixels=max_pixels)
        return ClipStyleReward(reference, encoder=encoder)
    raise ConfigError(f"the CLIP-based reward must be one of {CLIP_REWARDS}, got {name!r}.")
