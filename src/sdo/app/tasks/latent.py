"""Latent-optimization tasks: on the embedded model class steering, style transfer, adversarial samples; on a
diffusers pipeline (``--pipeline``) a CLIP-based image reward of the prompt.

One config dataclass (``LatentTaskConfig``) describes a run; the ``sdo optimize`` flags are generated from it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from sdo import zoo
from sdo.app.method_flags import AUTO, MethodFlags
from sdo.app.options import check_options, option
from sdo.app.pipeline_options import ZOO_GUIDANCE, PipelineOptions
from sdo.app.reward_spec import parse_reward_spec
from sdo.app.tasks.edit import PixelProximity, image_paths, load_inputs, model_size
from sdo.checks import SEED_MAX, check_text
from sdo.errors import ConfigError
from sdo.gradients import NoGrad
from sdo.io import load_image
from sdo.latent import LatentProblem, OptimizationResult
from sdo.methods import METHODS, method_names
from sdo.rewards import AdversarialReward, ClassifierReward, StyleReward, WeightedReward
from sdo.sampling import Sampler

__all__ = [
    "LATENT_METHODS",
    "LatentTask",
    "LatentTaskConfig",
    "TaskResources",
    "build_task",
    "load_resources",
    "original_sample",
    "run_task",
    "task_problem",
]

LATENT_METHODS = method_names("latent")
TASKS = ("class", "style", "adversarial")
# Fields that mean something only for the embedded model, and only for a pipeline (``LatentTaskConfig.recorded``).
ZOO_FIELDS = ("task", "source", "target", "views", "conditions")
# The shared block's fields but ``guidance`` (the zoo has a guidance scale too), and optimize's own pipeline fields.
PIPELINE_FIELDS = (
    *(item.name for item in dataclasses.fields(PipelineOptions) if item.name != "guidance"),
    "prompt",
    "prompts",
    "image",
    "images",
    "inversion_guidance",
    "checkpoint_decoder",
)


@dataclass(frozen=True)
class LatentTaskConfig(MethodFlags, PipelineOptions):
    """One latent-optimization run on the embedded model or a pipeline (every field is a ``sdo optimize`` flag;
    the pipeline and reward fields are the shared ``PipelineOptions`` block, the method's settings the shared
    ``MethodFlags`` block, whose ``method_options()`` gives the registry's options for a latent)."""

    task: Literal["class", "style", "adversarial"] = option("class", "what to optimize for", choices=TASKS)
    method: str = option(
        "sdo",
        "gradient estimator (sdo bench --list-methods), or auto: the best measured one for this job that fits "
        "--memory-budget",
        choices=(*LATENT_METHODS, AUTO),
    )
    source: int = option(
        3, "class of the generated digits (-1: unconditional samples, no guidance)", at_least=-1, at_most=9
    )
    target: int = option(
        8, "class to steer to (class, adversarial) or of the style reference (style)", at_least=0, at_most=9
    )
    steps: int = option(50, "sampling steps (of the scheduler the model samples with)", at_least=1, at_most=1000)
    iters: int = option(
        30,
        "optimizer updates (Adam; doodl: its clipped momentum SGD; freedom: unused, one guided pass)",
        at_least=1,
        at_most=10**6,
    )
    batch: int = option(8, "latents optimized at once", at_least=1, at_most=4096)
    seed: int = option(0, "seed of the initial noise", at_least=0, at_most=SEED_MAX)
    start_step: int = option(0, "optimize the latent at this step (after a no-grad warm-up)", at_least=0, at_most=999)
    views: int = option(
        4, "class/adversarial: average the classifier over this many random 2-pixel shifts", at_least=0, at_most=64
    )
    proximity: float | None = option(
        None,
        "weight of the pixel term keeping the image near the original (default: 20 for the adversarial task, else 0)",
        type=float,
        at_least=0,
    )
    device: str = option("cpu", "torch device")
    out: str = option("sdo-optimize", "output folder")
    prompt: str = option("", "--pipeline: the prompt")

    def recorded(self) -> dict:
        """The settings as ``metrics.json`` and ``summary.json`` record them: only the fields that mean something for
        this run (a pipeline run has no digit classes; an embedded-model run no prompt or reward)."""
        dropped = ZOO_FIELDS if self.pipeline else PIPELINE_FIELDS
        return {key: value for key, value in dataclasses.asdict(self).items() if key not in dropped}

    conditions: int = option(
        0,
        "optimize N class-steering items (source, target and seed from the item index and --seed), sharded over "
        "the processes of `accelerate launch`; results under OUT/items/<index>/ (0: one run of --source/--target)",
        at_least=0,
        at_most=10**7,
    )
    prompts: str = option(
        "", "--pipeline: a file of prompts, one item per line, sharded over processes like --conditions"
    )
    compile: bool = option(False, "run the no-grad network calls through torch.compile (CUDA: CUDA graphs)")
    threads: int = option(
        0,
        "torch threads per process (0: torch's default, or for a run of many items under `accelerate launch` the "
        "cores divided among its processes)",
        at_least=0,
        at_most=1024,
    )

    image: list[str] = option(  # noqa: RUF009 (the default is an immutable (); __post_init__ stores a list)
        (),
        "--pipeline: edit this image (PNG, JPEG, WebP, TIFF): invert it to --start-step under --prompt, then optimize;"
        " repeat the flag for a batch",
        action="append",
    )
    images: str = option("", "--pipeline: edit every PNG/JPEG/WebP/TIFF image of this folder, as one batch")
    inversion_guidance: float = option(
        1.0, "--image: classifier-free guidance scale of the inversion", at_least=0, at_most=1000
    )

    def __post_init__(self) -> None:
        # a list, as the flag and config.json give it back (a recorded config compares equal to the current one)
        object.__setattr__(self, "image", [self.image] if isinstance(self.image, str) else list(self.image))
        check_options(self)
        if self.task not in TASKS:
            raise ConfigError(f"`task` must be one of {TASKS}, got {self.task!r}.")
        if self.method not in (*LATENT_METHODS, AUTO):
            raise ConfigError(f"`method` must be one of {LATENT_METHODS} or auto for a latent, got {self.method!r}.")
        self._check_auto()
        if self.task == "adversarial" and self.source == -1:
            raise ConfigError("The adversarial task needs a source class (`source` in [0, 9]), not -1.")
        if not 0 <= self.start_step < self.steps:
            raise ConfigError(f"`start_step` must be in [0, {self.steps - 1}], got {self.start_step}.")
        if self.method != AUTO:  # auto's choice is checked when it is made (sdo.app.auto)
            self.check_method(self.method, "latent", self.steps, self.start_step)  # a bad --kept-steps fails here
            self._check_recomputation()
        self._check_official_freedom()
        check_text(self.prompt, "prompt", "--prompt")  # bytes that are not UTF-8 reach no tokenizer
        if self.pipeline and not (self.prompt or self.prompts):
            raise ConfigError("`prompt` (or `prompts`, a file of prompts) is required with --pipeline.")
        if self.conditions and self.pipeline:
            raise ConfigError("`conditions` steers the embedded model's classes; with --pipeline use --prompts FILE.")
        if self.prompts and not self.pipeline:
            raise ConfigError("`prompts` needs --pipeline (the embedded model takes --conditions N).")
        parse_reward_spec(self.reward)  # a bad --reward is refused with or without --pipeline
        if not self.pipeline and self.reward != LatentTaskConfig.__dataclass_fields__["reward"].default:
            raise ConfigError(f"`reward` ({self.reward!r}) scores a --pipeline's images; add --pipeline DIR.")
        super().__post_init__()
        self._check_images()

    def _check_auto(self) -> None:
        """``auto`` chooses for one run (not a run of many items); ``memory_budget`` only bounds its choice."""
        if self.method == AUTO and (self.conditions or self.prompts):
            raise ConfigError(
                "`method` auto chooses for a single run; a run of many items (--conditions, --prompts) names its "
                "method (run one item with --method auto to see the choice)."
            )
        if self.memory_budget is not None and self.method != AUTO:
            raise ConfigError(f"`memory_budget` bounds the choice of --method auto; method {self.method!r} is fixed.")

    def _check_recomputation(self) -> None:
        """``checkpoint_kept`` only with a method that has kept steps to recompute; ``checkpoint_decoder`` only with
        a pipeline (the embedded model's reward reads the sample, there is no decoder)."""
        if self.checkpoint_kept and not METHODS[self.method].recomputes_kept(self.method_options()):
            takers = [name for name in LATENT_METHODS if METHODS[name].recomputes_kept(self.method_options())]
            raise ConfigError(
                f"`checkpoint_kept` recomputes the kept steps of {', '.join(takers)}; method {self.method!r} has "
                "none: drop the flag or choose one of them."
            )
        if self.checkpoint_decoder and not self.pipeline:
            raise ConfigError(
                "`checkpoint_decoder` recomputes a pipeline's VAE decoder in backward; the embedded model has none: "
                "add --pipeline DIR or drop the flag."
            )

    def _check_official_freedom(self) -> None:
        """``--freedom-schedule official`` sizes FreeDoM's step by the classifier-free guidance term: refuse, before
        any work, a run sure to have none (``--guidance 1``; the embedded model's unconditional ``--source -1``).
        Other unguided models are refused by ``sdo.freedom.GuidanceStepper`` before its pass."""
        if self.method != "freedom" or self.freedom_schedule != "official":
            return
        unconditional = self.source == -1 and not (self.pipeline or self.image or self.images)
        if self.guidance == 1 or unconditional:
            cause = "--guidance 1" if self.guidance == 1 else "--source -1 (unconditional samples)"
            raise ConfigError(
                "The official FreeDoM schedule (`freedom_schedule` 'official') sizes its step by the classifier-free "
                f"guidance term w (e_cond - e_uncond), which {cause} does not have; guide the samples or use "
                "--freedom-schedule sdo."
            )

    def _check_images(self) -> None:
        """``image`` / ``images``: with a pipeline, one batch (not items), files and a folder that exist."""
        if not (self.image or self.images):
            return
        if not self.pipeline:
            raise ConfigError("`image` / `images` edit a real image on a pipeline: add --pipeline DIR.")
        if self.prompts or self.conditions:
            raise ConfigError("`image` / `images` are optimized as one batch; they do not combine with --prompts.")
        if self.images and not Path(self.images).is_dir():
            raise ConfigError(f"`images`: {self.images}: no such folder.")
        for path in image_paths(self.image, self.images):
            load_image(path, max_pixels=self.max_pixels)  # missing, not an image, too large: one line, no model yet


@dataclass
class LatentTask:
    """A built task: the sampler, the latent to optimize, the reward and the judge's acceptance test.

    ``settings``: what replays a latent of this task, as ``latent.safetensors`` records it (``sdo.app.results``).
    ``notes``: facts about the run for ``metrics.json`` (e.g. ``scheduler_replaced``; on the embedded model
    ``original_chain``, the chain that sampled ``original``: ``"edict"`` for the methods on the EDICT chain, else
    ``"ddim"``).
    """

    sampler: Sampler
    latent: torch.Tensor
    reward: object
    judge_accepts: object
    original: torch.Tensor
    description: str
    decode: Callable[[torch.Tensor], torch.Tensor] = zoo.to_images  # samples -> images [B, C, H, W] in [0, 1]
    settings: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)
    inputs: torch.Tensor | None = None  # image editing: the input images [B, 3, H, W] in [0, 1]


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
    return sampler.with_options(compile=True) if config.compile else sampler


