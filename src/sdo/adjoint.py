"""Adjoint backpropagation through a deterministic sampler (AdjointDPM; Pan et al., ICLR 2024, arXiv 2307.10711).

Notation (``sdo.gradients``): a deterministic solver step is affine in the state and the network output,

    x_{i+1} = S_i(x_i) = a_i x_i + b_i f_i(x_i),    f_i(x) = model_fn(scale_model_input(x, t_i), t_i),

for DDIM with eta 0 (``a_i = sqrt(ab_{i+1} / ab_i)``, Song et al. 2021, Eq. 12), Euler and FlowMatch Euler
(``a_i = 1``, ``b_i = sigma_{i+1} - sigma_i``). The forward pass runs the steps under ``torch.no_grad()`` and keeps
only the final latent. The backward pass walks the steps in reverse. At step i it

1. reconstructs ``x_i`` from ``x_{i+1}`` by running the solver backward: the DDIM inversion step (the network
   evaluated at the later state), ``x_i^(0) = (x_{i+1} - b_i f_i(x_{i+1})) / a_i``, refined by ``n`` fixed-point
   iterations of ``x_i <- (x_{i+1} - b_i f_i(x_i)) / a_i`` (whose fixed point is the exact ``x_i``, the map
   contracting when ``|b_i / a_i| Lip(f_i) < 1``, i.e. for enough steps);
2. recomputes ``S_i`` at the reconstructed state with a graph and takes one vector-Jacobian product:
   ``g_i = (dS_i/dx_i)^T g_{i+1}`` and ``dL/dtheta += (dS_i/dtheta)^T g_{i+1}`` for every differentiated tensor.

This is the discrete adjoint of the solver: with exact reconstruction it equals ``sdo.Full()``'s gradient; the
gradient error is the reconstruction error (reported on ``Adjoint.stats``). Memory is flat in the number of steps
(one step's activations, plus the input and output latents); compute is about ``3 + fixed_point_iters`` network
calls per step (one forward, ``1 + fixed_point_iters`` reconstruction calls, one call with its backward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler
from torch.autograd.function import once_differentiable

from . import schedulers as sched
from .errors import ConfigError
from .gradients import LoopMode

__all__ = ["Adjoint", "AdjointStats", "check_deterministic_solver"]


@dataclass
class AdjointStats:
    """What the last backward pass of an ``Adjoint`` run measured (NaN before any backward).

    Attributes:
        reconstruction_error: ``max_b ||x_hat_start - x_start|| / ||x_start||``, the relative error of the start
            latent reconstructed at the end of the backward walk (every step's reconstruction error, accumulated).
        max_residual: ``max_{i, b} ||S_i(x_hat_i) - x_{i+1}|| / ||x_{i+1}||``, the worst per-step residual of the
            reconstruction (0 for an exact inverse).
        steps: number of steps walked; network_calls: network evaluations of the last forward + backward;
        tensors: number of tensors differentiated besides the latent (parameters, conditioning).
    """

    reconstruction_error: float = math.nan
    max_residual: float = math.nan
    steps: int = 0
    network_calls: int = 0
    tensors: int = 0


@dataclass(frozen=True)
class Adjoint(LoopMode):
    """AdjointDPM (Pan et al., ICLR 2024, arXiv 2307.10711): backward by solving the sampler backward in time.

    Forward: plain no-grad sampling; only the final latent is kept. Backward: for ``i = stop - 1, ..., start``,
    reconstruct ``x_i`` by the inverse solver step refined by ``fixed_point_iters`` fixed-point iterations, then one
    VJP through the recomputed step (see the module docstring for the formulas). Detached: nothing is detached in
    the math; nothing is stored but the input and output latents. Randomness: none (deterministic solvers only:
    ``DDIMScheduler`` with eta 0 and without sample clipping or thresholding, ``EulerDiscreteScheduler``,
    ``FlowMatchEulerDiscreteScheduler`` without stochastic sampling; anything else is a ``ConfigError``).

    The gradient reaches the latent and every tensor in ``params``. When ``params`` is None (the default), they are
    discovered from the autograd graph of one network call at the first step: every leaf tensor that requires grad
    and that ``model_fn`` uses (the network's trainable parameters, conditioning leaves such as optimized
    embeddings, and the leaves upstream of a non-leaf conditioning tensor). Pass ``params`` to choose them exactly,
    e.g. to receive ``torch.autograd.grad`` with respect to a non-leaf conditioning tensor; tensors in it that do
    not require grad are ignored. Double backward is not supported.

    Args:
        fixed_point_iters (`int`, defaults to 0): refinements of each reconstruction; 0 is the plain DDIM-inversion
            (or backward-Euler) reconstruction. The reconstruction error, and with it the gradient error, shrinks
            geometrically with it; each one costs a network call per step.
        params: the tensors (besides the latent) to differentiate, or None to discover them.
        stats: filled by every backward pass (``AdjointStats``); read ``mode.stats`` after ``loss.backward()``.
    """

    fixed_point_iters: int = 0
    params: tuple[torch.Tensor, ...] | None = field(default=None, compare=False, repr=False)
    stats: AdjointStats = field(default_factory=AdjointStats, compare=False, repr=False)

    def __post_init__(self) -> None:
        iters = self.fixed_point_iters
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
            raise ConfigError(f"`fixed_point_iters` must be an integer >= 0, got {iters!r}.")
        if self.params is not None:
            params = tuple(self.params)
            if not all(torch.is_tensor(p) for p in params):
                raise ConfigError(
                    "`params` must be a sequence of tensors (the tensors model_fn uses to differentiate)."
                )
            object.__setattr__(self, "params", params)

    def run(self, sampler, x: torch.Tensor, start: int, stop: int, generator: torch.Generator | None) -> torch.Tensor:
        check_deterministic_solver(sampler, "sdo.Adjoint")
        steps = _Steps(sampler, x)
        if not torch.is_grad_enabled():
            return steps.run(x, start, stop)
        first = None
        if self.params is not None:
            params = tuple(p for p in self.params if p.requires_grad)
        else:
            with torch.enable_grad():
                probe = steps.network(start, x.detach())
            params, first = _leaves(probe), probe.detach()
            del probe
        if not x.requires_grad and not params:
            return steps.run(x, start, stop, first)
        walk = _Walk(steps, start, stop, self.fixed_point_iters, self.stats, params, first)
        return _AdjointFunction.apply(walk, x, *params)


def check_deterministic_solver(sampler, who: str) -> None:
    """Raise ``ConfigError`` unless ``sampler`` runs a deterministic, invertible, affine solver step."""
    scheduler = sampler.scheduler
    if isinstance(scheduler, DDIMScheduler):
        if sampler.eta != 0:
            raise ConfigError(f"{who} needs a deterministic sampler: DDIM with eta=0, got eta={sampler.eta}.")
        if scheduler.config.clip_sample or scheduler.config.thresholding:
            raise ConfigError(
                f"{who} needs a DDIMScheduler with clip_sample=False and thresholding=False (a clipped step cannot "
                "be run backward)."
            )
    elif isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        if scheduler.config.stochastic_sampling:
            raise ConfigError(f"{who} needs FlowMatchEulerDiscreteScheduler with stochastic_sampling=False.")
    elif type(scheduler) is not EulerDiscreteScheduler:
        raise ConfigError(
            f"{who} supports the deterministic solvers DDIMScheduler (eta=0), EulerDiscreteScheduler and "
            f"FlowMatchEulerDiscreteScheduler; got {type(scheduler).__name__}."
        )


class _Steps:
    """The sampler's step ``i`` as a function of ``x``, callable at any index in any order.

    Euler and FlowMatch read their step index from the scheduler: it is set before every call, so a step
    recomputed in backward uses the same sigma as in forward.
    """

    def __init__(self, sampler, like: torch.Tensor) -> None:
        self.model_fn = sampler.model_fn
        self.scheduler = sampler.fresh_scheduler(like.device)
        if hasattr(self.scheduler, "is_scale_input_called"):
            self.scheduler.is_scale_input_called = True  # scale_model_input is applied in network()
        self.timesteps = self.scheduler.timesteps
        self.network_calls = 0

    def _at(self, index: int) -> None:
        if hasattr(self.scheduler, "_step_index"):
            self.scheduler._step_index = index

    def network(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """``f_i(x) = model_fn(scale_model_input(x, t_i), t_i)``."""
        t = self.timesteps[index]
        self._at(index)
        self.network_calls += 1
        return self.model_fn(sched.scale_model_input(self.scheduler, x, t), t)

    def update(self, index: int, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """The solver update ``a_i x + b_i output`` (``scheduler.step``)."""
        self._at(index)
        return self.scheduler.step(output, self.timesteps[index], x).prev_sample

    def __call__(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return self.update(index, x, self.network(index, x))

    def slope(self, index: int, like: torch.Tensor) -> float:
        """``a_i``, read off the scheduler's own update with a unit state and a zero network output."""
        one = torch.ones(1, dtype=like.dtype, device=like.device)
        value = float(self.update(index, one, torch.zeros_like(one)))
        if not math.isfinite(value) or value == 0:
            raise ConfigError(f"step {index} of the schedule cannot be inverted (its state coefficient is {value}).")
        return value

    @torch.no_grad()
    def run(self, x: torch.Tensor, start: int, stop: int, first: torch.Tensor | None = None) -> torch.Tensor:
        """Plain no-grad sampling (``first``: the network output at ``start``, if already computed)."""
        for index in range(start, stop):
            output = first if index == start and first is not None else self.network(index, x)
            x = self.update(index, x, output)
        return x

    @torch.no_grad()
    def invert(self, index: int, x_next: torch.Tensor, iters: int) -> torch.Tensor:
        """``x_i`` from ``x_{i+1}``: the inverse step, then ``iters`` fixed-point refinements (module docstring)."""
        a = self.slope(index, x_next)
        x = x_next
        for _ in range(1 + iters):  # the first pass, from x = x_{i+1}, is the DDIM inversion step
            x = x - (self(index, x) - x_next) / a
        return x


def _leaves(output: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The leaf tensors requiring grad that ``output``'s autograd graph reaches (in a stable order)."""
    leaves, seen, stack = {}, set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if torch.is_tensor(variable):
            leaves.setdefault(id(variable), variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return tuple(leaves.values())


def _relative(error: torch.Tensor, reference: torch.Tensor) -> float:
    """``max_b ||error_b|| / ||reference_b||``."""
    return float((error.flatten(1).norm(dim=1) / reference.flatten(1).norm(dim=1).clamp_min(1e-30)).max())


class _Walk:
    """One adjoint run: the forward no-grad pass and the reverse walk of the backward pass."""

    def __init__(self, steps: _Steps, start, stop, iters, stats: AdjointStats, params, first) -> None:
        self.steps, self.start, self.stop, self.iters = steps, start, stop, iters
        self.stats, self.params, self.first = stats, params, first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.steps.network_calls = 0
        out = self.steps.run(x, self.start, self.stop, self.first)
        self.first = None
        return out

    def backward(self, x_start: torch.Tensor, x_final: torch.Tensor, grad: torch.Tensor):
        param_grads: list[torch.Tensor | None] = [None] * len(self.params)
        x_next, residual = x_final, 0.0
        for index in reversed(range(self.start, self.stop)):
            x_i = self.steps.invert(index, x_next, self.iters)
            with torch.enable_grad():
                x_in = x_i.detach().requires_grad_(True)
                out = self.steps(index, x_in)
                grads = torch.autograd.grad(
                    out, (x_in, *self.params), grad, allow_unused=True, retain_graph=bool(self.params)
                )
            residual = max(residual, _relative(out.detach() - x_next, x_next))
            del out
            grad = grads[0]
            for k, g in enumerate(grads[1:]):
                if g is not None:
                    param_grads[k] = g if param_grads[k] is None else param_grads[k] + g
            x_next = x_i
        self.stats.reconstruction_error = _relative(x_next - x_start, x_start)
        self.stats.max_residual = residual
        self.stats.steps = self.stop - self.start
        self.stats.network_calls = self.steps.network_calls
        self.stats.tensors = len(self.params)
        return grad, param_grads


class _AdjointFunction(torch.autograd.Function):
    """``x_final = sample(x)`` as one autograd node over ``(x, *params)``; backward is the adjoint walk."""

    @staticmethod
    def forward(ctx, walk: _Walk, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        x_final = walk.forward(x)
        ctx.walk = walk
        ctx.save_for_backward(x, x_final)
        return x_final

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x_start, x_final = ctx.saved_tensors
        grad_x, param_grads = ctx.walk.backward(x_start, x_final, grad)
        return None, grad_x if ctx.needs_input_grad[1] else None, *param_grads
