"""``sdo train-zoo``: trains the embedded model and both classifiers, deterministically from one seed.

The diffusion model is trained with the DDPM objective (Ho et al. 2020, Eq. 14: ``|| eps - eps_theta(x_t, t, y) ||^2``)
with 10% label dropout to the null class for classifier-free guidance (Ho & Salimans 2022), and an exponential
moving average of its weights is what ships. Quality is then measured as the judge's accuracy on class-conditional
DDIM samples (50 steps, guidance), the figure the README quotes.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from sdo.checks import check_positive, check_seed
from sdo.errors import ConfigError

from ..io import save_json, save_tensors
from .data import mnist_splits, to_model_space
from .nets import NULL_CLASS, UNET_CONFIG, JudgeNet, RewardNet, build_unet


@dataclass(frozen=True)
class ZooTrainingConfig:
    """Everything that determines the shipped weights.

    Attributes:
        seed: seeds every random draw (initialisation, batches, noise, label dropout).
        unet_steps: optimizer updates of the diffusion model.
        batch_size: images per update.
        lr: peak learning rate (linear warm-up over 100 updates, cosine decay to 0).
        ema_decay: decay of the weight average that ships.
        label_dropout: probability of replacing a label by the null class.
        classifier_epochs: epochs over the training digits for each classifier.
        eval_guidance: guidance scale of the quality check (and the zoo's default).
        eval_per_class: samples per class in the quality check.
    """

    seed: int = 0
    unet_steps: int = 2000
    batch_size: int = 64
    lr: float = 2e-3
    ema_decay: float = 0.995
    label_dropout: float = 0.1
    classifier_epochs: int = 8
    eval_guidance: float = 3.0
    eval_per_class: int = 10

    def __post_init__(self) -> None:
        for name in ("unet_steps", "batch_size", "classifier_epochs", "eval_per_class"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        if not 0 <= self.label_dropout < 1 or not 0 < self.ema_decay < 1:
            raise ConfigError("`label_dropout` must be in [0, 1) and `ema_decay` in (0, 1).")
        check_positive(self.lr, "lr")
        check_seed(self.seed)


def random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (classifier augmentation), filling with background."""
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    size = images.shape[-1]
    shifts = torch.randint(0, 2 * max_shift + 1, (images.shape[0], 2), generator=generator)
    return torch.stack([padded[i, :, dy : dy + size, dx : dx + size] for i, (dy, dx) in enumerate(shifts.tolist())])


def train_classifier(net, images, labels, epochs: int, generator: torch.Generator, desc: str):
    """Adam, cross-entropy, shifted digits; returns the trained net in eval mode."""
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    steps = epochs * math.ceil(len(labels) / 128)
    with tqdm(total=steps, desc=desc, leave=False) as bar:
        for _ in range(epochs):
            for batch in torch.randperm(len(labels), generator=generator).split(128):
                loss = F.cross_entropy(net(random_shift(images[batch], generator)), labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update()
    return net.eval()


@torch.no_grad()
def accuracy(net, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``images`` classified as ``labels``."""
    return float((net(images).argmax(dim=1) == labels).float().mean())


def train_unet(images, labels, config: ZooTrainingConfig, generator: torch.Generator):
    """DDPM training with label dropout; returns the EMA model."""
    unet, noise_schedule = build_unet(), DDPMScheduler(num_train_timesteps=1000)
    ema = build_unet().requires_grad_(False)
    ema.load_state_dict(unet.state_dict())
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _warmup_cosine(step, config.unet_steps))
    with tqdm(total=config.unet_steps, desc="diffusion model") as bar:
        for _ in range(config.unet_steps):
            batch = torch.randint(0, len(labels), (config.batch_size,), generator=generator)
            x0, y = images[batch], labels[batch].clone()
            y[torch.rand(len(y), generator=generator) < config.label_dropout] = NULL_CLASS
            noise = torch.randn(x0.shape, generator=generator)
            t = torch.randint(0, 1000, (len(y),), generator=generator)
            loss = F.mse_loss(unet(noise_schedule.add_noise(x0, noise, t), t, class_labels=y).sample, noise)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                for avg, live in zip(ema.parameters(), unet.parameters(), strict=True):
                    avg.lerp_(live, 1 - config.ema_decay)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            bar.update()
    return ema.eval()


def _warmup_cosine(step: int, total: int, warmup: int = 100) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_zoo(out_dir: str | Path, config: ZooTrainingConfig | None = None) -> dict:
    """Train everything, write ``unet``, ``reward_classifier``, ``judge_classifier``, ``digits`` (safetensors) and
    ``zoo.json`` (configs and quality figures) into ``out_dir`` atomically, and return the figures."""
    from . import sample_digits  # late: the package's loaders import this module's siblings

    config = config or ZooTrainingConfig()
    out_dir = Path(out_dir)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    started = time.time()
    (train_pixels, train_labels), (held_pixels, held_labels) = mnist_splits()
    train_images, held_images = to_model_space(train_pixels), to_model_space(held_pixels)

    reward_net = train_classifier(
        RewardNet(), train_images, train_labels, config.classifier_epochs, generator, "reward"
    )
    judge_net = train_classifier(JudgeNet(), train_images, train_labels, config.classifier_epochs, generator, "judge")
    unet = train_unet(train_images, train_labels, config, generator)

    classes = torch.arange(10).repeat_interleave(config.eval_per_class)
    samples = sample_digits(unet, classes, guidance_scale=config.eval_guidance, seed=config.seed)
    metrics = {
        "reward_classifier_held_out_accuracy": accuracy(reward_net, held_images, held_labels),
        "judge_held_out_accuracy": accuracy(judge_net, held_images, held_labels),
        "judge_accuracy_on_samples": accuracy(judge_net, samples, classes),
        "reward_classifier_accuracy_on_samples": accuracy(reward_net, samples, classes),
        "training_seconds": round(time.time() - started, 1),
    }
    save_tensors(unet.state_dict(), out_dir / "unet.safetensors")
    save_tensors(reward_net.state_dict(), out_dir / "reward_classifier.safetensors")
    save_tensors(judge_net.state_dict(), out_dir / "judge_classifier.safetensors")
    save_tensors({"images": held_pixels, "labels": held_labels}, out_dir / "digits.safetensors")
    save_json({"unet_config": UNET_CONFIG, "training": asdict(config), "metrics": metrics}, out_dir / "zoo.json")
    return metrics
