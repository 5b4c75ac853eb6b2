"""What fine-tuning trains: the embedded model with class labels, or a local Stable Diffusion with prompts.

A target draws a global batch of conditions and noises from a generator, builds a sampler for a batch of
conditions, scores samples with its reward, and evaluates held-out conditions (to make reward hacking visible).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from sdo import zoo
from sdo.app.quality import frechet_distance
from sdo.errors import ConfigError
from sdo.gradients import NoGrad
from sdo.rewards import ClassifierReward
from sdo.sampling import Sampler

__all__ = ["PipelineTarget", "ZooTarget", "ink_reward"]


def ink_reward(x0: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Stroke mass: the mean ink ``(clamp(x, -1, 1) + 1) / 2`` of each image ``[B]``, in [0, 1] (bolder digits
    score higher; values outside the displayable range earn nothing)."""
    return ((x0.clamp(-1, 1) + 1) / 2).flatten(1).mean(dim=1)


class ZooTarget:
    """The embedded MNIST model; conditions are class labels; tasks "confidence" (reward classifier
    log-probability of the conditioned class) and "bold" (stroke mass)."""

    lora_targets = "to_q,to_k,to_v,to_out.0,conv1,conv2"

    def __init__(self, config, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.unet = zoo.load_unet(device)
        if config.task == "bold":
            self.reward = ink_reward
        else:
            classifier = zoo.load_reward_classifier(device)
            self.reward = lambda x0, labels: ClassifierReward(classifier, labels)(x0)

    def draw(self, generator: torch.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels ``[B]`` and noises ``[B, 1, 32, 32]``."""
        labels = torch.randint(0, zoo.NUM_CLASSES, (batch,), generator=generator)
        return labels, zoo.noise(batch, generator)

    def sampler(self, unet: torch.nn.Module, labels: torch.Tensor) -> Sampler:
        sampler = zoo.ddim_sampler(unet, labels, self.config.sample_steps, self.config.guidance)
        if not self.config.compile:
            return sampler
        return Sampler(sampler.model_fn, sampler.scheduler, self.config.sample_steps, compile=True)

    def evaluator(self):
        """Held-out labels with fixed noise: judge accuracy, and Frechet distance to real digits in judge space."""
        judge = zoo.load_judge(self.device)
        real, _ = zoo.load_digits(self.device)
        with torch.no_grad():
            real_features = judge.embed(real)
        labels = torch.arange(zoo.NUM_CLASSES, device=self.device).repeat_interleave(self.config.eval_per_class)
        noise = zoo.noise(len(labels), 10_000 + self.config.seed, self.device)

        @torch.no_grad()
        def evaluate(unet: torch.nn.Module) -> dict[str, float]:
            samples = self.sampler(unet, labels).sample(noise, grad=NoGrad()).clamp(-1, 1)
            accuracy = (judge(samples).argmax(1) == labels).float().mean()
            return {
                "judge_accuracy": float(accuracy),
                "frechet_judge": frechet_distance(judge.embed(samples), real_features),
            }

        return evaluate


class PipelineTarget:
    """A text-to-image pipeline (SD, SDXL, SD3, Flux) from a local folder; conditions are prompt indices into the
    prompt file; rewards "aesthetic", "clip" (CLIP similarity to the sample's own prompt), "style" (CLIP Gram
    matrices against a reference image), "pickscore", or a weighted sum of them (``--reward``), on the decoded
    image. LoRA adapts the network's attention projections (``sdo.pipelines.lora_targets``)."""

    def __init__(self, config, device: torch.device) -> None:
        from sdo.pipelines import from_pipeline

        prompts = [line.strip() for line in Path(config.prompts).read_text().splitlines() if line.strip()]
        if not prompts:
            raise ConfigError(f"`prompts` file {config.prompts} holds no prompt (one per line).")
        self.config, self.device, self.prompts = config, device, prompts
        self.parts = from_pipeline(
            config.pipeline,
            prompts,
            guidance_scale=config.guidance,
            device=device,
            **config.size(),
        )
        self.unet = self.parts.unet
        self.lora_targets = self.parts.lora_targets
        self.reward = self.parts.latent_reward(config.image_reward(prompts, device))

    def draw(self, generator: torch.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt indices ``[B]`` and initial latents ``[B, C, h, w]``."""
        index = torch.randint(0, len(self.prompts), (batch,), generator=generator)
        return index, torch.randn(batch, *self.parts.latent_shape[1:], generator=generator)

    def sampler(self, unet: torch.nn.Module, index: torch.Tensor) -> Sampler:
        """The pipeline's sampler over ``unet`` conditioned on prompts ``index`` ``[B]``."""
        model_fn = replace(self.parts.model_fn.rows(index.to(self.device)), model=unet)
        return self.parts.sampler(self.config.sample_steps, model_fn, compile=self.config.compile)

    def evaluator(self):
        """Mean reward on every prompt with fixed noise, in batches of ``batch_size`` prompts (memory does not grow
        with the number of prompts)."""
        size = self.config.batch_size

        @torch.no_grad()
        def evaluate(unet: torch.nn.Module) -> dict[str, float]:
            generator = torch.Generator().manual_seed(10_000 + self.config.seed)
            total = 0.0
            for first in range(0, len(self.prompts), size):
                index = torch.arange(first, min(first + size, len(self.prompts)))
                noise = torch.randn(len(index), *self.parts.latent_shape[1:], generator=generator).to(self.device)
                samples = self.sampler(unet, index).sample(noise, grad=NoGrad())
                total += float(self.reward(samples, index).sum())
            return {"held_out_reward": total / len(self.prompts)}

        return evaluate
