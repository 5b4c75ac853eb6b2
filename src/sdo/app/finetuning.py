"""Reward fine-tuning of the embedded model (LoRA via peft, or full weights), data-parallel with Accelerate.

Each update draws a global batch of class labels and initial noises from a generator seeded by ``(seed, step)``,
samples them with the method's gradient mode, and takes one AdamW step on ``-mean(reward)`` (DRaFT, Clark et al.
2024; AlignProp, Prabhudesai et al. 2023; SDO, Dou et al. 2025). With ``P`` processes each takes its slice of the
global batch and the gradients are summed across processes (``accelerator.reduce``), so a 2-process run gives the
weights of a 1-process run with the same global batch. Everything random is a function of ``(seed, step)``, so a
run resumed from a checkpoint continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sdo.app.checkpoints import Checkpoint, latest_checkpoint, optimizer_from_tensors, save_checkpoint
from sdo.app.options import option
from sdo.app.pipeline_options import PipelineOptions
from sdo.app.runs import RunLock, check_command, check_writable, clean_leftovers, differing_flags, flag, write_config
from sdo.app.tasks.finetune import PipelineTarget, ZooTarget, ink_reward
from sdo.checks import check_device, check_positive, check_seed
from sdo.errors import (
    ConfigError,
    NonFiniteRewardError,
    OutputLockedError,
    ResumeMismatchError,
    SdoError,
    missing_extra,
)
from sdo.gradients import GradientMode
from sdo.io import CorruptFileError, atomic_path, load_tensors, save_tensors
from sdo.kl import TrajectoryKL, adapters_disabled
from sdo.methods import MethodOptions, gradient_mode, method_names
from sdo.sampling import Sampler

__all__ = ["FINETUNE_METHODS", "FINETUNE_TASKS", "FinetuneConfig", "finetune", "ink_reward", "load_adapter"]

FINETUNE_METHODS = method_names("weights")
ZOO_TASKS = ("confidence", "bold")
PIPELINE_TASKS = ("aesthetic", "clip", "style", "pickscore")
FINETUNE_TASKS = ZOO_TASKS + PIPELINE_TASKS


@dataclass(frozen=True)
class FinetuneConfig(PipelineOptions):
    """One fine-tuning run (every field is a ``sdo finetune`` flag; the pipeline and reward fields are the shared
    ``PipelineOptions`` block, whose ``reward`` here defaults to the ``task`` reward)."""

    method: str = option("sdo", "gradient estimator", choices=FINETUNE_METHODS)
    task: str = option(
        "confidence",
        "reward: embedded model: confidence or bold; --pipeline: aesthetic, clip, style or pickscore",
        choices=FINETUNE_TASKS,
    )
    steps: int = option(100, "total optimizer updates")
    sample_steps: int = option(20, "DDIM steps per sample")
    batch_size: int = option(8, "global batch (all processes, all accumulation micro-batches)")
    grad_accum: int = option(1, "gradient accumulation micro-batches per update")
    lr: float = option(1e-3, "AdamW learning rate")
    max_grad_norm: float = option(1.0, "clip the global gradient norm to this before each update (0: off)")
    kl_weight: float = option(
        0.0,
        "weight of the base-model regularizer: mean squared difference between the fine-tuned and the frozen "
        "base model's predictions at the trained steps (the KL between their Gaussian steps up to a constant)",
    )
    lora_rank: int = option(4, "LoRA rank; 0 trains the full weights")
    lora_targets: str = option(
        "",
        "comma-separated module names LoRA adapts (default: attention and, for the "
        "embedded model, resnet convolutions)",
    )
    draft_k: int = option(2, "k of draft-k")
    alignprop_high: int = option(10, "alignprop: depth drawn uniformly in [1, this] per trajectory batch")
    eval_every: int = option(10, "held-out evaluation every this many updates (0: only at the end)")
    eval_per_class: int = option(5, "held-out samples per class")
    checkpoint_every: int = option(10, "checkpoint every this many updates")
    seed: int = option(0, "seeds every random draw")
    device: str = option("cpu", "cpu or cuda (under `accelerate launch`, Accelerate picks the device)")
    mixed_precision: str = option("no", "no, bf16 or fp16 (GPU)", choices=("no", "bf16", "fp16"))
    compile: bool = option(False, "run the no-grad network calls through torch.compile (CUDA: CUDA graphs)")
    tensorboard: bool = option(
        False, "log through Accelerate's TensorBoard tracker (needs shortcut-diffusion[tensorboard])"
    )
    out: str = option("sdo-finetune", "output folder (a rerun with the same folder resumes)")
    prompts: str = option("", "--pipeline: text file with one training prompt per line")
    reward: str = option(
        "", "--pipeline: rewards as a weighted sum, e.g. clip=1.0,aesthetic=0.5 (default: the --task reward alone)"
    )

    def __post_init__(self) -> None:
        for name in ("steps", "sample_steps", "batch_size", "grad_accum", "checkpoint_every", "eval_per_class"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"`batch_size` ({self.batch_size}) must be divisible by `grad_accum` ({self.grad_accum})."
            )
        if self.lora_rank < 0:
            raise ConfigError(f"`lora_rank` must be >= 0, got {self.lora_rank}.")
        check_positive(self.lr, "lr")
        check_positive(self.max_grad_norm, "max_grad_norm", allow_zero=True)
        check_seed(self.seed)
        if self.eval_every < 0:
            raise ConfigError(f"`eval_every` must be >= 0 (0: only at the end), got {self.eval_every}.")
        if self.kl_weight < 0:
            raise ConfigError(f"`kl_weight` must be >= 0, got {self.kl_weight}.")
        if self.method not in FINETUNE_METHODS:
            raise ConfigError(f"`method` must be one of {FINETUNE_METHODS} for fine-tuning, got {self.method!r}.")
        if self.method == "draft-k" and not 1 <= self.draft_k <= self.sample_steps:
            raise ConfigError(f"`draft_k` must be in [1, {self.sample_steps}], got {self.draft_k}.")
        if self.method == "alignprop" and not 1 <= self.alignprop_high <= self.sample_steps:
            raise ConfigError(f"`alignprop_high` must be in [1, {self.sample_steps}], got {self.alignprop_high}.")
        tasks = PIPELINE_TASKS if self.pipeline else ZOO_TASKS
        if self.task not in tasks and not (self.pipeline and self.reward):  # --reward replaces --task
            where = "with --pipeline" if self.pipeline else "for the embedded model"
            raise ConfigError(f"`task` must be one of {tasks} {where}, got {self.task!r}.")
        if self.pipeline and not self.prompts:
            raise ConfigError("`prompts` (a file with one prompt per line) is required with --pipeline.")
        if self.reward and not self.pipeline:
            raise ConfigError("`reward` (a weighted sum of image rewards) is for --pipeline runs.")
        super().__post_init__()

    def reward_spec(self) -> str:
        """The ``--pipeline`` reward spec: ``reward``, or the ``task`` reward alone."""
        return self.reward or self.task

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


def _load_trainable(unet: torch.nn.Module, weights: dict[str, torch.Tensor], lora: bool, source: object) -> None:
    """Load exactly the trainable tensors into ``unet``: a missing, unexpected or mis-shaped tensor is a
    ``CorruptFileError`` naming ``source`` (the file) and the first offending tensor; nothing is loaded then."""
    expected = {name: tuple(value.shape) for name, value in trainable_state(unet, lora).items()}
    if not weights:
        raise CorruptFileError(f"{source}: holds no tensors; expected the {len(expected)} trainable tensors.")
    problems = [f"unexpected tensor {name!r}" for name in sorted(set(weights) - set(expected))]
    problems += [f"missing tensor {name!r}" for name in sorted(set(expected) - set(weights))]
    problems += [
        f"tensor {name!r} has shape {tuple(weights[name].shape)}, the model's is {expected[name]}"
        for name in sorted(set(expected) & set(weights))
        if tuple(weights[name].shape) != expected[name]
    ]
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise CorruptFileError(f"{source}: does not fit the model: {problems[0]}{more}.")
    if lora:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(unet, weights)
    else:
        unet.load_state_dict(weights)


def load_adapter(unet: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Load ``DIR/adapter.safetensors`` written by ``finetune`` into ``unet`` (injecting LoRA when it is one).

    Raises:
        CorruptFileError: the file is damaged, its ``lora_rank`` metadata is missing or not an integer >= 0, its
            LoRA targets are not in ``unet``, or its tensors are not exactly the trainable ones (a tensor missing,
            unexpected or of another shape); the message names the file and the first offending key.
    """
    from safetensors import safe_open

    tensors = load_tensors(path)
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() or {}
    if "lora_rank" not in metadata:
        raise CorruptFileError(f"{path}: no 'lora_rank' metadata; not an adapter written by `sdo finetune`.")
    try:
        rank = int(metadata["lora_rank"])
    except ValueError:
        rank = -1
    if rank < 0:
        raise CorruptFileError(f"{path}: metadata 'lora_rank' is {metadata['lora_rank']!r}, not an integer >= 0.")
    if rank:
        try:
            add_lora(unet, rank, metadata.get("lora_targets", ZooTarget.lora_targets))
        except ValueError as error:
            raise CorruptFileError(f"{path}: metadata 'lora_targets' do not fit the model: {error}") from None
    _load_trainable(unet, tensors, lora=bool(rank), source=path)
    return unet


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % 2**64)  # every seed in [0, 2**63 - 1]


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
            self.records = [record for record in self._read() if record["step"] <= resume_step]

    def _read(self) -> list[dict]:
        records = []
        for number, line in enumerate(self.path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise CorruptFileError(f"{self.path}, line {number}: not valid JSON ({error.msg}).") from None
            if (
                not isinstance(record, dict)
                or isinstance(record.get("step"), bool)
                or not isinstance(record.get("step"), int)
            ):
                raise CorruptFileError(f"{self.path}, line {number}: not a metrics record with an integer 'step'.")
            records.append(record)
        return records

    def append(self, record: dict) -> None:
        self.records.append(record)
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))


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


