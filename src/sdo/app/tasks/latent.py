"""Latent-optimization tasks on the embedded model: class steering, style transfer, adversarial samples.

One config dataclass (``LatentTaskConfig``) describes a run; the ``sdo optimize`` flags are generated from it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from sdo import zoo
from sdo.app.options import option
from sdo.app.reward_spec import parse_reward_spec
from sdo.checks import check_positive, check_seed
from sdo.clip_rewards import CLIP_REWARDS
from sdo.doodl import optimize_latent_doodl
from sdo.edict import EDICTSampler
from sdo.errors import ConfigError
from sdo.freedom import freedom_sample
from sdo.gradients import NoGrad
from sdo.io import load_image
from sdo.latent import OptimizationResult, optimize_latent
from sdo.memory import PeakMemory
from sdo.methods import METHODS, MethodOptions, gradient_mode, method_names
from sdo.rewards import AdversarialReward, ClassifierReward, StyleReward
from sdo.sampling import Sampler

__all__ = [
    "LATENT_METHODS",
    "LatentTask",
    "LatentTaskConfig",
    "TaskResources",
    "build_task",
    "load_resources",
    "run_task",
]

LATENT_METHODS = method_names("latent")
TASKS = ("class", "style", "adversarial")


@dataclass(frozen=True)
class LatentTaskConfig:
    """One latent-optimization run on the embedded model (every field is a ``sdo optimize`` flag)."""

    task: Literal["class", "style", "adversarial"] = option("class", "what to optimize for", choices=TASKS)
    method: str = option("sdo", "gradient estimator (sdo bench --list-methods)", choices=LATENT_METHODS)
    source: int = option(3, "class of the generated digits (-1: unconditional samples, no guidance)")
    target: int = option(8, "class to steer to (class, adversarial) or of the style reference (style)")
    steps: int = option(50, "DDIM steps")
    iters: int = option(30, "Adam iterations")
    lr: float = option(0.05, "Adam learning rate")
    batch: int = option(8, "latents optimized at once")
    seed: int = option(0, "seed of the initial noise")
    start_step: int = option(0, "optimize the latent at this step (after a no-grad warm-up)")
    guidance: float = option(3.0, "classifier-free guidance scale")
    prior_weight: float = option(0.0, "weight of the Gaussian-shell latent regularizer")
    project: bool = option(True, "rescale latents to their initial norm after each step (the hard shell prior)")
    views: int = option(4, "class/adversarial: average the classifier over this many random 2-pixel shifts")
    proximity: float | None = option(
        None,
        "weight of the pixel term keeping the image near the original (default: 20 for the adversarial task, "
        "0 with --image)",
        type=float,
    )
    adjoint_iters: int = option(2, "adjoint: fixed-point refinements of each reconstructed state")
    kept_steps: str = option("", "sdo-multi: comma-separated kept step indices (default: 4 spread over the run)")
    doodl_lr: float = option(1.0, "doodl: gradient scale before element-wise clipping at 1e-3 (the authors' rule)")
    freedom_scale: float = option(0.2, "freedom: guidance step as a fraction of the solver update")
    freedom_repeats: int = option(1, "freedom: time-travel passes per step in the first half of the window")
    device: str = option("cpu", "torch device")
    out: str = option("sdo-optimize", "output folder")
    pipeline: str = option("", "optimize a local Stable Diffusion folder's latents instead of the embedded model")
    prompt: str = option("", "--pipeline: the prompt")
    reward: str = option(
        "clip",
        f"--pipeline: one of {', '.join(CLIP_REWARDS)}, or a weighted sum such as clip=1.0,aesthetic=0.5",
    )
    clip_path: str = option("", "--pipeline: local CLIP folder (or $SDO_CLIP_PATH)")
    pickscore_path: str = option("", "--pipeline, pickscore: local PickScore CLIP folder (or $SDO_PICKSCORE_PATH)")
    aesthetic_head: str = option("", "--pipeline, aesthetic: head safetensors (or $SDO_AESTHETIC_HEAD)")
    style_image: str = option("", "--pipeline, style: reference image (PNG)")
    height: int = option(0, "--pipeline: image height (0: the pipeline's default)")
    width: int = option(0, "--pipeline: image width (0: the pipeline's default)")

    def method_options(self) -> MethodOptions:
        """What the registry's gradient mode for ``method`` takes from this config (a latent is optimized)."""
        return MethodOptions("latent", adjoint_iters=self.adjoint_iters, kept_steps=_index_list(self.kept_steps))

    conditions: int = option(
        0,
        "optimize N class-steering items (source, target and seed from the item index and --seed), sharded over "
        "the processes of `accelerate launch`; results under OUT/items/<index>/ (0: one run of --source/--target)",
    )
    prompts: str = option(
        "", "--pipeline: a file of prompts, one item per line, sharded over processes like --conditions"
    )
    compile: bool = option(False, "run the no-grad network calls through torch.compile (CUDA: CUDA graphs)")
    threads: int = option(0, "torch threads per process (0: the machine's cores divided among the processes)")
    image: list[str] = option(  # noqa: RUF009 (the default is an immutable (); __post_init__ stores a list)
        (),
        "--pipeline: edit this image (PNG, JPEG, WebP): invert it to --start-step under --prompt, then optimize; "
        "repeat the flag for a batch",
        action="append",
    )
    images: str = option("", "--pipeline: edit every PNG/JPEG/WebP image of this folder, as one batch")
    inversion_guidance: float = option(1.0, "--image: classifier-free guidance scale of the inversion")

    def __post_init__(self) -> None:
        # a list, as the flag and config.json give it back (a recorded config compares equal to the current one)
        object.__setattr__(self, "image", [self.image] if isinstance(self.image, str) else list(self.image))
        if self.task not in TASKS:
            raise ConfigError(f"`task` must be one of {TASKS}, got {self.task!r}.")
        if self.method not in LATENT_METHODS:
            raise ConfigError(f"`method` must be one of {LATENT_METHODS} for a latent, got {self.method!r}.")
        if not -1 <= self.source < zoo.NUM_CLASSES:
            raise ConfigError(f"`source` must be a digit class in [0, 9] or -1 (unconditional), got {self.source}.")
        if self.task == "adversarial" and self.source == -1:
            raise ConfigError("The adversarial task needs a source class (`source` in [0, 9]), not -1.")
        if not 0 <= self.target < zoo.NUM_CLASSES:
            raise ConfigError(f"`target` must be a digit class in [0, 9], got {self.target}.")
        for name in ("steps", "batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        if self.iters < 0 or self.lr <= 0:
            raise ConfigError(f"`iters` must be >= 0 and `lr` > 0, got iters={self.iters}, lr={self.lr}.")
        check_positive(self.lr, "lr")
        check_seed(self.seed)
        if not 0 <= self.start_step < self.steps:
            raise ConfigError(f"`start_step` must be in [0, {self.steps - 1}], got {self.start_step}.")
        if self.adjoint_iters < 0 or self.freedom_repeats < 1 or self.freedom_scale < 0 or not self.doodl_lr > 0:
            raise ConfigError(
                "`adjoint_iters` must be >= 0, `freedom_repeats` >= 1, `freedom_scale` >= 0 and `doodl_lr` > 0; got "
                f"{self.adjoint_iters}, {self.freedom_repeats}, {self.freedom_scale}, {self.doodl_lr}."
            )
        if METHODS[self.method].kind == "mode":
            gradient_mode(self.method, self.method_options())  # a bad --kept-steps fails here, before any work
        if self.pipeline and not (self.prompt or self.prompts):
            raise ConfigError("`prompt` (or `prompts`, a file of prompts) is required with --pipeline.")
        if self.conditions < 0 or self.threads < 0:
            raise ConfigError(f"`conditions` and `threads` must be >= 0, got {self.conditions} and {self.threads}.")
        if self.conditions and self.pipeline:
            raise ConfigError("`conditions` steers the embedded model's classes; with --pipeline use --prompts FILE.")
        if self.prompts and not self.pipeline:
            raise ConfigError("`prompts` needs --pipeline (the embedded model takes --conditions N).")
        if self.pipeline and "style" in parse_reward_spec(self.reward) and not self.style_image:
            raise ConfigError("`style_image` (a PNG) is required with the style reward.")
        self._check_images()

    def _check_images(self) -> None:
        """``image`` / ``images``: with a pipeline, one batch (not items), files and a folder that exist."""
        if not (self.image or self.images):
            return
        if not self.pipeline:
            raise ConfigError("`image` / `images` edit a real image on a pipeline: add --pipeline DIR.")
        if self.prompts or self.conditions:
            raise ConfigError("`image` / `images` are optimized as one batch; they do not combine with --prompts.")
        if self.proximity is not None and (not math.isfinite(self.proximity) or self.proximity < 0):
            raise ConfigError(f"`proximity` must be a finite number >= 0, got {self.proximity}.")
        if self.images and not Path(self.images).is_dir():
            raise ConfigError(f"`images`: {self.images}: no such folder.")
        from sdo.app.tasks.edit import image_paths

        for path in image_paths(self):
            load_image(path)  # a missing or non-image file is one line here, before any model loads


@dataclass
class LatentTask:
    """A built task: the sampler, the latent to optimize, the reward and the judge's acceptance test."""

    sampler: Sampler
    latent: torch.Tensor
    reward: object
    judge_accepts: object
    original: torch.Tensor
    description: str
    decode: Callable[[torch.Tensor], torch.Tensor] = zoo.to_images  # samples -> images [B, C, H, W] in [0, 1]
    inputs: torch.Tensor | None = None  # image editing: the input images [B, 3, H, W] in [0, 1]
    record: dict = field(default_factory=dict)  # settings the latent file and metrics.json record besides the config


@dataclass
class TaskResources:
    """What every item of a run shares, loaded once: the embedded model's networks, or a pipeline.

    Sharing one network object also lets ``--compile`` compile it once for all items.
    """

    unet: torch.nn.Module | None = None
    reward_net: torch.nn.Module | None = None
    judge: torch.nn.Module | None = None
    pipeline: object = None


def load_resources(config: LatentTaskConfig) -> TaskResources:
    """Load the networks ``config``'s tasks use (the zoo, or the pipeline folder and the CLIP encoder)."""
    device = torch.device(config.device)
    if config.pipeline:
        from sdo.pipelines import load_pipeline

        return TaskResources(pipeline=load_pipeline(config.pipeline))
    return TaskResources(zoo.load_unet(device), zoo.load_reward_classifier(device), zoo.load_judge(device))


def _sampler(sampler: Sampler, config: LatentTaskConfig) -> Sampler:
    """``sampler``, compiled as ``config.compile`` says."""
    if not config.compile:
        return sampler
    return Sampler(sampler.model_fn, sampler.scheduler, sampler.num_inference_steps, eta=sampler.eta, compile=True)


def build_pipeline_task(config: LatentTaskConfig, resources: TaskResources | None = None) -> LatentTask:
    """A local Stable Diffusion pipeline: latents of ``config.prompt`` scored by a CLIP-based reward."""
    from sdo.app.reward_spec import image_reward
    from sdo.pipelines import from_pipeline

    resources = resources or load_resources(config)
    parts = from_pipeline(
        resources.pipeline,
        [config.prompt] * config.batch,
        guidance_scale=config.guidance,
        device=config.device,
        height=config.height or None,
        width=config.width or None,
    )
    sampler = parts.sampler(config.steps, compile=config.compile)
    score = image_reward(
        config.reward,
        [config.prompt],
        device=config.device,
        clip_path=config.clip_path,
        pickscore_path=config.pickscore_path,
        aesthetic_head=config.aesthetic_head,
        style_image=config.style_image,
    )
    with torch.no_grad():
        noise = parts.initial_latent(config.seed)
        latent = noise if config.start_step == 0 else sampler.sample(noise, NoGrad(), stop_step=config.start_step)
        original = sampler.sample(latent, NoGrad(), start_step=config.start_step)
    return LatentTask(
        sampler=sampler,
        latent=latent,
        reward=parts.latent_reward(score),
        judge_accepts=None,
        original=original,
        description=f"{config.reward} reward for {config.prompt!r}",
        decode=parts.decode,
    )


def build_task(config: LatentTaskConfig, resources: TaskResources | None = None) -> LatentTask:
    """Build the sampler, initial latent, reward and judge for ``config``, from ``resources`` (loaded if None)."""
    resources = resources or load_resources(config)
    if config.image or config.images:
        from sdo.app.tasks.edit import build_image_task

        return build_image_task(config, resources)
    if config.pipeline:
        return build_pipeline_task(config, resources)
    device = torch.device(config.device)
    unet, reward_net, judge = resources.unet, resources.reward_net, resources.judge
    unconditional = config.source == -1
    classes = torch.full((config.batch,), zoo.NULL_CLASS if unconditional else config.source, device=device)
    guidance = 1.0 if unconditional else config.guidance
    sampler = _sampler(zoo.ddim_sampler(unet, classes, config.steps, guidance), config)
    source = "digits" if unconditional else f"{config.source}s"
    noise = zoo.noise(config.batch, config.seed, device)
    with torch.no_grad():
        latent = noise if config.start_step == 0 else sampler.sample(noise, NoGrad(), stop_step=config.start_step)
        original = sampler.sample(latent, NoGrad(), start_step=config.start_step)

    def judge_says(digit: int):
        return lambda x0: judge(x0).argmax(dim=1) == digit

    if config.task == "class":
        reward = ClassifierReward(reward_net, config.target, views=config.views)
        accepts, text = judge_says(config.target), f"turn generated {source} into {config.target}s"
    elif config.task == "style":
        images, labels = zoo.load_digits(device)
        reference = images[labels == config.target][:1]
        reward = StyleReward(reward_net, reference)
        accepts = judge_says(config.source) if not unconditional else (lambda x0: judge(x0).argmax(1) >= 0)
        text = f"give generated {source} the stroke style of a real {config.target}, keeping their class"
    else:
        weight = {} if config.proximity is None else {"proximity": config.proximity}  # None: the reward's default
        reward = AdversarialReward(reward_net, config.target, original, **weight)
        reward_says = lambda x0: reward_net(x0).argmax(dim=1) == config.target  # noqa: E731
        accepts = lambda x0: reward_says(x0) & judge_says(config.source)(x0)  # noqa: E731
        text = (
            f"make the reward classifier see {config.target}s in {config.source}s "
            f"that the judge still calls {config.source}s"
        )
    return LatentTask(
        sampler=sampler, latent=latent, reward=reward, judge_accepts=accepts, original=original, description=text
    )


def _index_list(text: str) -> tuple[int, ...] | None:
    """``"3,10,20"`` -> ``(3, 10, 20)``; ``""`` -> None."""
    if not text.strip():
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError as error:
        raise ConfigError(f"`kept_steps` must be comma-separated step indices, got {text!r}.") from error


def run_task(config: LatentTaskConfig, task: LatentTask | None = None, progress: bool = True) -> OptimizationResult:
    """Optimize ``config``'s task with ``config.method`` (building the task unless one is given).

    Gradient modes run ``sdo.optimize_latent`` (Adam); ``doodl`` runs ``sdo.optimize_latent_doodl`` on an
    ``sdo.EDICTSampler`` over the same model and schedule; ``freedom`` runs one ``sdo.freedom_sample`` pass, reported
    as a two-record history (the unguided sample, then the guided one; ``seconds`` is the whole pass).
    """
    task = task or build_task(config)
    runner = {"mode": _run_mode, "doodl": _run_doodl, "guidance": _run_freedom}[METHODS[config.method].kind]
    return runner(config, task, progress)


def _run_mode(config: LatentTaskConfig, task: LatentTask, progress: bool) -> OptimizationResult:
    return optimize_latent(
        task.sampler,
        task.latent,
        task.reward,
        grad=gradient_mode(config.method, config.method_options()),
        start_step=config.start_step,
        iters=config.iters,
        lr=config.lr,
        prior_weight=config.prior_weight,
        project_to_shell=config.project,
        seed=config.seed,
        judge=task.judge_accepts,
        measure=True,
        progress=progress,
    )


def _run_doodl(config: LatentTaskConfig, task: LatentTask, progress: bool) -> OptimizationResult:
    sampler = task.sampler
    edict = EDICTSampler(sampler.model_fn, sampler.scheduler, sampler.num_inference_steps)
    return optimize_latent_doodl(
        edict,
        task.latent,
        task.reward,
        start_step=config.start_step,
        iters=config.iters,
        lr=config.doodl_lr,
        renormalize=config.project,
        seed=config.seed,
        judge=task.judge_accepts,
        progress=progress,
    )


def _run_freedom(config: LatentTaskConfig, task: LatentTask, progress: bool) -> OptimizationResult:
    generator = torch.Generator(device=task.latent.device).manual_seed(config.seed)
    with PeakMemory(task.latent.device) as memory:
        guided = freedom_sample(
            task.sampler,
            task.latent,
            task.reward,
            scale=config.freedom_scale,
            repeats=config.freedom_repeats,
            start_step=config.start_step,
            generator=generator,
        )
    with torch.no_grad():
        generator.manual_seed(config.seed)
        unguided = task.sampler.sample(task.latent, NoGrad(), start_step=config.start_step, generator=generator)
        before = task.reward(unguided, None)
    cost = {"seconds": guided.seconds, "elapsed": guided.seconds, "peak_mem_bytes": memory.peak_bytes}
    history = [
        _record(0, before, unguided, task.judge_accepts, **cost, mem_kind=memory.kind),
        _record(1, guided.rewards, guided.sample, task.judge_accepts, seconds=0.0, elapsed=guided.seconds),
    ]
    return OptimizationResult(
        latent=task.latent,
        sample=guided.sample,
        best_latent=task.latent,
        best_sample=guided.sample,
        best_reward=guided.rewards,
        history=history,
    )


def _record(iteration: int, rewards: torch.Tensor, sample: torch.Tensor, judge, **extra) -> dict:
    record = {"iter": iteration, "reward": float(rewards.mean()), "rewards": rewards.tolist(), **extra}
    if judge is not None:
        record["judge_success"] = float(judge(sample).float().mean())
    return record
