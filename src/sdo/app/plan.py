"""``sdo bench --plan``: activation memory and relative time per iteration, predicted without running the work.

The prediction traces *one* network call and *one* reward evaluation (decoder included) on PyTorch's ``meta``
device - shapes and dtypes only, no weights, no arithmetic, no memory - built from the workload's model config,
resolution and batch. The trace gives, per call:

- ``A``: bytes autograd saves for backward (distinct storages, parameters and their views excluded: what
  ``sdo.memory.PeakMemory`` counts on CPU), with the same ``requires_grad`` pattern as the real run (the latent,
  or the weights);
- ``F`` and ``B``: forward and backward FLOPs (``torch.utils.flop_counter``: matmuls, convolutions, attention);
- ``X``: bytes of the latent a step takes.

The gradient mode's roles (``sdo.gradients``) for ``n`` steps then compose them. With ``f`` steps of role FULL,
``c`` of role CHECKPOINT, and the reward's ``A_r, F_r, B_r``:

    saved activations (the CPU figure)  = f A + A_r
    peak activations                    = f A + c X + max(A_r, [c > 0] A)   (a checkpointed step's activations
                                          are alive only while it is recomputed, after the reward's backward; with
                                          a checkpointed decoder, A_r is its rematerialized size)
    FLOPs per iteration                 = n F + f B + c (F + B) + F_r + B_r     (nograd: n F + F_r)
    relative time                       = FLOPs / FLOPs(nograd)

so ``sdo`` costs one step's activations whatever ``n`` is, ``full`` grows as ``n A``, and ``checkpointed`` costs
``n X + A`` at about ``(2F + B) / F`` times the no-grad compute. ``alignprop`` and ``random-truncation`` (their
graphed steps checkpointed, as in the official code) have their peak at their largest draw (every step graphed;
the largest depth) and their time at the mean one (n / 2 graphed steps; the mean depth). The solver update saves only
scalars (DDIM) and is neglected; so are the FLOPs of elementwise operations, which is why the time ratios are a
floor on small models, where per-call overhead dominates (the embedded model on CPU). On CUDA the allocator's peak
adds the transient workspace of one call and the weights' gradients and optimizer state (``--variable weights``,
given separately).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from sdo.app.bench import BenchConfig, build_workload
from sdo.app.bench import workload_dtype as plan_dtype
from sdo.app.method_flags import AUTO
from sdo.app.report import markdown_table, mebibytes
from sdo.gradients import AlignProp, GradientMode, LoopMode, RandomTruncation, StepRole, Truncated
from sdo.memory import is_parameter

__all__ = [
    "CallProfile",
    "MethodPlan",
    "format_plan",
    "plan_any",
    "plan_bench",
    "plan_dtype",
    "plan_loop_method",
    "plan_method",
    "profile_call",
]


@dataclass(frozen=True)
class CallProfile:
    """One traced call: saved bytes ``A``, forward and backward FLOPs ``F``, ``B``, and its input's bytes ``X``."""

    saved_bytes: int
    forward_flops: int
    backward_flops: int
    input_bytes: int
    peak_bytes: int | None = None  # when recomputed in backward: the activations alive then (else saved_bytes)

    @property
    def peak(self) -> int:
        return self.saved_bytes if self.peak_bytes is None else self.peak_bytes


@dataclass(frozen=True)
class MethodPlan:
    """The prediction for one method at one number of steps (see the module docstring for the formulas)."""

    method: str
    steps: int
    saved_bytes: int
    peak_activation_bytes: int
    flops: int
    relative_time: float
    param_bytes: int
    grad_and_optimizer_bytes: int


