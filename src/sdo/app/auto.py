"""``--method auto``: a memory budget in, the estimator to run out, from the planner and the measured guide.

A ``Job`` is what a run does (the initial noise, a latent at a later step, a real image inverted to one, or a
network's weights) with the parts it runs (one network call, the reward, the modules kept on the device). For each
row of the measured guide (``sdo.app.guide.GUIDE``: the estimators ranked by reward at equal time for that job in the
stored comparisons) that the command can write (``sdo optimize``: a latent the plain sampler replays, so not
``freedom`` or ``doodl*``), the planner forecasts the memory the run keeps on the device,

    weights + optimizer + activations,

``weights`` the distinct parameters and buffers of the job's modules; ``optimizer`` the gradient and Adam's two
moments of what is optimized (3 x its bytes: the latent, the LoRA weights or every weight); ``activations`` the peak
of ``sdo.app.plan`` (``plan_method``: one network call's saved bytes ``A``, its input ``X`` and the reward's, composed
along the mode's step roles) or, for the modes without step roles, ``adjoint`` (one step's graph rebuilt at a time,
``max(A_r, A) + (stored + 2) X``, ``stored = ceil(n / k)`` states with ``--adjoint-checkpoint-every k``), DOODL (the
coupled EDICT pair: ``max(A_r, 2 A) + 4 X``) and FreeDoM (one guided step: ``A + A_r + X``). The calls are traced
under ``FakeTensorMode`` with the job's own modules, so any architecture the run loads (UNet, SDXL, SD3, Flux
transformers) is planned without memory or arithmetic; weights jobs trace with every weight requiring a gradient,
an upper bound for LoRA's activations. The first row that fits the budget is chosen (``choose``); when none does, a
``BudgetError`` names the smallest budget that would do and the flags that lower memory.

Planned memory is a forecast: on CUDA the allocator adds one call's workspace (``sdo bench --plan`` was within 6% of
the measured peak); on the CPU the figure is what autograd saves, as ``sdo.memory.PeakMemory`` counts it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from sdo.app.guide import GUIDE, guide_settings
from sdo.app.method_flags import AUTO
from sdo.app.planner import CallProfile, plan_any, profile_call
from sdo.errors import ConfigError
from sdo.methods import METHODS, MethodOptions

__all__ = [
    "AUTO",
    "CPU_BUDGET_GIB",
    "BudgetError",
    "Choice",
    "Job",
    "MemoryParts",
    "budget_bytes",
    "choose",
    "module_bytes",
    "plan_activations",
    "profile_job",
    "with_row_options",
]

CPU_BUDGET_GIB = 16.0
"""``--memory-budget``'s default on the CPU (on CUDA: the device's free memory when the run starts)."""

GIB = 1024**3
Target = Literal["noise", "latent", "image", "weights"]
JOB_WORDS = {
    "noise": "optimizing the initial noise",
    "latent": "editing from step {start}",
    "image": "editing a real image from step {start} (measured on the editing protocol)",
    "weights": "fine-tuning the weights",
}


class BudgetError(ConfigError):
    """No estimator's planned memory fits the budget (a bad setting: the message names the flags to change)."""


@dataclass(frozen=True)
class MemoryParts:
    """What a run keeps on the device, in bytes: the modules' ``weights``, the ``optimizer``'s state (gradient and
    Adam's moments of what is optimized) and the estimator's peak ``activations``."""

    weights: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.activations

    def describe(self) -> str:
        """``2.03 GiB (weights 0.01, optimizer 0.00, activations 2.02)``."""
        parts = ", ".join(f"{name} {_gib(value).removesuffix(' GiB')}" for name, value in asdict(self).items())
        return f"{_gib(self.total)} ({parts})"


