"""Reward fine-tuning of the embedded model or a text-to-image pipeline (LoRA via peft, or full weights),
data-parallel with Accelerate: the config, the ``finetune`` entry point and the ``Trainer`` that takes one update.

Each update draws a global batch of conditions and initial noises from a generator seeded by ``(seed, step)``,
samples them with the method's gradient mode, and takes one AdamW step on ``-mean(reward)`` (DRaFT, Clark et al.
2024; AlignProp, Prabhudesai et al. 2023; SDO, Dou et al. 2025). With ``P`` processes each takes its slice of the
global batch and the gradients are summed across processes (``accelerator.reduce``), so a 2-process run gives the
weights of a 1-process run with the same global batch. Everything random is a function of ``(seed, step)``, so a
run resumed from a checkpoint continues exactly as an uninterrupted one (``sdo.app.resume``). LoRA and the files
that leave sdo are in ``sdo.app.lora``.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sdo.app.checkpoints import latest_checkpoint, save_checkpoint
from sdo.app.fingerprints import callable_fingerprint, fingerprint_inputs, pipeline_fingerprint
from sdo.app.lora import (
    adapter_file,
    add_lora,
    check_not_fused,
    load_adapter,
    mark_fused,
    merge_lora,
    network_of,
    remove_lora,
    remove_old_adapter,
    save_adapter,
    save_for_diffusers,
    trainable_state,
)
from sdo.app.method_flags import AUTO, checkpoint_kept_flag, memory_budget_flag
from sdo.app.options import check_options, option
from sdo.app.pipeline_options import DEFAULT_REWARD, REWARD_HELP, PipelineOptions
from sdo.app.prompts import read_prompts
from sdo.app.resume import (
    INPUTS_KEY,
    MetricsLog,
    check_finetune_paths,
    open_finetune_output,
    prompt_digest,
    recorded_inputs,
    restore,
)
from sdo.app.runs import SAVED_PIPELINE, is_secondary_process, replace_saved_folder, write_marker
from sdo.app.tasks.finetune import EVALUATION_MEASURES, PipelineTarget, ZooTarget, ink_reward
from sdo.checks import SEED_MAX, check_device, check_rewards, check_text
from sdo.clip_rewards import CLIP_REWARDS
from sdo.errors import ConfigError, MissingExtraError, NonFiniteRewardError, WriteFailedError, missing_extra
from sdo.gradients import GradientMode
from sdo.io import DIR_MODE, make_dir
from sdo.kl import TrajectoryKL, adapters_disabled
from sdo.methods import MethodOptions, TruncationSettings, find_method, gradient_mode, method_names
from sdo.sampling import Sampler

__all__ = [
    "FINETUNE_METHODS",
    "FINETUNE_TASKS",
    "TRACKERS",
    "FinetuneConfig",
    "Trainer",
    "add_lora",
    "finetune",
    "ink_reward",
    "load_adapter",
]

FINETUNE_METHODS = method_names("weights")
ZOO_TASKS = ("confidence", "bold")
ZOO_DEFAULT_TASK = "confidence"
PIPELINE_TASKS = ("aesthetic", "clip", "style", "pickscore")
FINETUNE_TASKS = ZOO_TASKS + PIPELINE_TASKS
TRACKER_RUN = "sdo-finetune"
"""The trackers' run name; TensorBoard's logs go to ``OUT/sdo-finetune/``."""
TRACKERS = {  # Accelerate's trackers (accelerate.utils.LoggerType) -> the package each one imports
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "comet_ml": "comet_ml",
    "mlflow": "mlflow",
    "aim": "aim",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "trackio": "trackio",
    "swanlab": "swanlab",
}


@dataclass(frozen=True)
class FinetuneConfig(PipelineOptions):
    """One fine-tuning run (every field is a ``sdo finetune`` flag; the pipeline and reward fields are the shared
    ``PipelineOptions`` block, whose ``reward`` here defaults to the ``task`` reward)."""

    method: str = option(
        "sdo",
        "gradient estimator, or auto: the best measured one for fine-tuning that fits --memory-budget (recorded in "
        "config.json; a resume keeps it)",
        choices=(*FINETUNE_METHODS, AUTO),
    )
    memory_budget: float | None = memory_budget_flag()
    task: str = option(
        "",
        f"the reward: embedded model: confidence or bold (default: {ZOO_DEFAULT_TASK}); --pipeline: the same as "
        "--reward (one of them is enough)",
        choices=FINETUNE_TASKS,
    )
    steps: int = option(
        100, "optimizer updates (iterations; sampling steps are --sample-steps)", at_least=1, at_most=10**7
    )
    sample_steps: int = option(20, "sampling steps per sample", at_least=1, at_most=1000)
    batch_size: int = option(
        8, "global batch (all processes, all accumulation micro-batches)", at_least=1, at_most=4096
    )
    grad_accum: int = option(1, "gradient accumulation micro-batches per update", at_least=1, at_most=4096)
    lr: float = option(1e-3, "AdamW learning rate", above=0)
    max_grad_norm: float = option(1.0, "clip the global gradient norm to this before each update (0: off)", at_least=0)
    kl_weight: float = option(
        0.0,
        "weight of the base-model regularizer: mean squared difference between the fine-tuned and the frozen "
        "base model's predictions at the trained steps (the KL between their Gaussian steps up to a constant)",
        at_least=0,
    )
    lora_rank: int = option(4, "LoRA rank; 0 trains the full weights", at_least=0, at_most=4096)
    lora_targets: str = option(
        "",
        "comma-separated module names LoRA adapts (default: attention and, for the "
        "embedded model, resnet convolutions)",
    )
    draft_k: int = option(TruncationSettings.draft_k, "k of draft-k", at_least=1, at_most=1000)
    truncation_high: int = option(
        TruncationSettings.truncation_high,
        "random-truncation: depth drawn uniformly in [1, this] per trajectory batch (--alignprop-high: its older "
        "name)",
        at_least=1,
        at_most=1000,
        aliases=("--alignprop-high",),
    )
    checkpoint_kept: bool = checkpoint_kept_flag()
    eval_every: int = option(
        10,
        "evaluation (and a grid of samples in OUT/samples/) every this many updates (0: only at the end)",
        at_least=0,
        at_most=10**7,
    )
    eval_per_class: int = option(
        5, "embedded model: held-out samples per class at each evaluation", at_least=1, at_most=1000
    )
    checkpoint_every: int = option(10, "checkpoint every this many updates", at_least=1, at_most=10**7)
    seed: int = option(0, "seeds every random draw", at_least=0, at_most=SEED_MAX)
    device: str = option("cpu", "cpu or cuda (under `accelerate launch`, Accelerate picks the device)")
    mixed_precision: str = option("no", "no, bf16 or fp16 (GPU)", choices=("no", "bf16", "fp16"))
    compile: bool = option(False, "run the no-grad network calls through torch.compile (CUDA: CUDA graphs)")
    tensorboard: bool = option(False, "alias of --report-to tensorboard (needs shortcut-diffusion[tensorboard])")
    report_to: str = option(
        "",
        f"comma-separated Accelerate trackers to log metrics and sample grids to ({', '.join(TRACKERS)}; "
        f"TensorBoard's logs go to OUT/{TRACKER_RUN}/); each needs its package",
    )
    out: str = option("sdo-finetune", "output folder (a rerun with the same folder resumes)")
    prompts: str = option("", "--pipeline: text file with one training prompt per line")
    eval_prompts: str = option(
        "",
        "--pipeline: text file of evaluation prompts (default: the training prompts, recorded in the metrics as "
        "eval_on_training_prompts)",
    )
    save_pipeline: str = option(
        "", "--pipeline: also write the fine-tuned pipeline here, LoRA fused into plain weights (save_pretrained)"
    )
    reward: str = option("", f"{REWARD_HELP} (default: {DEFAULT_REWARD}, or the --task given)")
    verify: bool = option(
        False,
        "on resume, rehash every input (pipeline, CLIP and PickScore folders, aesthetic head, style image) even where "
        "its size and modification time are unchanged (reads them; checkpoints are always checked against their "
        "recorded SHA-256)",
    )

    def __post_init__(self) -> None:
        check_options(self)
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"`batch_size` ({self.batch_size}) must be divisible by `grad_accum` ({self.grad_accum})."
            )
        if self.method not in (*FINETUNE_METHODS, AUTO):
            raise ConfigError(
                f"`method` must be one of {FINETUNE_METHODS} or auto for fine-tuning, got {self.method!r}."
            )
        if self.memory_budget is not None and self.method != AUTO:
            raise ConfigError(f"`memory_budget` bounds the choice of --method auto; method {self.method!r} is fixed.")
        if self.method != AUTO:  # auto's choice is checked when it is made (sdo.app.auto)
            options = self.method_options(torch.Generator())
            find_method(self.method, options).check_fits(options, self.sample_steps)  # e.g. draft_k above the steps
        self._resolve_reward()
        if self.pipeline and not self.prompts:
            raise ConfigError("`prompts` (a file with one prompt per line) is required with --pipeline.")
        unknown = sorted(set(self.trackers()) - set(TRACKERS))
        if unknown:
            raise ConfigError(f"`report_to`: unknown tracker {unknown[0]!r}; Accelerate's are {', '.join(TRACKERS)}.")
        super().__post_init__()

    def _resolve_reward(self) -> None:
        """Check ``task`` and ``reward``, then write the reward they choose where it is recorded: ``task`` on the
        embedded model (default ``confidence``), ``reward`` on a pipeline (``task`` is its older name there; default
        ``clip``), the other field left empty."""
        if self.task not in ("", *FINETUNE_TASKS):
            raise ConfigError(f"`task` must be one of {FINETUNE_TASKS}, got {self.task!r}.")
        if self.reward and not self.pipeline:
            raise ConfigError(f"`reward` ({self.reward!r}) scores a pipeline's images; add --pipeline DIR.")
        if not self.pipeline:
            object.__setattr__(self, "task", self.task or ZOO_DEFAULT_TASK)
            return
        if self.task in ZOO_TASKS:
            raise ConfigError(f"`task` must be one of {PIPELINE_TASKS} with --pipeline, got {self.task!r}.")
        if self.task and self.reward and self.task != self.reward:
            raise ConfigError(
                f"`task` ({self.task!r}) and `reward` ({self.reward!r}) choose different rewards; give one of them."
            )
        object.__setattr__(self, "reward", self.reward or self.task or DEFAULT_REWARD)
        object.__setattr__(self, "task", "")

    def trackers(self) -> list[str]:
        """The trackers of ``report_to``, with ``tensorboard`` added by the ``tensorboard`` alias."""
        names = [name.strip() for name in self.report_to.split(",") if name.strip()]
        if self.tensorboard and "tensorboard" not in names:
            names.append("tensorboard")
        return names

    def reward_spec(self) -> str:
        """The reward spec: ``reward`` on a pipeline (where ``task`` was given, its name), else ``task``."""
        return self.reward or self.task

    def method_options(self, generator: torch.Generator) -> MethodOptions:
        """The registry's ``MethodOptions`` of these settings, for weights; random draws from ``generator``."""
        return MethodOptions(
            "weights",
            generator,
            draft_k=self.draft_k,
            truncation_high=self.truncation_high,
            checkpoint_kept=self.checkpoint_kept,
        )

    def mode(self, generator: torch.Generator) -> GradientMode:
        """The gradient mode of ``method`` from the registry (``sdo.methods``); its random draws come from
        ``generator``."""
        return gradient_mode(self.method, self.method_options(generator))