def profile_call(fn: Callable[..., torch.Tensor], x: torch.Tensor, *args: object) -> CallProfile:
    """Trace ``fn(x, *args)`` with grad enabled (on meta tensors nothing is computed), then its backward.

    Memory: the distinct storages autograd saves (parameters and their views excluded), with attention as PyTorch's
    fused kernels run it on CPU and CUDA (flash / memory-efficient: query, key, value, output and log-sum-exp saved, no
    attention matrix; on the meta device ``scaled_dot_product_attention`` would otherwise take the unfused path).
    FLOPs: ``torch.utils.flop_counter`` over the forward and the backward (attention counted as its matmuls).
    """
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if not is_parameter(tensor):  # the rule sdo.memory.PeakMemory counts by
            storage = tensor.untyped_storage()
            storages[storage._cdata] = storage.nbytes()
        return tensor

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), _FusedAttention():
        fn(x, *args)
    counter = FlopCounterMode(display=False)
    with torch.enable_grad(), counter:
        out = fn(x, *args)
    forward = counter.get_total_flops()
    backward = 0
    if out.requires_grad:
        with counter:
            out.float().sum().backward()
        backward = counter.get_total_flops()
    return CallProfile(sum(storages.values()), forward, backward, x.numel() * x.element_size())


class _FusedAttention(TorchFunctionMode):
    """Routes ``scaled_dot_product_attention`` without a mask to the fused flash kernel (whose memory the real run
    has: the CPU kernel here, which saves what CUDA's flash and memory-efficient kernels save)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and len(args) == 3 and kwargs.get("attn_mask") is None:
            query, key, value = args
            dropout, causal = kwargs.get("dropout_p", 0.0), kwargs.get("is_causal", False)
            fused = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
            return fused(query, key, value, dropout, causal, scale=kwargs.get("scale"))[0]
        return func(*args, **kwargs)


def plan_method(
    name: str, mode: GradientMode, steps: int, network: CallProfile, reward: CallProfile, nograd_flops: int
) -> MethodPlan:
    """Compose one network call's and one reward's profiles along ``mode``'s step roles (module docstring)."""
    roles, mean_depth = _peak_roles(mode, steps)
    full, checkpoint = roles.count(StepRole.FULL), roles.count(StepRole.CHECKPOINT)
    learns = full + checkpoint > 0 or StepRole.SHORTCUT in roles
    time_full = mean_depth if mean_depth is not None and full else full
    time_checkpoint = mean_depth if mean_depth is not None and checkpoint else checkpoint
    saved = full * network.saved_bytes + (reward.saved_bytes if learns else 0)
    # Rematerialized activations (a checkpointed step, a checkpointed decoder) are alive one at a time, in backward.
    rematerialized = max(reward.peak, network.saved_bytes if checkpoint else 0) if learns else 0
    peak = full * network.saved_bytes + checkpoint * network.input_bytes + rematerialized
    flops = steps * network.forward_flops + reward.forward_flops
    if learns:
        flops += time_full * network.backward_flops + reward.backward_flops
        flops += time_checkpoint * (network.forward_flops + network.backward_flops)
    return MethodPlan(name, steps, saved, peak, int(flops), flops / nograd_flops if nograd_flops else 0.0, 0, 0)


