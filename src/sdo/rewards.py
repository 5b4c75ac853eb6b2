"""Rewards: latent rewards (``sdo.LatentReward``), plain callables ``reward(x0, cond) -> tensor[batch]``, higher is
better, differentiable in ``x0``.

Images are the embedded model's ``[batch, 1, 32, 32]`` in [-1, 1] unless a reward says otherwise. ``cond`` is
whatever the task passes along (unused by the built-ins, kept so that user rewards can see the condition).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .protocols import LatentReward

__all__ = [
    "AdversarialReward",
    "ClassifierReward",
    "StyleReward",
    "WeightedReward",
    "gram_matrix",
    "latent_prior",
    "style_distance",
]


def _target_tensor(target: int | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    target = torch.as_tensor(target, device=device).long()
    if target.ndim == 0:
        return target.expand(batch)
    if target.shape != (batch,):
        raise ConfigError(
            f"`target` must be a class index or a [batch] tensor, got shape {tuple(target.shape)} "
            f"for a batch of {batch}."
        )
    return target


class ClassifierReward:
    """Log-probability of a target class under a classifier: ``r(x) = log softmax(f(x))[target]``.

    Steers a generation into class ``target`` (or sharpens its own class), as the paper's classifier-guided
    tasks (Dou et al. 2025, Sec. 5) do with CLIP.

    With ``views > 0`` the log-probability is averaged over that many random translations of the image (up to
    ``max_shift`` pixels, background-filled, the same shifts at every call): the analogue of the random cut-outs of
    the paper's CLIP rewards, which makes pixel-level adversarial patterns pay less.

    Args:
        classifier: ``[B, C, H, W] -> logits [B, K]`` (e.g. ``sdo.zoo.load_reward_classifier()``).
        target: class index, or ``[batch]`` tensor of indices.
        views: number of random translations (0: the image as it is).
        max_shift: largest translation in pixels; seed: seeds the translations.
    """

    def __init__(
        self, classifier: nn.Module, target: int | torch.Tensor, views: int = 0, max_shift: int = 2, seed: int = 0
    ) -> None:
        self.classifier = classifier
        self.target = target
        self.shifts = torch.randint(0, 2 * max_shift + 1, (views, 2), generator=torch.Generator().manual_seed(seed))
        self.max_shift = max_shift

    def _views(self, x0: torch.Tensor) -> torch.Tensor:
        if not len(self.shifts):
            return x0
        size = x0.shape[-1]
        padded = F.pad(x0, (self.max_shift,) * 4, value=-1.0)
        return torch.cat([padded[..., dy : dy + size, dx : dx + size] for dy, dx in self.shifts.tolist()])

    def __call__(self, x0: torch.Tensor, cond: object = None) -> torch.Tensor:
        log_probs = F.log_softmax(self.classifier(self._views(x0)), dim=1)
        target = _target_tensor(self.target, x0.shape[0], x0.device).repeat(max(1, len(self.shifts)))
        chosen = log_probs.gather(1, target[:, None]).squeeze(1)
        return chosen.reshape(-1, x0.shape[0]).mean(dim=0)


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """``G = F F^T / (C N)`` of ``features`` ``[B, C, *positions]`` (N positions) -> ``[B, C, C]``
    (Gatys et al. 2016, Eq. 3)."""
    flat = features.flatten(2)
    return flat @ flat.transpose(1, 2) / (flat.shape[1] * flat.shape[2])


def style_distance(features: list[torch.Tensor], reference_grams: list[torch.Tensor]) -> torch.Tensor:
    """``sum_l || G(F_l) - G_l^ref ||_F^2`` per sample ``[B]`` over paired feature maps and reference Grams."""
    total = 0.0
    for layer, reference in zip(features, reference_grams, strict=True):
        total = total + (gram_matrix(layer).float() - reference).square().sum(dim=(1, 2))
    return total


class StyleReward:
    """Style match: ``r(x) = - sum_l || G_l(x) - G_l(ref) ||_F^2`` over the feature maps of a frozen network.

    The paper's style-transfer task (Gram matrices of CLIP features against a reference image), transposed to
    the embedded model: the features are the reward classifier's conv blocks. ``r(ref) = 0`` exactly.

    Args:
        feature_net: module with ``features(x) -> list[Tensor[B, C, H, W]]`` (``sdo.zoo.RewardNet`` has one).
        reference: ``[1, C, H, W]`` or ``[batch, C, H, W]`` style image(s).
        scale: multiplies the loss (defaults to 1e3, so that typical values are of order 1).
    """

    def __init__(self, feature_net: nn.Module, reference: torch.Tensor, scale: float = 1e3) -> None:
        self.feature_net = feature_net
        self.scale = scale
        with torch.no_grad():
            self.reference_grams = [gram_matrix(f) for f in feature_net.features(reference)]

    def __call__(self, x0: torch.Tensor, cond: object = None) -> torch.Tensor:
        return -self.scale * style_distance(self.feature_net.features(x0), self.reference_grams)


class AdversarialReward:
    """Adversarial sample: make the attacked classifier say ``target`` while the image stays what it was.

    ``r(x) = log p_attacked(target | x) - proximity * mean((x - x_orig)^2)``; the proximity term keeps the image
    close to the original sample so that an independent judge still sees the source class (the paper's
    adversarial-sample task). ``verdicts`` reports both classifiers' decisions; the judge is never part of ``r``.

    Args:
        attacked: the classifier under attack (``[B, ...] -> logits``).
        target: the class it should output.
        original: ``[batch, ...]`` the unoptimized samples.
        proximity (`float`, defaults to 20.0): weight of the squared-distance term.
    """

    def __init__(
        self, attacked: nn.Module, target: int | torch.Tensor, original: torch.Tensor, proximity: float = 20.0
    ) -> None:
        self.attacked = attacked
        self.target = target
        self.original = original.detach()
        self.proximity = proximity

    def __call__(self, x0: torch.Tensor, cond: object = None) -> torch.Tensor:
        if x0.shape != self.original.shape:
            raise ConfigError(f"`x0` has shape {tuple(x0.shape)}, the originals {tuple(self.original.shape)}.")
        log_probs = F.log_softmax(self.attacked(x0), dim=1)
        target = _target_tensor(self.target, x0.shape[0], x0.device)
        distance = (x0 - self.original).square().flatten(1).mean(dim=1)
        return log_probs.gather(1, target[:, None]).squeeze(1) - self.proximity * distance

    @torch.no_grad()
    def verdicts(self, x0: torch.Tensor, judge: nn.Module) -> dict[str, torch.Tensor]:
        """``{"attacked": classes [B], "judge": classes [B]}``: what each classifier says ``x0`` is."""
        return {"attacked": self.attacked(x0).argmax(dim=1), "judge": judge(x0).argmax(dim=1)}


def latent_prior(latent: torch.Tensor) -> torch.Tensor:
    """Gaussian-shell regularizer ``(||z|| - sqrt(d))^2 / d`` per sample ``[batch]`` (lower is better).

    A d-dimensional standard normal concentrates on the sphere of radius ``sqrt(d)``; keeping the optimized latent
    there keeps it a plausible initial noise and limits reward hacking (as in DOODL / DNO-style optimization).
    """
    flat = latent.flatten(1)
    dim = flat.shape[1]
    return (flat.norm(dim=1) - dim**0.5).square() / dim


class WeightedReward:
    """A weighted sum of rewards, ``r(x, c) = sum_i w_i r_i(x, c)``, differentiable as its terms are.

    After each call, ``last_terms`` holds every term's unweighted values ``{name: [B]}`` (detached), so that a
    training loop can log each one separately (``sdo optimize`` and ``sdo finetune`` write them as
    ``reward_NAME``).

    Args:
        terms: ``{name: (weight, reward)}`` with latent rewards; weights must be >= 0 (a negative weight would turn
            a reward into a cost: say so with a reward of your own).
    """

    def __init__(self, terms: dict[str, tuple[float, LatentReward]]) -> None:
        if not terms:
            raise ConfigError("`terms` must hold at least one reward.")
        negative = [name for name, (weight, _) in terms.items() if weight < 0]
        if negative:
            raise ConfigError(f"reward weights must be >= 0; negative for {', '.join(negative)}.")
        self.terms = dict(terms)
        self.last_terms: dict[str, torch.Tensor] = {}

    def __call__(self, x0: torch.Tensor, cond: object = None) -> torch.Tensor:
        values = {name: reward(x0, cond) for name, (_, reward) in self.terms.items()}
        self.last_terms = {name: value.detach() for name, value in values.items()}
        return sum(self.terms[name][0] * value for name, value in values.items())