@dataclass(frozen=True)
class Job:
    """What a run optimizes and with what.

    Attributes:
        target: ``"noise"`` (the initial latent), ``"latent"`` (a latent at ``start_step`` > 0), ``"image"`` (a real
            image inverted to ``start_step``) or ``"weights"``.
        steps: sampling steps of the schedule; the run takes ``steps - start_step`` of them.
        network: ``network(x, t)``, one model call (``sdo.Sampler.model_fn``).
        reward: ``reward(x0) -> [B]`` of a sample (decoding included).
        latent: ``[B, ...]`` a latent the network takes (its values are not read).
        timestep: a timestep the network takes.
        modules: what stays on the device (network, decoder, reward networks); their weights count once each.
        trainable: bytes of the optimized weights (``weights``: LoRA's or every weight's); unused for a latent.
        device: where the run goes (``"cuda"`` sets the default budget).
    """

    target: Target
    steps: int
    network: Callable[..., torch.Tensor]
    reward: Callable[[torch.Tensor], torch.Tensor]
    latent: torch.Tensor
    timestep: torch.Tensor
    modules: Sequence[torch.nn.Module] = ()
    start_step: int = 0
    trainable: int = 0
    device: str = "cpu"

    @property
    def protocol(self) -> str:
        """The guide's job: ``"weights"``, ``"noise"`` (from step 0) or ``"edit"``."""
        if self.target == "weights":
            return "weights"
        return "noise" if self.target == "noise" else "edit"

    @property
    def variable(self) -> str:
        return "weights" if self.target == "weights" else "latent"

    def words(self) -> str:
        return JOB_WORDS[self.target].format(start=self.start_step)


@dataclass(frozen=True)
class Choice:
    """The estimator ``auto`` chose: registry ``method`` with flag ``options`` (e.g. ``lr_schedule``), the guide's
    ``row``, its planned memory ``parts`` within ``budget`` bytes, the ``reason`` printed before any work, and the
    ``planned`` totals of every row considered (bytes; None: not plannable or not written by this command)."""

    method: str
    options: dict
    row: str
    parts: MemoryParts
    budget: int
    reason: str
    planned: dict = field(default_factory=dict)

    def record(self) -> dict:
        """What ``config.json`` records (JSON), read back by ``from_record``."""
        return {**asdict(self), "parts": asdict(self.parts)}

    @classmethod
    def from_record(cls, record: dict) -> Choice:
        """The choice a run recorded (``record``); a record that is not one is refused."""
        try:
            return cls(**{**record, "parts": MemoryParts(**record["parts"])})
        except (KeyError, TypeError) as error:
            raise ConfigError(f"The recorded `auto` choice is not one sdo wrote: {record!r}.") from error

    def line(self) -> str:
        """The one line printed before any work."""
        return f"auto: {self.reason}"


def budget_bytes(memory_budget: float | None, device: str) -> int:
    """``--memory-budget`` in GiB as bytes; None: the free memory of a CUDA ``device``, else ``CPU_BUDGET_GIB``."""
    if memory_budget is not None:
        return int(memory_budget * GIB)
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    return int(CPU_BUDGET_GIB * GIB)


def module_bytes(modules: Sequence[torch.nn.Module]) -> int:
    """Bytes of the distinct parameter and buffer storages of ``modules`` (a shared module counts once)."""
    storages = {}
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            storage = tensor.untyped_storage()
            storages[(storage.device, storage.data_ptr(), id(storage) if tensor.is_meta else 0)] = storage.nbytes()
    return sum(storages.values())


def choose(
    job: Job,
    budget: int,
    base: MethodOptions | None = None,
    *,
    replays_only: bool = True,
    guide: dict[str, tuple[str, ...]] | None = None,
    hints: Sequence[str] = ("a smaller --batch",),
    profiles: tuple[CallProfile, CallProfile] | None = None,
) -> Choice:
    """The first row of the guide for ``job`` whose planned memory fits ``budget`` bytes.

    Args:
        base: the run's other options (``--kept-steps``, ``--checkpoint-kept``, ...); each row's fixed options
            replace them.
        replays_only: only estimators whose result is a latent the plain sampler replays (``sdo optimize``).
        guide: the ranking (default ``sdo.app.guide.GUIDE``).
        hints: the flags that lower memory for this command, named when nothing fits.
        profiles: ``profile_job(job)``, when already traced (one trace serves several budgets).

    Raises:
        BudgetError: no row fits; the message says the smallest budget that would and ``hints``.
    """
    base = base or MethodOptions(job.variable)
    rows = (guide or GUIDE)[job.protocol]
    if not rows:
        raise ConfigError(f"The measured guide has no estimator for {job.words()}; choose --method yourself.")
    network, reward = profiles or profile_job(job)
    fixed = module_bytes(job.modules)
    optimized = job.trainable if job.variable == "weights" else job.latent.numel() * job.latent.element_size()
    considered: list[_Candidate] = []
    for row in rows:
        for method, options in _row_methods(job.protocol, row):
            if replays_only and not METHODS[method].runner.replays:
                continue
            activations = plan_activations(method, with_row_options(base, options), job, network, reward)
            parts = None if activations is None else MemoryParts(fixed, 3 * optimized, activations)
            candidate = _Candidate(row, method, options, parts)
            if parts is not None and parts.total <= budget:
                return _choice(job, candidate, budget, considered)
            considered.append(candidate)
    planned = [candidate for candidate in considered if candidate.parts is not None]
    if not planned:
        raise ConfigError(f"No estimator of the measured guide for {job.words()} can be planned here.")
    smallest = min(planned, key=lambda candidate: candidate.parts.total)
    raise BudgetError(
        f"auto: nothing fits the {_gib(budget)} budget (`memory_budget`) for {job.words()}: the smallest, "
        f"{smallest.words()}, needs {smallest.parts.describe()}; raise --memory-budget to "
        f"{math.ceil(smallest.parts.total / GIB * 100) / 100:.2f} or lower the memory with {', '.join(hints)}."
    )