_ADAM_BETAS = (0.9, 0.999)
"""AdamW's betas in fine-tuning (its defaults)."""
_ADAM_MOVE = 10.0
"""A bound on how far one AdamW step with ``_ADAM_BETAS`` moves a weight element, in units of ``lr``: ``|m_hat| /
(sqrt(v_hat) + eps)`` is at most 7.27 with betas (0.9, 0.999) (Cauchy-Schwarz over the moments' weighted sums of
the same gradients, bias corrections included); 10 with a margin. It also bounds Adam's step size ``lr / (1 -
beta1^t)``, which torch refuses to compute when it overflows."""


def _largest_magnitude(tensors: list[torch.Tensor]) -> float:
    """The largest absolute value over ``tensors`` (0 for none), with one device synchronization."""
    if not tensors:
        return 0.0
    return float(torch.stack([torch.linalg.vector_norm(t, math.inf).float() for t in tensors]).max())


def _iteration_argument(iteration: int | None, step: int | None) -> int:
    """``Trainer.update``'s update number, given as ``iteration`` or by its old name ``step`` (exactly one)."""
    if (iteration is None) == (step is None):
        raise TypeError("Trainer.update takes the update number once: update(iteration).")
    return iteration if step is None else step


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % 2**64)  # every seed in [0, 2**63 - 1]


