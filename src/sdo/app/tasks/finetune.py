"""What fine-tuning trains: the embedded model with class labels, or a text-to-image pipeline with prompts.

A target draws a global batch of conditions and noises from a generator, builds a sampler for a batch of
conditions, scores samples with its reward, and evaluates the model on fixed conditions and noise (held-out
conditions for the embedded model; the evaluation prompts for a pipeline), returning the measures and the images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from sdo import zoo
from sdo.app.lora import ZOO_LORA_TARGETS
from sdo.app.pipeline_options import ZOO_GUIDANCE
from sdo.app.prompts import read_prompts
from sdo.app.quality import frechet_distance
from sdo.checks import check_rewards
from sdo.gradients import NoGrad
from sdo.rewards import ClassifierReward
from sdo.sampling import Sampler

__all__ = ["EVALUATION_MEASURES", "PipelineTarget", "ZooTarget", "ink_reward"]

EVALUATION_MEASURES = ("judge_accuracy", "frechet_judge", "eval_reward")
"""What the targets' evaluators measure (every other metric of a record comes from the training batch)."""


def ink_reward(x0: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Stroke mass: the mean ink ``(clamp(x, -1, 1) + 1) / 2`` of each image ``[B]``, in [0, 1] (bolder digits
    score higher; values outside the displayable range earn nothing)."""
    return ((x0.clamp(-1, 1) + 1) / 2).flatten(1).mean(dim=1)


def _unet_alias(target) -> torch.nn.Module:
    """The target's ``network``: ``unet``, a read-only alias kept for code written before the attribute was named
    ``network`` (a pipeline's network may be a transformer)."""
    return target.network


class ZooTarget:
    """The embedded MNIST model; conditions are class labels; tasks "confidence" (reward classifier
    log-probability of the conditioned class) and "bold" (stroke mass)."""

    lora_targets = ZOO_LORA_TARGETS
    unet = property(_unet_alias)

    def __init__(self, config, device: torch.device, reward: Callable | None = None) -> None:
        self.config = config
        self.device = device
        self.network = zoo.load_unet(device)
        if reward is not None:  # the caller's latent reward(x0 in [-1, 1], labels) -> [B]
            self.reward = reward
        elif config.task == "bold":
            self.reward = ink_reward
        else:
            classifier = zoo.load_reward_classifier(device)
            self.reward = lambda x0, labels: ClassifierReward(classifier, labels)(x0)

    def draw(self, generator: torch.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels ``[B]`` and noises ``[B, 1, 32, 32]``."""
        labels = torch.randint(0, zoo.NUM_CLASSES, (batch,), generator=generator)
        return labels, zoo.noise(batch, generator)

    def sampler(self, network: torch.nn.Module, labels: torch.Tensor) -> Sampler:
        sampler = zoo.ddim_sampler(network, labels, self.config.sample_steps, self.config.guidance or ZOO_GUIDANCE)
        return sampler.with_options(compile=True) if self.config.compile else sampler

    def evaluator(self):
        """Held-out labels with fixed noise: judge accuracy, Frechet distance to real digits in judge space, and the
        training reward on these samples (``eval_reward``, the held-out reward);
        ``evaluate(network) -> (measures, images [B, 1, 32, 32] in [0, 1])``."""
        judge = zoo.load_judge(self.device)
        real, _ = zoo.load_digits(self.device)
        with torch.no_grad():
            real_features = judge.embed(real)
        labels = torch.arange(zoo.NUM_CLASSES, device=self.device).repeat_interleave(self.config.eval_per_class)
        noise = zoo.noise(len(labels), 10_000 + self.config.seed, self.device)

        @torch.no_grad()
        def evaluate(network: torch.nn.Module) -> dict[str, float]:
            samples = self.sampler(network, labels).sample(noise, grad=NoGrad()).clamp(-1, 1)
            accuracy = (judge(samples).argmax(1) == labels).float().mean()
            measures = {
                "judge_accuracy": float(accuracy),
                "frechet_judge": frechet_distance(judge.embed(samples), real_features),
                "eval_reward": float(self.reward(samples, labels).mean()),
            }
            return measures, zoo.to_images(samples)

        return evaluate


class PipelineTarget:
    """A text-to-image pipeline (SD, SDXL, SD3, Flux); conditions are indices into the training prompts.

    The reward is an image reward ``reward(images [B, 3, H, W] in [0, 1], prompts) -> [B]`` on the decoded sample
    (``PipelineParts.latent_reward``): the caller's, or the config's ``--reward``/``--task`` (``aesthetic``,
    ``clip``, ``style``, ``pickscore`` or a weighted sum). Evaluation scores the same reward on ``eval_prompts``
    with fixed noise. LoRA adapts the network's attention projections (``sdo.pipelines.lora_targets``).

    Args:
        config: the ``FinetuneConfig``.
        device: where the pipeline runs.
        pipeline: a loaded diffusers pipeline (defaults to loading ``config.pipeline``).
        prompts: the training prompts (defaults to ``config.prompts``' lines).
        eval_prompts: the evaluation prompts (defaults to ``config.eval_prompts``' lines, else ``prompts``;
            ``eval_on_training_prompts`` says which).
        image_reward: the caller's image reward; nothing else is loaded for scoring then.
    """

    unet = property(_unet_alias)

    def __init__(
        self,
        config,
        device: torch.device,
        pipeline=None,
        prompts: list[str] | None = None,
        eval_prompts: list[str] | None = None,
        image_reward: Callable | None = None,
    ) -> None:
        from sdo.pipelines import from_pipeline, load_pipeline

        prompts = list(prompts) if prompts is not None else read_prompts(config.prompts)
        if eval_prompts is None and config.eval_prompts:
            eval_prompts = read_prompts(config.eval_prompts, "--eval-prompts")
        self.eval_on_training_prompts = eval_prompts is None
        self.eval_prompts = prompts if eval_prompts is None else list(eval_prompts)
        self.config, self.device, self.prompts = config, device, prompts
        self.pipe = load_pipeline(config.pipeline) if pipeline is None else pipeline
        options = dict(guidance_scale=config.guidance or None, device=device, **config.size())
        self.parts = from_pipeline(self.pipe, prompts, **options)
        same = self.eval_prompts == prompts
        self.eval_parts = self.parts if same else from_pipeline(self.pipe, self.eval_prompts, **options)
        self.network = self.parts.network
        self.lora_targets = self.parts.lora_targets
        self.image_reward = image_reward if image_reward is not None else config.image_reward(prompts, device)
        self.reward = self.parts.latent_reward(self.image_reward)

    def draw(self, generator: torch.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt indices ``[B]`` and initial latents ``[B, C, h, w]``."""
        index = torch.randint(0, len(self.prompts), (batch,), generator=generator)
        return index, torch.randn(batch, *self.parts.latent_shape[1:], generator=generator)

    def sampler(self, network: torch.nn.Module, index: torch.Tensor, parts=None) -> Sampler:
        """The pipeline's sampler over ``network`` conditioned on prompts ``index`` ``[B]`` (of ``parts``' prompts,
        the training ones by default)."""
        parts = parts or self.parts
        model_fn = replace(parts.model_fn.rows(index.to(self.device)), model=network)
        return parts.sampler(self.config.sample_steps, model_fn, compile=self.config.compile)

    def evaluator(self):
        """Mean reward on every evaluation prompt with fixed noise, in batches of ``batch_size`` prompts (memory
        does not grow with the number of prompts); ``evaluate(network) -> (measures, images [P, 3, H, W] in [0, 1])``
        with ``eval_reward`` and ``eval_on_training_prompts``."""
        size, parts = self.config.batch_size, self.eval_parts

        @torch.no_grad()
        def evaluate(network: torch.nn.Module) -> tuple[dict, torch.Tensor]:
            generator = torch.Generator().manual_seed(10_000 + self.config.seed)
            total, images = 0.0, []
            for first in range(0, len(self.eval_prompts), size):
                index = torch.arange(first, min(first + size, len(self.eval_prompts)))
                noise = torch.randn(len(index), *parts.latent_shape[1:], generator=generator).to(self.device)
                decoded = parts.decode(self.sampler(network, index, parts).sample(noise, grad=NoGrad()))
                rewards = self.image_reward(decoded, [self.eval_prompts[i] for i in index.tolist()])
                total += float(check_rewards(rewards, len(index)).sum())
                images.append(decoded.float().cpu())
            measures = {
                "eval_reward": total / len(self.eval_prompts),
                "eval_on_training_prompts": self.eval_on_training_prompts,
            }
            return measures, torch.cat(images)

        return evaluate