@dataclass(frozen=True)
class _Candidate:
    """A method serving a guide ``row``, with its flag ``options`` and planned ``parts`` (None: not plannable)."""

    row: str
    method: str
    options: dict
    parts: MemoryParts | None

    def words(self) -> str:
        """``sdo with a cosine schedule``, ``full backpropagation``, ``adjoint (--adjoint-iters 0 ...)``."""
        names = {"full": "full backpropagation", "checkpointed": "checkpointed backpropagation"}
        words = names.get(self.method, self.method)
        extras = [f"--{key.replace('_', '-')} {value}" for key, value in self.options.items() if key != "lr_schedule"]
        if self.options.get("lr_schedule") == "cosine":
            words += " with a cosine schedule"
        return f"{words} ({' '.join(extras)})" if extras else words


def _row_methods(protocol: str, row: str) -> list[tuple[str, dict]]:
    """The methods that serve a guide row: its own, and for fine-tuning's ``full`` then ``checkpointed`` (the same
    gradient in flat memory, which the fine-tuning comparison runs where memory forces it)."""
    method, options = guide_settings(protocol, row)
    if protocol == "weights" and method == "full":
        return [(method, options), ("checkpointed", options)]
    return [(method, options)]


def with_row_options(base: MethodOptions, options: dict) -> MethodOptions:
    """``base`` with a row's flag options, read as ``MethodFlags.method_options`` reads them
    (``adjoint_checkpoint_every`` 0 is None; ``adam_beta2`` b is ``betas`` (``base``'s first decay, b))."""
    fields = {**options}
    if "adjoint_checkpoint_every" in fields:
        fields["adjoint_checkpoint_every"] = fields["adjoint_checkpoint_every"] or None
    if "adam_beta2" in fields:
        fields["betas"] = (base.betas[0], fields.pop("adam_beta2"))
    return replace(base, **fields)


def _choice(job: Job, chosen: _Candidate, budget: int, considered: list[_Candidate]) -> Choice:
    """The ``Choice`` of ``chosen``, its reason naming the better-ranked candidates that did not fit."""
    fits = f"{chosen.parts.describe()} of the {_gib(budget)} budget"
    missed = [c for c in considered if c.parts is not None]
    if missed:
        needs = "; ".join(f"{c.words()} would need {_gib(c.parts.total)}" for c in missed)
        reason = f"{chosen.words()}: the best measured for {job.words()} that fits ({fits}); {needs}"
    else:
        reason = f"{chosen.words()}: the best measured at equal time for {job.words()} ({fits})"
    planned = {f"{c.row}:{c.method}": (None if c.parts is None else c.parts.total) for c in considered}
    return Choice(chosen.method, chosen.options, chosen.row, chosen.parts, budget, reason, planned)


def _gib(size: int) -> str:
    """``12.34 GiB``; below 0.1 GiB two significant digits (``0.00012 GiB``)."""
    value = size / GIB
    return f"{value:.2f} GiB" if value >= 0.1 else f"{value:.2g} GiB"


