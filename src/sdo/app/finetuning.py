"""Reward fine-tuning of the embedded model (LoRA via peft, or full weights), data-parallel with Accelerate.

Each update draws a global batch of class labels and initial noises from a generator seeded by ``(seed, step)``,
samples them with the method's gradient mode, and takes one AdamW step on ``-mean(reward)`` (DRaFT, Clark et al.
2024; AlignProp, Prabhudesai et al. 2023; SDO, Dou et al. 2025). With ``P`` processes each takes its slice of the
global batch and the gradients are summed across processes (``accelerator.reduce``), so a 2-process run gives the
weights of a 1-process run with the same global batch. Everything random is a function of ``(seed, step)``, so a
run resumed from a checkpoint continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sdo.app.checkpoints import latest_checkpoint, optimizer_from_tensors, save_checkpoint
from sdo.app.options import option
from sdo.app.tasks.finetune import PipelineTarget, ZooTarget, ink_reward
from sdo.errors import ConfigError
from sdo.gradients import GradientMode
from sdo.io import CorruptFileError, atomic_path, load_tensors, save_tensors
from sdo.methods import MethodOptions, gradient_mode, method_names

__all__ = ["FINETUNE_METHODS", "FINETUNE_TASKS", "FinetuneConfig", "finetune", "ink_reward", "load_adapter"]

FINETUNE_METHODS = method_names("weights")
ZOO_TASKS = ("confidence", "bold")
PIPELINE_TASKS = ("aesthetic", "clip", "style")
FINETUNE_TASKS = ZOO_TASKS + PIPELINE_TASKS


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run (every field is a ``sdo finetune`` flag)."""

    method: str = option("sdo", "gradient estimator", choices=FINETUNE_METHODS)
    task: str = option(
        "confidence",
        "reward: embedded model: confidence or bold; --pipeline: aesthetic, clip or style",
        choices=FINETUNE_TASKS,
    )
    steps: int = option(100, "total optimizer updates")
    sample_steps: int = option(20, "DDIM steps per sample")
    batch_size: int = option(8, "global batch (all processes, all accumulation micro-batches)")
    grad_accum: int = option(1, "gradient accumulation micro-batches per update")
    lr: float = option(1e-3, "AdamW learning rate")
    max_grad_norm: float = option(1.0, "clip the global gradient norm to this before each update (0: off)")
    lora_rank: int = option(4, "LoRA rank; 0 trains the full weights")
    lora_targets: str = option(
        "",
        "comma-separated module names LoRA adapts (default: attention and, for the "
        "embedded model, resnet convolutions)",
    )
    draft_k: int = option(2, "k of draft-k")
    alignprop_high: int = option(10, "alignprop: depth drawn uniformly in [1, this] per trajectory batch")
    guidance: float = option(3.0, "classifier-free guidance scale")
    eval_every: int = option(10, "held-out evaluation every this many updates (0: only at the end)")
    eval_per_class: int = option(5, "held-out samples per class")
    checkpoint_every: int = option(10, "checkpoint every this many updates")
    seed: int = option(0, "seeds every random draw")
    device: str = option("cpu", "cpu or cuda (under `accelerate launch`, Accelerate picks the device)")
    mixed_precision: str = option("no", "no, bf16 or fp16 (GPU)", choices=("no", "bf16", "fp16"))
    compile: bool = option(False, "run the no-grad network calls through torch.compile (CUDA: CUDA graphs)")
    tensorboard: bool = option(False, "log through Accelerate's TensorBoard tracker (needs tensorboard)")
    out: str = option("sdo-finetune", "output folder (a rerun with the same folder resumes)")
    pipeline: str = option("", "fine-tune a local Stable Diffusion folder instead of the embedded model")
    prompts: str = option("", "--pipeline: text file with one training prompt per line")
    clip_path: str = option("", "--pipeline: local CLIP folder for the rewards (or $SDO_CLIP_PATH)")
    aesthetic_head: str = option("", "--pipeline, aesthetic: head safetensors (or $SDO_AESTHETIC_HEAD)")
    style_image: str = option("", "--pipeline, style: reference image (PNG)")

    def __post_init__(self) -> None:
        for name in ("steps", "sample_steps", "batch_size", "grad_accum", "checkpoint_every", "eval_per_class"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"`batch_size` ({self.batch_size}) must be divisible by `grad_accum` ({self.grad_accum})."
            )
        if self.lora_rank < 0 or self.lr <= 0:
            raise ConfigError(f"`lora_rank` must be >= 0 and `lr` > 0, got {self.lora_rank} and {self.lr}.")
        if self.method not in FINETUNE_METHODS:
            raise ConfigError(f"`method` must be one of {FINETUNE_METHODS} for fine-tuning, got {self.method!r}.")
        if self.method == "draft-k" and not 1 <= self.draft_k <= self.sample_steps:
            raise ConfigError(f"`draft_k` must be in [1, {self.sample_steps}], got {self.draft_k}.")
        if self.method == "alignprop" and not 1 <= self.alignprop_high <= self.sample_steps:
            raise ConfigError(f"`alignprop_high` must be in [1, {self.sample_steps}], got {self.alignprop_high}.")
        tasks = PIPELINE_TASKS if self.pipeline else ZOO_TASKS
        if self.task not in tasks:
            where = "with --pipeline" if self.pipeline else "for the embedded model"
            raise ConfigError(f"`task` must be one of {tasks} {where}, got {self.task!r}.")
        if self.pipeline and not self.prompts:
            raise ConfigError("`prompts` (a file with one prompt per line) is required with --pipeline.")
        if self.pipeline and self.task == "style" and not self.style_image:
            raise ConfigError("`style_image` (a PNG) is required with --task style.")

    def mode(self, generator: torch.Generator) -> GradientMode:
        """The gradient mode of ``method`` from the registry (``sdo.methods``); its random draws come from
        ``generator``."""
        options = MethodOptions("weights", generator, draft_k=self.draft_k, alignprop_high=self.alignprop_high)
        return gradient_mode(self.method, options)