def _regularized(sampler: Sampler, base: torch.nn.Module | None) -> tuple[Sampler, TrajectoryKL]:
    """``sampler`` with its model wrapped in a ``TrajectoryKL`` against the base model: the network with its LoRA
    adapters disabled (``base`` None), or the frozen copy ``base`` of a full-weight run."""
    model_fn = sampler.model_fn

    def base_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if base is not None:
            return replace(model_fn, model=base)(x, t)
        with adapters_disabled(model_fn.model):
            return model_fn(x, t)

    kl = TrajectoryKL(model_fn, base_fn)
    regularized = copy.copy(sampler)  # same scheduler, steps, timestep options and noise convention
    regularized.model_fn = kl
    return regularized, kl


def backward_reward(
    sampler: Sampler,
    noise: torch.Tensor,
    conditions: torch.Tensor | None,
    mode: GradientMode,
    reward: Callable,
    *,
    divide_by: int = 1,
    penalty: Callable[[], torch.Tensor | None] | None = None,
    penalty_weight: float = 0.0,
    generator: torch.Generator | None = None,
    autocast: contextlib.AbstractContextManager | None = None,
) -> dict[str, torch.Tensor]:
    """The gradient half of one weight update, shared by ``Trainer`` and ``sdo bench --variable weights``: sample
    ``noise`` ``[B, ...]`` with ``mode`` (``generator``: the sampler's noise), score the sample, and backpropagate
    ``(-sum(rewards) + penalty_weight * sum(penalty())) / divide_by`` into the network's weights (accumulated in
    their ``.grad``; the optimizer's ``zero_grad`` and ``step`` are the caller's). A draw of a random mode that
    graphs no step (``sdo.AlignProp``: every threshold above its step, probability n! / (n + 1)^n, 2/9 at 2 steps)
    accumulates nothing: the update sees no gradient, as in the official code's loop.

    Returns the per-sample values to log, detached: ``reward`` ``[B]``, ``reward_NAME`` for each term of a weighted
    reward and, with ``penalty``, ``kl`` (its per-sample values, read after sampling; None counts as zeros).

    Raises:
        ConfigError: the reward returned anything but a floating-point ``[B]`` tensor, or one with no gradient path
            to a sample that has one (``sdo.checks.check_rewards``).
    """
    with autocast or contextlib.nullcontext():
        x0 = sampler.sample(noise, grad=mode, generator=generator)
        rewards = check_rewards(reward(x0, conditions), len(noise)).float()
    if x0.requires_grad and not rewards.requires_grad:
        raise ConfigError(
            "The reward has no gradient path to the sample: the reward returned a tensor that does not depend "
            "on the sample (images, or x0) through differentiable operations (computed under torch.no_grad(), "
            "detached, or converted to numbers?)."
        )
    loss = -rewards.sum()
    logged = {"reward": rewards}
    for name, values in (getattr(reward, "last_terms", None) or {}).items():
        logged[f"reward_{name}"] = values
    if penalty is not None:
        values = penalty()
        values = torch.zeros_like(rewards) if values is None else values.float()
        loss = loss + penalty_weight * values.sum()
        logged["kl"] = values
    if loss.requires_grad:  # an ``alignprop`` draw may graph no step (likely only with few steps): no gradient then
        (loss / divide_by).backward()
    return {name: values.detach().float() for name, values in logged.items()}