def plan_loop_method(
    name: str, kind: str, options, steps: int, network: CallProfile, reward: CallProfile, nograd_flops: int
) -> MethodPlan | None:
    """The plan of a method that owns its loop instead of giving each step a role (``kind`` its runner's, see
    ``sdo.methods.Runner``); None for one not modelled. With ``A, X, F, B`` one network call's and ``A_r, F_r, B_r``
    the reward's (``A_r`` its peak):

    - ``adjoint`` (AdjointDPM, the discrete adjoint): a no-grad forward, then the reward's backward, then one step's
      graph at a time at reconstructed states: saved ``max(A_r, A)``, peak that plus ``(s + 2) X`` for the ``s =
      ceil(n / k)`` states ``adjoint_checkpoint_every = k`` stores; FLOPs ``n F + F_r + B_r + n ((1 + j) F + F + B)``
      with ``j = adjoint_iters`` refinements per reconstruction;
    - DOODL (``kind`` "doodl": the coupled EDICT pair, two calls per step, exact inversion in backward): saved
      ``max(A_r, 2 A)``, peak that plus ``4 X``; FLOPs ``2 n F + F_r + B_r + n (4 F + 2 B)``;
    - FreeDoM (``kind`` "guidance": a reward gradient at each step's x0 prediction, one step's graph at a time):
      saved ``A + A_r``, peak that plus ``X``; FLOPs ``n (F + B + F_r + B_r)`` (time travel's repeats left out).
    """
    a, x, f, b = network.saved_bytes, network.input_bytes, network.forward_flops, network.backward_flops
    a_r, f_r, b_r = reward.peak, reward.forward_flops, reward.backward_flops
    if name == "adjoint":
        every = options.adjoint_checkpoint_every
        stored = math.ceil(steps / every) if every else 0
        saved, peak = max(a_r, a), max(a_r, a) + (stored + 2) * x
        flops = steps * f + f_r + b_r + steps * ((1 + options.adjoint_iters) * f + f + b)
    elif kind == "doodl":
        saved, peak = max(a_r, 2 * a), max(a_r, 2 * a) + 4 * x
        flops = 2 * steps * f + f_r + b_r + steps * (4 * f + 2 * b)
    elif kind == "guidance":
        saved, peak = a + a_r, a + a_r + x
        flops = steps * (f + b + f_r + b_r)
    else:
        return None
    return MethodPlan(name, steps, saved, peak, int(flops), flops / nograd_flops if nograd_flops else 0.0, 0, 0)


def plan_any(
    name: str, options, steps: int, network: CallProfile, reward: CallProfile, nograd_flops: int
) -> MethodPlan | None:
    """The plan of registry method ``name`` with ``options``: ``plan_method`` along its gradient mode's step roles,
    or ``plan_loop_method`` for a method that owns its loop; None when neither models it."""
    from sdo.methods import METHODS

    method = METHODS[name]
    mode = method.mode(options) if method.build is not None else None
    if mode is not None and not isinstance(mode, LoopMode):
        try:
            return plan_method(name, mode, steps, network, reward, nograd_flops)
        except NotImplementedError:  # a mode without step roles (e.g. reversible solvers): not modelled
            return None
    return plan_loop_method(name, method.runner.kind, options, steps, network, reward, nograd_flops)


def _peak_roles(mode: GradientMode, steps: int) -> tuple[list[StepRole], float | None]:
    """The roles of ``mode``'s largest draw on ``steps`` steps (its peak memory) and, for a random mode, its mean
    number of graphed steps (its time): ``random-truncation`` draws k in [low, high], mean (low + high) / 2;
    ``alignprop`` graphs step i with probability (i + 1) / (n + 1), all n at most, sum (i + 1) / (n + 1) = n / 2 on
    average."""
    if isinstance(mode, RandomTruncation):
        return Truncated(mode.high, checkpoint=mode.checkpoint).roles(0, steps), (mode.low + mode.high) / 2
    if isinstance(mode, AlignProp):
        return [StepRole.CHECKPOINT if mode.checkpoint else StepRole.FULL] * steps, steps / 2
    return mode.roles(0, steps), None


@dataclass(frozen=True)
class _MetaWorkload:
    """A workload's network call and reward on meta tensors, and the weights trained with ``--variable weights``."""

    network: Callable[..., torch.Tensor]
    reward: Callable[[torch.Tensor], torch.Tensor]
    reward_as_run: Callable[[torch.Tensor], torch.Tensor]  # with the decoder checkpointed, if the config says so
    latent: torch.Tensor
    timestep: torch.Tensor
    model: torch.nn.Module


