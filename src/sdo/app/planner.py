"""The memory and FLOP model behind ``sdo bench --plan`` and ``--method auto``: trace one network call and one reward,
then compose them along a method's steps (the formulas are in ``sdo.app.plan``'s docstring and ``plan_loop_method``).

It imports no workload or command, so that both the benchmark's plan (``sdo.app.plan``) and the chooser
(``sdo.app.auto``) build on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from sdo.gradients import AlignProp, GradientMode, LoopMode, RandomTruncation, StepRole, Truncated
from sdo.memory import is_parameter

__all__ = [
    "CallProfile",
    "MethodPlan",
    "plan_any",
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