class Trainer:
    """The training state of one run and its update rule: ``update(iteration)`` takes optimizer update number
    ``iteration`` (1 for the first).

    It holds what never changes between updates: the config, the target (model, sampler, reward), the Accelerate
    accelerator, the trainable parameters (LoRA injected, or every weight), the AdamW optimizer and, with
    ``kl_weight`` on full weights, the frozen base copy of the KL regularizer.
    """

    def __init__(self, config: FinetuneConfig, target, accelerator) -> None:
        self.config, self.target, self.accelerator = config, target, accelerator
        self.network = target.network
        self.lora = config.lora_rank > 0
        self.lora_targets = config.lora_targets or target.lora_targets
        check_not_fused(self.network, "finetune(pipeline=pipe)")  # its LoRA, merged, would be applied again
        remove_lora(self.network)  # a pipeline object trained before: start again from its base weights
        if self.lora:
            add_lora(self.network, config.lora_rank, self.lora_targets)
        else:
            self.network.requires_grad_(True)
        self.network.to(accelerator.device)
        # The base model of the KL regularizer: the adapters switched off (LoRA), or a frozen copy (full weights).
        needs_copy = config.kl_weight > 0 and not self.lora
        self.base = copy.deepcopy(self.network).requires_grad_(False) if needs_copy else None
        self.parameters = [p for p in self.network.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=config.lr, betas=_ADAM_BETAS, weight_decay=0.0)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: the LoRA tensors, or every weight."""
        return trainable_state(self.network, self.lora)

    def global_batch(self, iteration: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Conditions ``[B]``, noises ``[B, ...]`` and the mode seed of update ``iteration`` (the same on every
        process)."""
        generator = _step_generator(self.config.seed, iteration)
        conditions, noise = self.target.draw(generator, self.config.batch_size)
        return conditions, noise, int(torch.randint(0, 2**62, (1,), generator=generator))

    def update(self, iteration: int | None = None, *, step: int | None = None) -> dict[str, float]:
        """Optimizer update number ``iteration`` on this process's slice of the global batch; returns the global
        means of the reward, of each term of a weighted reward (``reward_NAME``) and, with ``kl_weight``, of the KL
        penalty (``kl``). ``step=`` is the old name of ``iteration`` (kept working).

        Raises:
            ConfigError: the reward returned anything but a floating-point ``[B]`` tensor (``B`` the micro-batch)
                with a gradient path to the sample (``sdo.checks.check_rewards``).
            NonFiniteRewardError: the reward or a gradient is NaN or infinite, or the step might make a weight so;
                raised before the update, so the network keeps the weights of update ``iteration - 1``.
        """
        iteration = _iteration_argument(iteration, step)
        accelerator, config = self.accelerator, self.config
        conditions, noise, mode_seed = self.global_batch(iteration)
        per_process = config.batch_size // accelerator.num_processes
        mine = slice(accelerator.process_index * per_process, (accelerator.process_index + 1) * per_process)
        conditions, noise = conditions[mine].to(accelerator.device), noise[mine].to(accelerator.device)
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        for micro in range(config.grad_accum):
            part = slice(micro * len(noise) // config.grad_accum, (micro + 1) * len(noise) // config.grad_accum)
            for name, values in self._micro_batch(conditions[part], noise[part], mode_seed).items():
                sums[name] = sums.get(name, torch.zeros((), device=accelerator.device)) + values.sum()
        self._reduce_gradients()
        means = {
            name: float(accelerator.reduce(total, reduction="sum")) / config.batch_size for name, total in sums.items()
        }
        if not math.isfinite(means["reward"]):
            raise self._non_finite(iteration, f"The reward is not finite at step {iteration} ({means['reward']})")
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.parameters, config.max_grad_norm)  # a non-finite gradient stays so
        self._check_update(iteration)
        self.optimizer.step()
        return means

    def _micro_batch(self, conditions: torch.Tensor, noise: torch.Tensor, mode_seed: int) -> dict[str, torch.Tensor]:
        """Sample, score and backpropagate one micro-batch (``backward_reward``); returns its per-sample values to
        log (detached)."""
        config = self.config
        sampler, penalty = self.target.sampler(self.network, conditions), None
        if config.kl_weight > 0:
            sampler, kl = _regularized(sampler, self.base)
            penalty = kl.penalty
        mode = config.mode(torch.Generator().manual_seed(mode_seed))  # one draw per trajectory batch, every rank
        return backward_reward(
            sampler,
            noise,
            conditions,
            mode,
            self.target.reward,
            divide_by=config.batch_size,
            penalty=penalty,
            penalty_weight=config.kl_weight,
            autocast=self.accelerator.autocast(),
        )

    def _check_update(self, iteration: int) -> None:
        """Refuse update ``iteration`` before it is applied (the weights stay as they are) when a gradient holds
        NaN or infinite values, or when AdamW's step might not leave every weight finite: it moves each element by
        at most ``lr * _ADAM_MOVE`` (after the weight decay's scaling), so a weight further than that below half its
        dtype's largest value stays finite, and a gradient below that half keeps Adam's moments finite."""
        weights = [p.detach() for p in self.parameters]
        weight = _largest_magnitude(weights)
        gradient = _largest_magnitude([p.grad.detach() for p in self.parameters if p.grad is not None])
        if not math.isfinite(gradient):  # NaN propagates through the maximum
            raise self._non_finite(
                iteration, f"The gradient of the reward is not finite at step {iteration} (the reward is)"
            )
        largest = min((torch.finfo(w.dtype).max for w in weights), default=math.inf) / 2
        for group in self.optimizer.param_groups:
            lr, decay = group["lr"], group["weight_decay"]
            if weight * abs(1 - lr * decay) + lr * _ADAM_MOVE >= largest or gradient >= largest:
                raise self._non_finite(
                    iteration,
                    f"The update at step {iteration} could make a weight infinite (largest weight {weight:.3g}, "
                    f"largest gradient {gradient:.3g}, lr {lr:g}); lower `lr` (--lr)",
                )

    def _non_finite(self, iteration: int, what: str) -> NonFiniteRewardError:
        """The error that stops the run at update ``iteration`` before it is applied: ``what``, and the last good
        checkpoint."""
        last = latest_checkpoint(Path(self.config.out) / "checkpoints")
        return NonFiniteRewardError(
            f"{what}; stopped before the update, the weights are those of step {iteration - 1}. Last good "
            f"checkpoint: {last.path if last else 'none'}.",
            {"step": iteration, "last_checkpoint": str(last.path) if last else None},
        )

    def _reduce_gradients(self) -> None:
        """Sum the gradients of all processes (one flat all-reduce)."""
        if self.accelerator.num_processes == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.parameters]
        flat = self.accelerator.reduce(torch.cat([g.flatten() for g in grads]), reduction="sum")
        for parameter, chunk in zip(self.parameters, flat.split([g.numel() for g in grads]), strict=True):
            parameter.grad = chunk.view_as(parameter).clone()

    def check_replicas_agree(self) -> None:
        """Data parallelism must leave every process with the same weights; gather them and compare exactly."""
        accelerator = self.accelerator
        if accelerator.num_processes == 1:
            return
        flat = torch.cat([p.detach().flatten() for p in self.parameters])
        gathered = accelerator.gather(flat[None])
        if not all(torch.equal(gathered[0], row) for row in gathered[1:]):
            raise RuntimeError("The processes ended with different weights; data-parallel updates went out of sync.")
        if accelerator.is_main_process:
            print(f"Weights identical on all {accelerator.num_processes} processes.")