def profile_job(job: Job) -> tuple[CallProfile, CallProfile]:
    """One network call's and one reward's profile (``sdo.app.plan.profile_call``), traced under ``FakeTensorMode``
    with the job's modules: the latent requires a gradient unless weights are optimized, in which case every
    floating weight of the modules does for the trace (restored afterwards)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    weights = job.variable == "weights"
    parameters = [p for m in job.modules for p in m.parameters() if p.is_floating_point()] if weights else []
    flags = [p.requires_grad for p in parameters]
    mode = FakeTensorMode(allow_non_fake_inputs=True) if not job.latent.is_meta else None
    try:
        for parameter in parameters:
            parameter.requires_grad_(True)
        with mode or contextlib.nullcontext():
            fake = mode.from_tensor if mode is not None else lambda tensor: tensor.clone()
            x = fake(job.latent.detach()).requires_grad_(not weights)
            t = fake(torch.as_tensor(job.timestep).to(job.latent.device))
            network = profile_call(job.network, x, t)
            x0 = fake(job.latent.detach()).requires_grad_(True)
            reward = profile_call(job.reward, x0)
    finally:
        for parameter, flag in zip(parameters, flags, strict=True):
            parameter.requires_grad_(flag)
    return network, reward


def plan_activations(
    method: str, options: MethodOptions, job: Job, network: CallProfile, reward: CallProfile
) -> int | None:
    """The peak activation bytes of ``method`` on ``job`` (``sdo.app.plan.plan_any`` over the steps the job runs);
    None when it cannot be planned or does not fit the run (a depth above its steps)."""
    try:
        METHODS[method].check_fits(options, job.steps, job.start_step)
        plan = plan_any(method, options, job.steps - job.start_step, network, reward, 1)
    except ConfigError:
        return None
    return None if plan is None else plan.peak_activation_bytes


def resident_modules(*holders: object) -> list[torch.nn.Module]:
    """The modules a run keeps: each holder that is a module, the modules among its attributes, and a diffusers
    pipeline's components (``components``)."""
    found: list[torch.nn.Module] = []
    for holder in holders:
        if holder is None:
            continue
        if isinstance(holder, torch.nn.Module):
            found.append(holder)
            continue
        values = list(vars(holder).values()) + list(getattr(holder, "components", {}).values())
        found += [value for value in values if isinstance(value, torch.nn.Module)]
    return found


def trained_bytes(network: torch.nn.Module, lora_rank: int, lora_targets: str) -> int:
    """Bytes of the weights fine-tuning (or ``sdo bench --variable weights``) optimizes: LoRA's (rank ``lora_rank`` on
    ``lora_targets``, injected into a ``meta`` copy of ``network``, which stays as it is) or, with rank 0, every
    floating weight."""
    if not lora_rank:
        return sum(p.numel() * p.element_size() for p in network.parameters() if p.is_floating_point())
    from sdo.app.lora import add_lora, meta_copy

    copy = add_lora(meta_copy(network).requires_grad_(False), lora_rank, lora_targets)
    return sum(p.numel() * p.element_size() for p in copy.parameters() if p.requires_grad)


def optimize_job(config, task, resources) -> Job:
    """The job of a single ``sdo optimize`` run (``LatentTaskConfig``) on its built ``task`` and loaded
    ``resources``: the initial noise, a latent at ``start_step``, or a real image (``--image``/``--images``)."""
    target: Target = "image" if (config.image or config.images) else "noise" if not config.start_step else "latent"
    sampler = task.sampler
    return Job(
        target,
        config.steps,
        sampler.model_fn,
        lambda x0: task.reward(x0, None),
        task.latent,
        sampler.timesteps[config.start_step],
        modules=resident_modules(resources, getattr(resources, "pipeline", None)),
        start_step=config.start_step,
        device=config.device,
    )


def finetune_job(config, target, micro_batch: int) -> Job:
    """The job of ``sdo finetune`` (``FinetuneConfig``) on its loaded ``target`` (``ZooTarget``/``PipelineTarget``)
    for one micro-batch of ``micro_batch`` samples."""
    conditions, noise = target.draw(torch.Generator().manual_seed(config.seed), micro_batch)
    device = next(target.network.parameters()).device
    conditions = conditions.to(device) if isinstance(conditions, torch.Tensor) else conditions
    sampler = target.sampler(target.network, conditions)
    targets = config.lora_targets or target.lora_targets
    # a pipeline's reward reads its prompts by index: Python ints, since the fake trace cannot read tensor values
    scored = conditions.tolist() if hasattr(target, "parts") and isinstance(conditions, torch.Tensor) else conditions
    return Job(
        "weights",
        config.sample_steps,
        sampler.model_fn,
        lambda x0: target.reward(x0, scored),
        noise.to(device),
        sampler.timesteps[0],
        modules=resident_modules(target, getattr(target, "parts", None)),
        trainable=trained_bytes(target.network, config.lora_rank, targets),
        device=config.device,
    )


def applied(config, choice: Choice):
    """``config`` (a ``LatentTaskConfig`` or ``FinetuneConfig`` with ``method`` auto) running ``choice``: its method
    and options, no budget, and ``checkpoint_kept`` where the method has kept steps to recompute (it changes memory,
    not the result)."""
    chosen = replace(config, method=choice.method, memory_budget=None, checkpoint_kept=False, **choice.options)
    if config.checkpoint_kept and METHODS[choice.method].recomputes_kept(
        chosen.method_options(generator=torch.Generator())
    ):
        chosen = replace(chosen, checkpoint_kept=True)
    return chosen