def _update(config, target, parameters, optimizer, reward_fn, accelerator, step: int, base=None) -> dict:
    """One optimizer update on this process's slice of the global batch; returns the global means of the reward,
    of each term of a weighted reward (``reward_NAME``) and, with ``kl_weight``, of the KL penalty (``kl``)."""
    labels, noise, mode_seed = _global_batch(config, target, step)
    per_process = config.batch_size // accelerator.num_processes
    rank_slice = slice(accelerator.process_index * per_process, (accelerator.process_index + 1) * per_process)
    labels, noise = labels[rank_slice].to(accelerator.device), noise[rank_slice].to(accelerator.device)
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, torch.Tensor] = {}

    def add(name: str, values: torch.Tensor) -> None:
        sums[name] = sums.get(name, torch.zeros((), device=accelerator.device)) + values.detach().float().sum()

    for micro in range(config.grad_accum):
        part = slice(micro * len(labels) // config.grad_accum, (micro + 1) * len(labels) // config.grad_accum)
        sampler = target.sampler(target.unet, labels[part])
        if config.kl_weight > 0:
            sampler, kl = _regularized(sampler, base)
        mode = config.mode(torch.Generator().manual_seed(mode_seed))  # one draw per trajectory batch, every rank
        with accelerator.autocast():
            x0 = sampler.sample(noise[part], grad=mode)
            rewards = reward_fn(x0, labels[part]).float()
        if x0.requires_grad and not rewards.requires_grad:
            raise ConfigError(
                "The reward has no gradient path to the sample: `reward(x0, conditions)` returned a tensor that "
                "does not depend on x0 through differentiable operations (computed under torch.no_grad(), "
                "detached, or converted to numbers?)."
            )
        loss = -rewards.sum()
        add("reward", rewards)
        for name, values in (getattr(reward_fn, "last_terms", None) or {}).items():
            add(f"reward_{name}", values)
        if config.kl_weight > 0:
            penalty = kl.penalty()
            penalty = torch.zeros_like(rewards) if penalty is None else penalty.float()
            loss = loss + config.kl_weight * penalty.sum()
            add("kl", penalty)
        (loss / config.batch_size).backward()
    _reduce_gradients(accelerator, parameters)
    if config.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
    optimizer.step()
    scale = config.batch_size
    return {name: float(accelerator.reduce(total, reduction="sum")) / scale for name, total in sums.items()}


def finetune(
    config: FinetuneConfig, reward: Callable | None = None, progress: bool = True, *, break_lock: bool = False
) -> dict:
    """Fine-tune the embedded model (or ``config.pipeline``) on ``config.task``, or on ``reward(x0, conditions)``.

    Writes into ``config.out``: ``checkpoints/step-NNNNNN/`` every ``checkpoint_every`` updates (resumed from by a
    rerun), ``metrics.jsonl`` (``step``, ``reward``, ``seconds`` and, at evaluations, ``judge_accuracy`` and
    ``frechet_judge``), ``adapter.safetensors`` (final trainable weights; ``load_adapter`` puts them back) and
    ``reward_curve.png``. With ``kl_weight`` the loss adds ``kl_weight * mean_b penalty_b``, the base-model
    regularizer of ``sdo.kl.TrajectoryKL`` (logged as ``kl``); a weighted ``--reward`` logs each term as
    ``reward_NAME``. Returns the last metrics record.

    The folder records the run's settings in ``config.json`` and is locked (``.sdo.lock``) for the run; a rerun
    resumes only with the same result-changing settings (``RESUME_FREE`` may change, ``steps`` may grow).
    ``break_lock`` takes over a lock written from another host (see ``sdo.app.runs.RunLock``).

    Raises:
        ConfigError: bad configuration (checked before any model loads).
        NonFiniteRewardError: a non-finite reward; the message names the step, ``result`` holds ``step`` and
            ``last_checkpoint`` (the last good checkpoint, kept on disk).
        ResumeMismatchError: ``config.out`` holds a run with other settings; the message names the flags.
        OutputLockedError: another process is writing into ``config.out``.
    """
    from accelerate import Accelerator

    out = Path(config.out)
    check_device(config.device)
    if config.mixed_precision == "fp16" and (config.device == "cpu" or not torch.cuda.is_available()):
        raise ConfigError(
            "`mixed_precision` fp16 needs a CUDA GPU (and --device cuda); on the CPU use --mixed-precision bf16 or no."
        )
    if config.pipeline and not Path(config.prompts).is_file():
        raise ConfigError(f"`prompts` file {config.prompts} not found (a text file with one prompt per line).")
    if config.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise missing_extra("tensorboard", "tensorboard", "--tensorboard (Accelerate's TensorBoard tracker)")
    tracker = "tensorboard" if config.tensorboard else None
    accelerator = Accelerator(
        cpu=config.device == "cpu", mixed_precision=config.mixed_precision, log_with=tracker, project_dir=str(out)
    )
    if config.batch_size % (accelerator.num_processes * config.grad_accum):
        raise ConfigError(
            f"`batch_size` ({config.batch_size}) must be divisible by processes x grad_accum "
            f"({accelerator.num_processes} x {config.grad_accum})."
        )
    lock, checkpoint = _open_output(accelerator, out, config, break_lock)
    try:
        return _train(config, reward, progress, accelerator, out, checkpoint)
    finally:
        if lock is not None:
            lock.release()


def _train(config: FinetuneConfig, reward, progress: bool, accelerator, out: Path, checkpoint) -> dict:
    """The body of ``finetune``, run while the main process holds the output folder's lock."""
    torch.manual_seed(config.seed)
    target = make_target(config, accelerator.device)
    unet, lora_targets = target.unet, config.lora_targets or target.lora_targets
    lora = config.lora_rank > 0
    if lora:
        add_lora(unet, config.lora_rank, lora_targets)
    else:
        unet.requires_grad_(True)
    unet.to(accelerator.device)
    # The base model of the KL regularizer: the adapters switched off (LoRA), or a frozen copy (full weights).
    base = copy.deepcopy(unet).requires_grad_(False) if config.kl_weight > 0 and not lora else None
    parameters = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0)
    start = _resume(checkpoint, unet, optimizer, lora, accelerator)
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
        means = _update(config, target, parameters, optimizer, reward_fn, accelerator, step, base)
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