def pipeline_parts(
    config: LatentTaskConfig, pipe, batch: int, size: dict | None = None, guidance: float | None = None
):
    """``from_pipeline`` over ``batch`` copies of ``config.prompt`` at ``size`` (``height``/``width``; defaults to
    ``config.size()``), with the guidance scale ``guidance`` (None: ``config.guidance``, whose 0 means the
    family's own), its VAE decoder recomputed in backward with ``config.checkpoint_decoder``."""
    from sdo.pipelines import from_pipeline

    size = config.size() if size is None else size
    guidance = (config.guidance or None) if guidance is None else guidance
    return from_pipeline(
        pipe,
        [config.prompt] * batch,
        guidance_scale=guidance,
        device=config.device,
        checkpoint_decoder=config.checkpoint_decoder,
        **size,
    )


def pipeline_task(
    config: LatentTaskConfig,
    pipe,
    parts,
    sampler: Sampler,
    latent: torch.Tensor,
    score,
    description: str,
    guidance: float | None = None,
    **extra,
) -> LatentTask:
    """The task of a pipeline run whose latent at ``config.start_step`` is ``latent``: its no-grad sample on the
    chain the method optimizes through (the "before", ``original_sample``), the image reward ``score`` on decoded
    images, the settings that replay it in the pipeline (``guidance``: the scale ``parts`` was built with, as
    ``pipeline_parts`` takes it) and the notes for ``metrics.json`` (that chain, a replaced scheduler). ``extra``
    goes to ``LatentTask`` (e.g. ``inputs``)."""
    from sdo.pipelines import DEFAULT_GUIDANCE

    chain, original = original_sample(config, sampler, latent)
    height, width = parts.image_size
    settings = {
        "pipeline": str(Path(config.pipeline).resolve()) if Path(config.pipeline).is_dir() else config.pipeline,
        "prompt": config.prompt,
        "guidance_scale": (config.guidance or DEFAULT_GUIDANCE[parts.family]) if guidance is None else guidance,
        "num_inference_steps": config.steps,
        "height": height,
        "width": width,
        "scheduler": type(parts.scheduler).__name__,
        "scheduler_config": parts.scheduler.to_json_string(),
        "start_step": config.start_step,
    }
    own = type(pipe.scheduler).__name__
    notes = {"original_chain": chain}
    if own != settings["scheduler"]:
        notes["scheduler_replaced"] = f"{own} -> {settings['scheduler']}"
    return LatentTask(
        sampler=sampler,
        latent=latent,
        reward=parts.latent_reward(score),
        judge_accepts=None,
        original=original,
        description=description,
        decode=parts.decode,
        settings=settings,
        notes=notes,
        **extra,
    )