def _meta_workload(config: BenchConfig, dtype: torch.dtype | None = None) -> _MetaWorkload:
    """The benchmark's workload (``sdo.app.bench.build_workload``) on the meta device (SD-1.5 in ``dtype``, default
    ``plan_dtype(config)``): its network call, its reward without and as run (the decoder checkpointed when the
    config says so), its latent; nothing touches ``config.device``."""
    workload = build_workload(config, "meta", dtype)
    plain = (
        build_workload(replace(config, checkpoint_decoder=False), "meta", dtype)
        if config.checkpoint_decoder
        else workload
    )
    reward = lambda x0: plain.reward(x0, None)  # noqa: E731
    as_run = (lambda x0: workload.reward(x0, None)) if config.checkpoint_decoder else reward
    network = workload.make_sampler(1, workload.model).model_fn
    return _MetaWorkload(network, reward, as_run, workload.latent, torch.tensor(500, device="meta"), workload.model)


def plan_bench(config: BenchConfig, dtype: torch.dtype | None = None) -> dict:
    """Predict, for every method and number of steps of ``config``, the activation memory and relative time of
    one iteration (nothing runs: see the module docstring). Everything is traced on the meta device, so
    ``config.device`` need not exist on this machine (a CUDA plan on a CPU-only one); it only sets the SD-1.5
    dtype (``plan_dtype``) unless ``dtype`` is given. Returns ``{"config", "profiles", "rows"}``."""
    workload = _meta_workload(config, dtype)
    weights = config.variable == "weights"
    if weights:
        workload.model.requires_grad_(True)
    x = workload.latent.clone().requires_grad_(not weights)
    network = profile_call(workload.network, x, workload.timestep)
    reward = profile_call(workload.reward, workload.latent.clone().requires_grad_(True))
    if workload.reward_as_run is not workload.reward:  # checkpointed decoder: saves little, recomputes in backward
        recomputed = profile_call(workload.reward_as_run, workload.latent.clone().requires_grad_(True))
        reward = CallProfile(
            recomputed.saved_bytes,
            reward.forward_flops,
            reward.backward_flops + reward.forward_flops,
            reward.input_bytes,
            peak_bytes=reward.saved_bytes + recomputed.saved_bytes,
        )
    param_bytes = sum(p.numel() * p.element_size() for p in workload.model.parameters())
    rows = []
    for steps in config.step_counts:
        nograd_flops = steps * network.forward_flops + reward.forward_flops
        for name in config.method_names:
            options = config.method_options(generator=torch.Generator().manual_seed(config.seed))
            label = name
            if name == AUTO:  # the method --method auto would choose here, planned like the others
                name, options = _auto_choice(config, dtype, steps, options)
                label = f"{AUTO} ({name})"
            plan = plan_any(name, options, steps, network, reward, nograd_flops)
            if plan is None:
                continue
            plan = replace(plan, method=label)
            trained = param_bytes if weights and plan.saved_bytes else 0
            rows.append(asdict(plan) | {"param_bytes": param_bytes, "grad_and_optimizer_bytes": 3 * trained})
    return {
        "config": asdict(config),
        "profiles": {"network": asdict(network), "reward": asdict(reward)},
        "rows": rows,
    }


def _auto_choice(config: BenchConfig, dtype: torch.dtype | None, steps: int, options) -> tuple[str, object]:
    """``(method, options)`` that ``sdo.app.auto`` chooses for ``config``'s workload (on the meta device) at
    ``steps``."""
    from sdo.app.auto import choose_for_bench, with_row_options

    choice = choose_for_bench(config, build_workload(config, "meta", dtype), steps)
    return choice.method, with_row_options(options, choice.options)


def format_plan(plan: dict) -> str:
    """Markdown table of a plan."""
    headers = (
        "steps",
        "method",
        "predicted peak activations",
        "saved activations (CPU figure)",
        "GFLOP / iter",
        "time vs nograd",
        "weights: grads + Adam",
    )
    rows = [
        [
            r["steps"],
            r["method"],
            mebibytes(r["peak_activation_bytes"]),
            mebibytes(r["saved_bytes"]),
            f"{r['flops'] / 1e9:.1f}",
            f"{r['relative_time']:.2f}x",
            mebibytes(r["grad_and_optimizer_bytes"]),
        ]
        for r in plan["rows"]
    ]
    return markdown_table(headers, rows)