RESUME_FREE = frozenset({"out", "eval_every", "checkpoint_every", "device", "tensorboard"})
"""Settings a rerun may change without changing the trained weights: where the folder is, how often it
evaluates and checkpoints, the device (same computation, other hardware) and logging. ``steps`` may grow; every
other setting must match the run the folder holds."""


def _open_output(accelerator, out: Path, config: FinetuneConfig, break_lock: bool):
    """Before any model loads: on the main process, check ``out`` is writable, lock it, check that a run it
    holds has the same settings, clean a killed run's leftovers and record ``config.json``. Every process then
    gets the outcome (the lock is shared through the main process). Returns the lock (None on other processes)
    and the checkpoint to resume from (None if there is none)."""
    lock, error, checkpoint = None, None, None
    if accelerator.is_main_process:
        try:
            check_writable(out)
            lock = RunLock(out, "finetune", break_lock).acquire()
            checkpoint = _check_resume(out, config)
            clean_leftovers(out)
            write_config(out, "finetune", asdict(config))
        except SdoError as caught:
            error = caught
            if lock is not None:
                lock.release()
    if accelerator.num_processes > 1:
        failed = accelerator.reduce(torch.tensor(float(error is not None), device=accelerator.device), "sum")
        if float(failed) and error is None:
            raise OutputLockedError(f"{out}: the main process could not open the output folder (see its error).")
    if error is not None:
        raise error
    if not accelerator.is_main_process:
        checkpoint = latest_checkpoint(out / "checkpoints")
    return lock, checkpoint