def finetune(
    config: FinetuneConfig,
    reward: Callable | None = None,
    progress: bool = True,
    *,
    pipeline=None,
    prompts: list[str] | None = None,
    eval_prompts: list[str] | None = None,
    break_lock: bool = False,
) -> dict:
    """Fine-tune the embedded model, ``config.pipeline``, or the loaded ``pipeline``, on a reward.

    The reward: the embedded model's ``config.task``, or ``reward(x0, labels) -> [B]`` on its samples in [-1, 1];
    on a pipeline, the config's ``--reward``/``--task`` image reward, or ``reward(images, prompts) -> [B]``, an
    image reward on the decoded samples (float ``[B, 3, H, W]`` in ``[0, 1]``, ``sdo.ImageReward``), which must be
    differentiable in ``images``; nothing else is loaded for scoring then. ``prompts`` (a list) replaces
    ``config.prompts``; evaluation scores the same reward on ``eval_prompts`` (default: ``config.eval_prompts``,
    else the training prompts, and the metrics say ``eval_on_training_prompts: true``). A loaded ``pipeline`` is
    trained in place: afterwards its network holds the fine-tuned weights (LoRA as peft layers; sdo's adapter from
    an earlier run is removed first, so a rerun starts from the base weights or its checkpoint).

    Example::

        import sdo
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained("my-sd-folder")
        brightness = lambda images, prompts: images.mean(dim=(1, 2, 3))  # [B, 3, H, W] in [0, 1] -> [B]
        config = sdo.FinetuneConfig(steps=20, batch_size=2, sample_steps=10, out="bright")
        sdo.finetune(config, reward=brightness, pipeline=pipe, prompts=["a cat", "a dog"], eval_prompts=["a fox"])
        pipe.load_lora_weights("bright")  # on a plain pipeline: the fine-tuned model

    Writes into ``config.out``: ``checkpoints/step-NNNNNN/`` every ``checkpoint_every`` updates (resumed from by a
    rerun), ``metrics.jsonl`` (``step``, ``reward``, ``seconds`` and, at evaluations, ``judge_accuracy``,
    ``frechet_judge`` and ``eval_reward``, or on a pipeline ``eval_reward`` and ``eval_on_training_prompts``),
    ``samples/step-NNNNNN.png`` (a grid of the model's images at each evaluation, also logged to the ``report_to``
    trackers), for a pipeline first ``pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights(out)``) or,
    with ``lora_rank`` 0, ``unet/``/``transformer/`` (``save_pretrained``), then ``sdo/adapter.safetensors`` (sdo's
    file of the final trainable weights, out of diffusers' sight; ``load_adapter(network, out)`` puts them back) and
    ``reward_curve.png``; with ``save_pipeline`` the whole pipeline, LoRA fused (``pipeline`` then holds the fused
    weights and is marked: it is refused as the base of another run). With ``kl_weight`` the loss
    adds ``kl_weight * mean_b penalty_b``, the base-model regularizer of ``sdo.kl.TrajectoryKL`` (logged as
    ``kl``); a weighted ``--reward`` logs each term as ``reward_NAME``. Returns the last metrics record.

    The folder records the run's settings in ``config.json`` (with the pipeline's ``name_or_path`` and the sha256
    of the prompt list when they were given as objects, a ``reward`` function's ``reward_function``
    (``module.qualname``) and hashes, and a fingerprint of each input: files and folders, a Hub id's revision, a
    loaded pipeline's weights) and is locked (``.sdo.lock``) for the run; a rerun resumes only with the same
    result-changing settings, prompts, reward function and inputs (``sdo.app.resume.RESUME_FREE`` may change,
    ``steps`` may grow). ``break_lock`` takes over a lock written from another host (see ``sdo.app.runs.RunLock``).

    Raises:
        ConfigError: bad configuration or prompt lists (checked before any model loads); a reward that returns
            anything but a floating-point ``[B]`` tensor with a gradient path to the sample (at its first call); a
            ``pipeline`` holding an adapter sdo fused into it (``fuse_lora``, ``save_pipeline``), which training
            would apply twice.
        MissingExtraError: a ``report_to`` tracker's package is not installed.
        NonFiniteRewardError: a non-finite reward or gradient, or a step that might overflow a weight, found before
            that update (a loaded ``pipeline`` keeps the weights of the step before); the message names the step,
            ``result`` holds ``step`` and ``last_checkpoint`` (the last good checkpoint, kept on disk).
        ResumeMismatchError: ``config.out`` holds a run with other settings or prompts; the message names them.
        OutputLockedError: another process is writing into ``config.out``.
    """
    from accelerate import Accelerator

    out = Path(config.out)
    check_device(config.device)
    if config.mixed_precision == "fp16" and (config.device == "cpu" or not torch.cuda.is_available()):
        raise ConfigError(
            "`mixed_precision` fp16 needs a CUDA GPU (and --device cuda); on the CPU use --mixed-precision bf16 or no."
        )
    data = _TrainingData.resolve(config, reward, pipeline, prompts, eval_prompts)
    trackers = _check_trackers(config)
    accelerator = Accelerator(
        cpu=config.device == "cpu",
        mixed_precision=config.mixed_precision,
        log_with=trackers or None,
        project_dir=str(out),
    )
    if config.batch_size % (accelerator.num_processes * config.grad_accum):
        raise ConfigError(
            f"`batch_size` ({config.batch_size}) must be divisible by processes x grad_accum "
            f"({accelerator.num_processes} x {config.grad_accum})."
        )
    defaults = {item.name: item.default for item in fields(FinetuneConfig)}
    settings, target = data.settings(config), None
    if config.method == AUTO:  # the recorded choice on a resume, else the planner's (sdo.app.auto)
        from sdo.app.auto import applied, choose_for_finetune

        choice, target = choose_for_finetune(config, data, accelerator)
        settings, config = {**settings, "auto": choice.record()}, applied(config, choice)
    lock, checkpoint = open_finetune_output(accelerator, out, settings, defaults, break_lock)
    try:
        return _train(config, data, progress, accelerator, out, checkpoint, settings, target)
    finally:
        if lock is not None:
            lock.release()