def build_pipeline_task(config: LatentTaskConfig, resources: TaskResources | None = None) -> LatentTask:
    """A diffusers pipeline (folder or Hub id): latents of ``config.prompt`` scored by a CLIP-based reward, with the
    family's own guidance unless ``config.guidance`` is given, and the settings that replay them in the pipeline."""
    resources = resources or load_resources(config)
    parts = pipeline_parts(config, resources.pipeline, config.batch)
    sampler = parts.sampler(config.steps, compile=config.compile)
    score = config.image_reward([config.prompt], config.device)
    with torch.no_grad():
        noise = parts.initial_latent(config.seed)
        latent = noise if config.start_step == 0 else sampler.sample(noise, NoGrad(), stop_step=config.start_step)
    description = f"{config.reward} reward for {config.prompt!r}"
    return pipeline_task(config, resources.pipeline, parts, sampler, latent, score, description)


def build_image_task(config: LatentTaskConfig, resources: TaskResources | None = None) -> LatentTask:
    """The image-editing task of ``config.image`` / ``config.images`` on ``config.pipeline`` (``sdo.app.tasks.edit``):
    the images fitted to the pipeline's size, inverted to ``config.start_step`` with ``config.inversion_guidance``,
    and sampled with that guidance unless ``config.guidance`` is given."""
    from sdo.pipelines import size_multiple

    resources = resources or load_resources(config)
    paths = image_paths(config.image, config.images)
    height, width, notes = model_size(config.height, config.width, size_multiple(resources.pipeline))
    size = dict(height=height, width=width)
    guidance = config.guidance or config.inversion_guidance  # sampling as the inversion did, so `before` ~ input
    parts = pipeline_parts(config, resources.pipeline, len(paths), size, guidance=guidance)
    inputs, fitted = load_inputs(paths, parts.image_size, config.device, config.max_pixels)
    with torch.no_grad():
        latent = parts.invert(inputs, config.start_step, config.steps, config.inversion_guidance)
    score = config.image_reward([config.prompt], config.device)
    if config.proximity:  # None or 0: no pixel term
        terms = score.terms if isinstance(score, WeightedReward) else {config.reward: (1.0, score)}
        score = WeightedReward({**terms, "proximity": (config.proximity, PixelProximity(inputs))})
    sampler = parts.sampler(config.steps, compile=config.compile)
    description = f"edit {len(paths)} image(s): {config.reward} reward for {config.prompt!r}"
    task = pipeline_task(
        config, resources.pipeline, parts, sampler, latent, score, description, guidance=guidance, inputs=inputs
    )
    task.settings.update(inversion_guidance=config.inversion_guidance, images=[str(path) for path in paths])
    if notes + fitted:
        task.notes["notes"] = notes + fitted
    return task