def add_lora(unet: torch.nn.Module, rank: int, targets: str) -> torch.nn.Module:
    """Inject LoRA adapters (peft) of ``rank`` into ``targets``; only they stay trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=[t.strip() for t in targets.split(",")], init_lora_weights="gaussian"
    )
    unet.requires_grad_(False)
    return inject_adapter_in_model(config, unet)


def make_target(config: FinetuneConfig, device: torch.device):
    """The model and reward being fine-tuned: a local pipeline when ``config.pipeline`` is set, else the zoo."""
    return PipelineTarget(config, device) if config.pipeline else ZooTarget(config, device)


def trainable_state(unet: torch.nn.Module, lora: bool) -> dict[str, torch.Tensor]:
    """The weights a checkpoint holds: the LoRA tensors (peft naming), or every weight."""
    if lora:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(unet)
    return unet.state_dict()


def _load_trainable(unet: torch.nn.Module, weights: dict[str, torch.Tensor], lora: bool) -> None:
    if lora:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(unet, weights)
        if getattr(result, "unexpected_keys", None):
            raise CorruptFileError(f"adapter tensors do not fit the model: {result.unexpected_keys[:3]} ...")
    else:
        unet.load_state_dict(weights)


def load_adapter(unet: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Load ``DIR/adapter.safetensors`` written by ``finetune`` into ``unet`` (injecting LoRA when it is one)."""
    from safetensors import safe_open

    tensors = load_tensors(path)
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() or {}
    rank = int(metadata.get("lora_rank", "0"))
    if rank:
        add_lora(unet, rank, metadata.get("lora_targets", ZooTarget.lora_targets))
    _load_trainable(unet, tensors, lora=bool(rank))
    return unet


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def _global_batch(config: FinetuneConfig, target, step: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Conditions ``[B]``, noises ``[B, ...]`` and the mode seed of update ``step`` (the same on every process)."""
    generator = _step_generator(config.seed, step)
    conditions, noise = target.draw(generator, config.batch_size)
    return conditions, noise, int(torch.randint(0, 2**62, (1,), generator=generator))


def _reduce_gradients(accelerator, parameters: list[torch.Tensor]) -> None:
    """Sum the gradients of all processes (one flat all-reduce)."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = accelerator.reduce(torch.cat([g.flatten() for g in grads]), reduction="sum")
    for parameter, chunk in zip(parameters, flat.split([g.numel() for g in grads]), strict=True):
        parameter.grad = chunk.view_as(parameter).clone()


class _MetricsLog:
    """``metrics.jsonl``, rewritten atomically at each update; on resume, entries after the checkpoint are dropped."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        self.records: list[dict] = []
        if path.is_file() and resume_step:
            lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            self.records = [record for record in lines if record["step"] <= resume_step]

    def append(self, record: dict) -> None:
        self.records.append(record)
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))


def _update(config, target, parameters, optimizer, reward_fn, accelerator, step: int) -> float:
    """One optimizer update on this process's slice of the global batch; returns the global mean reward."""
    labels, noise, mode_seed = _global_batch(config, target, step)
    per_process = config.batch_size // accelerator.num_processes
    rank_slice = slice(accelerator.process_index * per_process, (accelerator.process_index + 1) * per_process)
    labels, noise = labels[rank_slice].to(accelerator.device), noise[rank_slice].to(accelerator.device)
    optimizer.zero_grad(set_to_none=True)
    reward_sum = torch.zeros((), device=accelerator.device)
    for micro in range(config.grad_accum):
        part = slice(micro * len(labels) // config.grad_accum, (micro + 1) * len(labels) // config.grad_accum)
        sampler = target.sampler(target.unet, labels[part])
        mode = config.mode(torch.Generator().manual_seed(mode_seed))  # one draw per trajectory batch, every rank
        with accelerator.autocast():
            rewards = reward_fn(sampler.sample(noise[part], grad=mode), labels[part]).float()
        (-rewards.sum() / config.batch_size).backward()
        reward_sum += rewards.detach().sum()
    _reduce_gradients(accelerator, parameters)
    if config.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
    optimizer.step()
    return float(accelerator.reduce(reward_sum, reduction="sum")) / config.batch_size


def finetune(config: FinetuneConfig, reward: Callable | None = None, progress: bool = True) -> dict:
    """Fine-tune the embedded model (or ``config.pipeline``) on ``config.task``, or on ``reward(x0, conditions)``.

    Writes into ``config.out``: ``checkpoints/step-NNNNNN/`` every ``checkpoint_every`` updates (resumed from by a
    rerun), ``metrics.jsonl`` (``step``, ``reward``, ``seconds`` and, at evaluations, ``judge_accuracy`` and
    ``frechet_judge``), ``adapter.safetensors`` (final trainable weights; ``load_adapter`` puts them back) and
    ``reward_curve.png``. Returns the last metrics record.

    Raises:
        ValueError: bad configuration, or a non-finite reward (the message names the step; the last good
            checkpoint is kept).
    """
    from accelerate import Accelerator

    out = Path(config.out)
    if config.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--tensorboard logs through Accelerate's TensorBoard tracker: pip install tensorboard")
    tracker = "tensorboard" if config.tensorboard else None
    accelerator = Accelerator(
        cpu=config.device == "cpu", mixed_precision=config.mixed_precision, log_with=tracker, project_dir=str(out)
    )
    if config.batch_size % (accelerator.num_processes * config.grad_accum):
        raise ConfigError(
            f"`batch_size` ({config.batch_size}) must be divisible by processes x grad_accum "
            f"({accelerator.num_processes} x {config.grad_accum})."
        )
    torch.manual_seed(config.seed)
    target = make_target(config, accelerator.device)
    unet, lora_targets = target.unet, config.lora_targets or target.lora_targets
    lora = config.lora_rank > 0
    if lora:
        add_lora(unet, config.lora_rank, lora_targets)
    else:
        unet.requires_grad_(True)
    unet.to(accelerator.device)
    parameters = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0)
    start = _resume(out / "checkpoints", unet, optimizer, lora, accelerator)
    metrics = _MetricsLog(out / "metrics.jsonl", start)
    reward_fn = reward or target.reward
    evaluator = target.evaluator() if accelerator.is_main_process else None
    if config.tensorboard:
        accelerator.init_trackers("sdo-finetune", config=asdict(config))
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
        mean_reward = _update(config, target, parameters, optimizer, reward_fn, accelerator, step)
        if not torch.isfinite(torch.tensor(mean_reward)):
            last = latest_checkpoint(out / "checkpoints")
            raise ConfigError(
                f"The reward is not finite at step {step} ({mean_reward}); stopped. Last good "
                f"checkpoint: {last.path if last else 'none'}."
            )
        record = {"step": step, "reward": mean_reward, "seconds": time.perf_counter() - started}
        if accelerator.is_main_process:
            if (config.eval_every and step % config.eval_every == 0) or step == config.steps:
                record.update(evaluator(unet))
            metrics.append(record)
            if step % config.checkpoint_every == 0 or step == config.steps:
                save_checkpoint(
                    out / "checkpoints", step, trainable_state(unet, lora), optimizer, {"config": asdict(config)}
                )
        accelerator.log(record, step=step)
        accelerator.wait_for_everyone()
        bar.set_postfix(reward=f"{mean_reward:.3f}", s=f"{record['seconds']:.2f}")
    _check_replicas_agree(accelerator, parameters)
    if accelerator.is_main_process:
        _write_outputs(out, unet, lora, config, metrics.records, lora_targets)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return record


def _check_replicas_agree(accelerator, parameters: list[torch.Tensor]) -> None:
    """Data parallelism must leave every process with the same weights; gather them and compare exactly."""
    if accelerator.num_processes == 1:
        return
    flat = torch.cat([p.detach().flatten() for p in parameters])
    gathered = accelerator.gather(flat[None])
    if not all(torch.equal(gathered[0], row) for row in gathered[1:]):
        raise RuntimeError("The processes ended with different weights; data-parallel updates went out of sync.")
    if accelerator.is_main_process:
        print(f"Weights identical on all {accelerator.num_processes} processes.")


def _resume(folder: Path, unet, optimizer, lora: bool, accelerator) -> int:
    checkpoint = latest_checkpoint(folder)
    if checkpoint is None:
        return 0
    _load_trainable(unet, {k: v.to(accelerator.device) for k, v in checkpoint.weights.items()}, lora)
    optimizer_from_tensors(optimizer, checkpoint.optimizer_tensors, checkpoint.state)
    if accelerator.is_main_process:
        print(f"Resuming from {checkpoint.path} (step {checkpoint.step}).")
    return checkpoint.step


def _write_outputs(out: Path, unet, lora: bool, config: FinetuneConfig, records: list[dict], targets: str) -> None:
    from sdo.app.plots import save_finetune_curves

    metadata = {"lora_rank": str(config.lora_rank if lora else 0), "lora_targets": targets}
    save_tensors(trainable_state(unet, lora), out / "adapter.safetensors", metadata=metadata)
    save_finetune_curves(records, out / "reward_curve.png", f"{config.method} on {config.task}")