@dataclass
class _TrainingData:
    """What a run trains on besides its config: a reward, a loaded pipeline and prompt lists given as objects."""

    reward: Callable | None
    pipeline: object
    prompts: list[str] | None
    eval_prompts: list[str] | None
    inputs: dict | None = field(default=None, repr=False)  # the inputs' fingerprints, taken once by ``settings``

    @property
    def on_pipeline(self) -> bool:
        return self.pipeline is not None

    @classmethod
    def resolve(cls, config: FinetuneConfig, reward, pipeline, prompts, eval_prompts) -> _TrainingData:
        """Check what ``finetune`` was given against ``config`` (before any model loads) and read the prompt
        files of a ``--pipeline`` run, so that their digests are recorded."""
        if pipeline is None and not config.pipeline:
            if prompts is not None or eval_prompts is not None:
                raise ConfigError("`prompts` and `eval_prompts` are for pipelines (pass `pipeline=` or --pipeline).")
            if config.save_pipeline:
                raise ConfigError("`save_pipeline` writes a fine-tuned pipeline; pass `pipeline=` or --pipeline.")
            if reward is None and config.task not in ZOO_TASKS:
                raise ConfigError(
                    f"`task` {config.task!r} scores a pipeline's images; the embedded model's are {ZOO_TASKS} "
                    "(or pass `pipeline=` or --pipeline)."
                )
            return cls(reward, None, None, None)
        if isinstance(prompts, str) or isinstance(eval_prompts, str):
            raise ConfigError("`prompts` and `eval_prompts` must be lists of strings (a file goes in the config).")
        if prompts is None:
            if not config.prompts:
                raise ConfigError("`prompts` (a list, or a file in the config) is required to fine-tune a pipeline.")
            prompts = read_prompts(config.prompts)
        prompts = _prompt_list(prompts, "prompts")
        if eval_prompts is None and config.eval_prompts:
            eval_prompts = read_prompts(config.eval_prompts, "--eval-prompts")
        if eval_prompts is not None:
            eval_prompts = _prompt_list(eval_prompts, "eval_prompts")
        if reward is None and config.reward_spec() not in CLIP_REWARDS and not config.reward:
            raise ConfigError(
                f"`task` {config.task!r} is a task of the embedded model; on a pipeline pass `reward=` (an image "
                f"reward) or one of {PIPELINE_TASKS}."
            )
        source = pipeline if pipeline is not None else config.pipeline
        check_finetune_paths(config, source)
        if any(hasattr(pipeline, name) for name in ("unet", "transformer")):  # before the folder opens: a fused LoRA,
            check_not_fused(network_of(pipeline)[1], "finetune(pipeline=pipe)")  # trained on again, counts twice
        return cls(reward, source, prompts, eval_prompts)

    def settings(self, config: FinetuneConfig) -> dict:
        """What ``config.json`` and each checkpoint record: the config's fields, the pipeline's ``name_or_path``
        for a loaded pipeline, the sha256 of the training prompts (``sdo.app.resume.prompt_digest``), a Python
        reward's name and hashes (``reward_function``, ``reward_source_sha256``, ``reward_values_sha256``; then
        ``task`` and ``reward``, which it replaces, are None) and the fingerprints of the inputs (``inputs``)."""
        settings = asdict(config)
        if self.on_pipeline and not isinstance(self.pipeline, (str, Path)):
            settings["pipeline"] = str(getattr(self.pipeline, "name_or_path", "") or type(self.pipeline).__name__)
        if self.prompts is not None:
            settings["prompts_sha256"] = prompt_digest(self.prompts)
        if self.reward is not None:
            fingerprint = callable_fingerprint(self.reward)
            settings.update(task=None, reward=None, **{f"reward_{key}": value for key, value in fingerprint.items()})
        settings[INPUTS_KEY] = self._fingerprints(config)
        return settings

    def _fingerprints(self, config: FinetuneConfig) -> dict:
        """The inputs' fingerprints (``sdo.app.fingerprints``), taken at the first call on the main process (the
        others record nothing): the pipeline (a folder, a Hub id or a loaded pipeline's weights) and, without a
        Python reward, the files its reward reads. Unchanged files take their hashes from the folder's
        ``config.json`` unless ``config.verify``."""
        if self.inputs is None:
            if is_secondary_process():
                self.inputs = {}
                return self.inputs
            paths = config.reward_inputs() if self.on_pipeline and self.reward is None else {}
            inputs = {}
            if isinstance(self.pipeline, (str, Path)):
                paths = {"pipeline": str(self.pipeline), **paths}
            elif self.pipeline is not None:
                inputs["pipeline"] = pipeline_fingerprint(self.pipeline)
            inputs.update(fingerprint_inputs(paths, recorded_inputs(config.out), config.verify))
            self.inputs = inputs
        return self.inputs

    def target(self, config: FinetuneConfig, device: torch.device):
        """The model and reward being fine-tuned."""
        if not self.on_pipeline:
            return ZooTarget(config, device, reward=self.reward)
        pipeline = None if isinstance(self.pipeline, (str, Path)) else self.pipeline
        return PipelineTarget(config, device, pipeline, self.prompts, self.eval_prompts, image_reward=self.reward)