def build_task(config: LatentTaskConfig, resources: TaskResources | None = None) -> LatentTask:
    """Build the sampler, initial latent, reward and judge for ``config``, from ``resources`` (loaded if None)."""
    resources = resources or load_resources(config)
    if config.image or config.images:
        return build_image_task(config, resources)
    if config.pipeline:
        return build_pipeline_task(config, resources)
    device = torch.device(config.device)
    unet, reward_net, judge = resources.unet, resources.reward_net, resources.judge
    unconditional = config.source == -1
    label = zoo.NULL_CLASS if unconditional else config.source
    classes = torch.full((config.batch,), label, device=device)
    guidance = 1.0 if unconditional else config.guidance or ZOO_GUIDANCE
    sampler = _sampler(zoo.ddim_sampler(unet, classes, config.steps, guidance), config)
    source = "digits" if unconditional else f"{config.source}s"
    noise = zoo.noise(config.batch, config.seed, device)
    with torch.no_grad():
        latent = noise if config.start_step == 0 else sampler.sample(noise, NoGrad(), stop_step=config.start_step)
    chain, original = original_sample(config, sampler, latent)

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
    settings = {
        "model": "sdo.zoo",
        "class": label,
        "guidance_scale": guidance,
        "num_inference_steps": config.steps,
        "scheduler": type(sampler.scheduler).__name__,
        "start_step": config.start_step,
    }
    return LatentTask(
        sampler=sampler,
        latent=latent,
        reward=reward,
        judge_accepts=accepts,
        original=original,
        description=text,
        settings=settings,
        notes={"original_chain": chain},
    )