def _probe(config):
    """``config`` with a plain method in place of auto: what loads the model and builds the task to plan on (every
    candidate optimizes through the same plain chain)."""
    return replace(config, method="sdo", memory_budget=None, checkpoint_kept=False)


def choose_for_optimize(config) -> tuple[object, Choice, dict]:
    """``sdo optimize --method auto``: load the run's model, build its task (on the plain chain, which every
    candidate optimizes through), choose (``choose``), and return the config that runs the choice, the choice, and
    ``{"resources", "task"}`` for ``sdo.app.optimization.optimize_and_write``."""
    from sdo.app.tasks.latent import build_task, load_resources

    probe = _probe(config)
    resources = load_resources(probe)
    task = build_task(probe, resources)
    hints = ["--checkpoint-kept", *(["--checkpoint-decoder"] if config.pipeline else []), "a smaller --batch"]
    budget = budget_bytes(config.memory_budget, config.device)
    choice = choose(optimize_job(config, task, resources), budget, config.method_options(), hints=hints)
    return applied(config, choice), choice, {"resources": resources, "task": task}


def recorded_choice(out: str | Path) -> Choice | None:
    """The choice ``out/config.json`` recorded for a run of ``--method auto`` (None: no such record)."""
    from sdo.io import load_json

    path = Path(out) / "config.json"
    if not path.is_file():
        return None
    config = load_json(path).get("config", {})
    if config.get("method") != AUTO or "auto" not in config:
        return None
    return Choice.from_record(config["auto"])


def choose_for_finetune(config, data, accelerator) -> tuple[Choice, object]:
    """``sdo finetune --method auto``: the choice ``config.out`` recorded (a resume keeps it), else the planner's on
    the loaded target for one micro-batch (``batch_size / (processes x grad_accum)``), made on the main process and
    shared with the others; the main process prints it. Returns the choice and the target (loaded here when
    planned, None when resumed)."""
    choice, target = recorded_choice(config.out), None
    resumed = choice is not None
    if choice is None:
        probe = _probe(config)
        target = data.target(probe, accelerator.device)
        record = None
        if accelerator.is_main_process:
            micro = config.batch_size // (accelerator.num_processes * config.grad_accum)
            hints = ["--checkpoint-kept", "a smaller --batch-size (or a larger --grad-accum)", "a lower --lora-rank"]
            budget = budget_bytes(config.memory_budget, config.device)
            options = config.method_options(torch.Generator())
            try:
                job = finetune_job(config, target, micro)
                record = choose(job, budget, options, replays_only=False, hints=hints).record()
            except ConfigError as error:  # the others learn of it, instead of waiting for a choice
                record = {"error": str(error), "budget": isinstance(error, BudgetError)}
                if accelerator.num_processes == 1:
                    raise
        record = _shared(record, accelerator)
        if "error" in record:
            raise (BudgetError if record["budget"] else ConfigError)(record["error"])
        choice = Choice.from_record(record)
    if accelerator.is_main_process:
        print(f"{choice.line()}{' (recorded: resuming)' if resumed else ''}")
    return choice, target


def _shared(record: dict | None, accelerator) -> dict:
    """The main process's ``record`` on every process of ``accelerator``."""
    if accelerator.num_processes == 1:
        return record
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([record])[0]


def choose_for_bench(config, workload, steps: int) -> Choice:
    """``sdo bench --methods auto``: the choice for ``workload`` (``sdo.app.tasks.bench.Workload``) at ``steps``,
    optimizing the initial noise or (``--variable weights``) every weight of the network."""
    sampler = workload.make_sampler(steps, workload.model)
    weights = config.variable == "weights"
    job = Job(
        "weights" if weights else "noise",
        steps,
        sampler.model_fn,
        lambda x0: workload.reward(x0, None),
        workload.latent,
        sampler.timesteps[0],
        modules=resident_modules(workload.model, workload.reward, *workload.others),
        trainable=trained_bytes(workload.model, 0, "") if weights else 0,
        device=config.device,
    )
    hints = ["--checkpoint-kept", *(["--checkpoint-decoder"] if config.model == "sd15" else []), "a smaller --batch"]
    budget = budget_bytes(config.memory_budget, config.device)
    return choose(job, budget, config.method_options(), replays_only=not weights, hints=hints)