def _prompt_list(prompts: object, name: str) -> list[str]:
    """``prompts`` as a new list if it is a non-empty list or tuple of UTF-8 strings, else a ``ConfigError`` naming
    the argument ``name`` (a generator is refused: it would be used up by the first pass over it)."""
    if not isinstance(prompts, list | tuple):
        raise ConfigError(f"`{name}` must be a list of strings, got {type(prompts).__name__}; pass list(...).")
    if not prompts:
        raise ConfigError(f"`{name}` must be a non-empty list of strings, got an empty {type(prompts).__name__}.")
    for prompt in prompts:
        if not isinstance(prompt, str):
            raise ConfigError(f"`{name}` must be a list of strings, got an item {prompt!r}.")
        check_text(prompt, name)
    return list(prompts)


def _check_trackers(config: FinetuneConfig) -> list[str]:
    """``config``'s trackers, each one's package importable (else a one-line ``MissingExtraError``)."""
    for name in config.trackers():
        package = TRACKERS[name]
        if importlib.util.find_spec(package) is not None:
            continue
        if name == "tensorboard":
            raise missing_extra("tensorboard", "tensorboard", "--report-to tensorboard (Accelerate's tracker)")
        raise MissingExtraError(
            f"--report-to {name} needs the optional dependency `{package}`; install it with: pip install {package}."
        )
    return config.trackers()