def original_sample(config: LatentTaskConfig, sampler: Sampler, latent: torch.Tensor) -> tuple[str, torch.Tensor]:
    """``(chain, sample)``: the unoptimized sample of ``latent`` (at ``config.start_step``) on the chain
    ``config.method``'s runner optimizes through (``sdo.methods.Runner.chain_sampler``), which the adversarial reward
    keeps the image near and the results show as "before". The methods on the EDICT chain (``doodl``, ``doodl-adam``)
    start from EDICT's sample of the latent (``sdo.doodl.edict_sampler``; Wallace et al., ICCV 2023), the others from
    ``sampler``'s (DDIM)."""
    runner = METHODS[config.method].runner
    with torch.no_grad():
        return runner.chain, runner.chain_sampler(sampler).sample(latent, NoGrad(), start_step=config.start_step)


def run_task(config: LatentTaskConfig, task: LatentTask | None = None, progress: bool = True) -> OptimizationResult:
    """Optimize ``config``'s task with ``config.method`` (building the task unless one is given), through the
    registry's runner of that method (``sdo.methods.Method.optimize``): gradient modes run ``sdo.optimize_latent``'s
    loop (Adam), ``doodl`` DOODL's on an ``sdo.EDICTSampler`` over the same model and schedule (``doodl-adam`` the
    same chain with Adam), ``freedom`` one
    ``sdo.freedom_sample`` pass reported as a two-record history (the unguided sample, then the guided one).
    """
    task = task or build_task(config)
    return METHODS[config.method].optimize(task_problem(config, task), config.method_options(), config.iters, progress)


def task_problem(config: LatentTaskConfig, task: LatentTask, measure: bool = True) -> LatentProblem:
    """The ``sdo.latent.LatentProblem`` of ``task`` (its sampler, latent, reward and judge) from
    ``config.start_step`` with ``config.seed``, measuring each iteration's extra memory unless ``measure`` is False
    (a timed comparison measures in a separate pass: the memory hooks cost time)."""
    return LatentProblem(
        task.sampler,
        task.latent,
        task.reward,
        start_step=config.start_step,
        seed=config.seed,
        judge=task.judge_accepts,
        measure=measure,
    )