def _check_resume(out: Path, config: FinetuneConfig) -> Checkpoint | None:
    """The checkpoint to resume from in ``out``, if any. Its run (the checkpoint's settings, else ``config.json``)
    must have the same result-changing settings as ``config``; ``steps`` may not drop below the updates done."""
    recorded = check_command(out, "finetune")
    checkpoint = latest_checkpoint(out / "checkpoints")
    if checkpoint is None:
        return None  # nothing to resume: the run starts over
    saved = checkpoint.state.get("config") if isinstance(checkpoint.state.get("config"), dict) else recorded
    if saved is None:
        return checkpoint
    defaults = {item.name: item.default for item in fields(FinetuneConfig)}
    changes = differing_flags(saved, asdict(config), defaults, RESUME_FREE | {"steps"})
    if config.steps < checkpoint.step:
        changes.insert(0, f"--steps {config.steps} is below the {checkpoint.step} updates already done")
    if changes:
        free = ", ".join(flag(name) for name in sorted(RESUME_FREE - {"out"}))
        raise ResumeMismatchError(
            f"{out} holds a run with other settings: {'; '.join(changes)}. To resume it, rerun with its settings "
            f"(only --steps may grow; {free} may change), or choose another --out."
        )
    return checkpoint


def _resume(checkpoint: Checkpoint | None, unet, optimizer, lora: bool, accelerator) -> int:
    if checkpoint is None:
        return 0
    weights = {k: v.to(accelerator.device) for k, v in checkpoint.weights.items()}
    _load_trainable(unet, weights, lora, source=checkpoint.path / "weights.safetensors")
    optimizer_from_tensors(optimizer, checkpoint.optimizer_tensors, checkpoint.state)
    if accelerator.is_main_process:
        print(f"Resuming from {checkpoint.path} (step {checkpoint.step}).")
    return checkpoint.step


def _write_outputs(out: Path, unet, lora: bool, config: FinetuneConfig, records: list[dict], targets: str) -> None:
    from sdo.app.plots import save_finetune_curves

    metadata = {"lora_rank": str(config.lora_rank if lora else 0), "lora_targets": targets}
    save_tensors(trainable_state(unet, lora), out / "adapter.safetensors", metadata=metadata)
    save_finetune_curves(records, out / "reward_curve.png", f"{config.method} on {config.task}")