def _train(
    config: FinetuneConfig,
    data: _TrainingData,
    progress: bool,
    accelerator,
    out: Path,
    checkpoint,
    settings: dict,
    target=None,
) -> dict:
    """The body of ``finetune``, run while the main process holds the output folder's lock: ``settings`` are what
    ``config.json`` recorded (each checkpoint records them too), ``target`` the model already loaded (by
    ``--method auto``'s planning) or None."""
    torch.manual_seed(config.seed)
    target = data.target(config, accelerator.device) if target is None else target
    trainer = Trainer(config, target, accelerator)
    start = restore(checkpoint, trainer.network, trainer.optimizer, trainer.lora, accelerator)
    metrics = MetricsLog(out / "metrics.jsonl", start)
    evaluator = target.evaluator() if accelerator.is_main_process else None
    if config.trackers():
        facts = {"eval_on_training_prompts": target.eval_on_training_prompts} if data.on_pipeline else {}
        accelerator.init_trackers(TRACKER_RUN, config={**asdict(config), **facts})
    bar = tqdm(
        range(start + 1, config.steps + 1),
        initial=start,
        total=config.steps,
        desc=f"finetune ({config.method})",
        disable=not (progress and accelerator.is_main_process),
    )
    record = metrics.records[-1] if metrics.records else {}
    for step in bar:
        started = time.perf_counter()
        means = trainer.update(step)
        mean_reward = means.pop("reward")
        if not torch.isfinite(torch.tensor(mean_reward)):
            last = latest_checkpoint(out / "checkpoints")
            raise NonFiniteRewardError(
                f"The reward is not finite at step {step} ({mean_reward}); stopped. Last good "
                f"checkpoint: {last.path if last else 'none'}.",
                {"step": step, "last_checkpoint": str(last.path) if last else None},
            )
        record = {"step": step, "reward": mean_reward, **means, "seconds": time.perf_counter() - started}
        if accelerator.is_main_process:
            if (config.eval_every and step % config.eval_every == 0) or step == config.steps:
                record.update(_evaluate(evaluator, trainer.network, accelerator, out, step))
            metrics.append(record)
            if step % config.checkpoint_every == 0 or step == config.steps:
                save_checkpoint(
                    out / "checkpoints", step, trainer.trainable_state(), trainer.optimizer, {"config": settings}
                )
        accelerator.log(tracked_scalars(record), step=step)
        accelerator.wait_for_everyone()
        bar.set_postfix(reward=f"{mean_reward:.3f}", s=f"{record['seconds']:.2f}")
    trainer.check_replicas_agree()
    if accelerator.is_main_process:
        _write_outputs(out, trainer, target, config, metrics.records, settings.get("reward_function"))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return record


def tracked_scalars(record: dict) -> dict:
    """What the trackers get of a ``metrics.jsonl`` record: its measures, not its ``step`` (the x axis, passed as
    such) nor its flags (``eval_on_training_prompts``, a fact of the run in the trackers' config)."""
    return {name: value for name, value in record.items() if name != "step" and not isinstance(value, bool)}


def _evaluate(evaluator, network: torch.nn.Module, accelerator, out: Path, step: int) -> dict:
    """Evaluate ``network``; write its images as ``out/samples/step-NNNNNN.png`` and log them to the trackers.
    Returns the measures."""
    from sdo.app.images import save_grid, to_uint8

    measures, images = evaluator(network)
    save_grid(images, out / "samples" / f"step-{step:06d}.png")
    for tracker in accelerator.trackers:
        pixels = to_uint8(images).numpy()
        if tracker.name == "tensorboard":
            tracker.log_images({"samples": pixels}, step=step, dataformats="NHWC")
        else:
            tracker.log_images({"samples": list(pixels)}, step=step)
    return measures


def _write_outputs(
    out: Path, trainer: Trainer, target, config: FinetuneConfig, records: list[dict], reward_name: str | None = None
) -> None:
    """The final weights (sdo's adapter and, for a pipeline, diffusers' files; the fused pipeline when asked)
    and the reward curves, titled with ``reward_name`` (a Python reward's ``module.qualname``) or the config's
    reward."""
    from sdo.app.plots import save_finetune_curves

    rank = config.lora_rank if trainer.lora else 0
    if isinstance(target, PipelineTarget):  # first, so that an OUT without it has no file diffusers would load
        save_for_diffusers(target.pipe, trainer.network, out, trainer.lora)
    adapter = adapter_file(out)
    save_adapter(trainer.network, adapter, rank, trainer.lora_targets)
    remove_old_adapter(out)
    if isinstance(target, PipelineTarget) and config.save_pipeline:
        fused = adapter if trainer.lora else None
        _save_fused_pipeline(target.pipe, trainer.network, Path(config.save_pipeline), out, fused)
    title = f"{config.method} on {reward_name or config.reward_spec()}"
    save_finetune_curves(records, out / "reward_curve.png", title, EVALUATION_MEASURES)


def _save_fused_pipeline(pipe, network: torch.nn.Module, folder: Path, out: Path, adapter: Path | None = None) -> None:
    """``pipe`` with LoRA merged into ``network``'s weights (then marked as holding the fused ``adapter`` file,
    ``sdo.app.lora.mark_fused``), written by ``save_pretrained`` with a marker naming ``out``
    (``sdo.app.runs.SAVED_PIPELINE``) into a temporary folder next to ``folder``, then renamed to it. Only a
    missing or empty ``folder``, or a pipeline saved earlier for ``out``, is replaced
    (``sdo.app.runs.replace_saved_folder``); a failed write (a full disk, a file in the way) is a
    ``WriteFailedError`` and leaves ``folder`` as it was."""
    from safetensors import SafetensorError

    merge_lora(network)
    if adapter is not None:
        mark_fused(network, adapter)
    network.requires_grad_(False)
    building = None
    try:
        make_dir(folder.parent)
        building = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        os.chmod(building, DIR_MODE)
        pipe.save_pretrained(str(building), safe_serialization=True)
        write_marker(building, {"command": "finetune", "kind": SAVED_PIPELINE, "out": str(out.resolve())})
        replace_saved_folder(building, folder, out)
    except WriteFailedError:
        raise
    except (OSError, SafetensorError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise WriteFailedError(
            f"--save-pipeline {folder}: could not write the pipeline ({reason}); the run's results in {out} are "
            "kept: free some space or choose another --save-pipeline, and rerun to save it."
        ) from None
    finally:
        if building is not None:
            shutil.rmtree(building, ignore_errors=True)
