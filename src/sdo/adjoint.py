"""Discrete adjoint of a deterministic sampler (AdjointDPM; Pan et al., ICLR 2024, arXiv 2307.10711).

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

This is the discrete adjoint of the solver (the adjoint of its discrete steps, not of the continuous ODE): with exact
reconstruction it equals ``sdo.Full()``'s gradient; the gradient error is the reconstruction error (reported on
``Adjoint.stats``). Memory is flat in the number of steps (one step's activations, plus the input and output
latents); compute is about ``3 + fixed_point_iters`` network calls per step (one forward, ``1 + fixed_point_iters``
reconstruction calls, one call with its backward).

The reconstruction errors of the steps accumulate along the walk (the drift): the state rebuilt at step i carries
the error of ``stop - 1 - i`` inversions. ``checkpoint_every=k`` bounds it: the forward pass stores ``x_start,
x_{start+k}, x_{start+2k}, ...`` and the backward pass uses a stored state where it has one and rebuilds the states
between two stored ones from the later one only, so that each rebuilt state carries the drift of at most ``k - 1``
inversions. Memory: ``ceil(n / k) + 1`` latents for ``n`` steps plus one step's activations, i.e. O(n / k); compute:
per segment of ``L >= 2`` steps, ``L - 1`` reconstructions and one more of the segment's stored start, compared with
it to measure the segment's drift (``AdjointStats.segment_errors``), so at most ``3 + fixed_point_iters`` calls per
step as without stored states, and 2 per step for ``k = 1``, which rebuilds nothing and is ``sdo.Full()``'s gradient
(the VJPs of ``sdo.Checkpointed()`` with one segment per step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from . import schedulers as sched
from ._autograd import AdjointStats, ReverseWalkMode
from .errors import ConfigError

__all__ = ["Adjoint", "AdjointStats", "SolverSteps", "check_deterministic_solver"]


@dataclass(frozen=True)
class Adjoint(ReverseWalkMode):
    """The discrete adjoint of the sampler (AdjointDPM; Pan et al., ICLR 2024, arXiv 2307.10711): backward by
    solving the sampler backward in time.

    Forward: plain no-grad sampling; only the final latent is kept (and every ``checkpoint_every``-th state).
    Backward: for ``i = stop - 1, ..., start``, take the stored ``x_i`` or reconstruct it from ``x_{i+1}`` by the
    inverse solver step refined by ``fixed_point_iters`` fixed-point iterations, then one VJP through the
    recomputed step (see the module docstring for the formulas). Detached: nothing is detached in the math; nothing
    is stored but the input and output latents and the ``checkpoint_every``-th states. Randomness: none
    (deterministic solvers only: ``DDIMScheduler`` with eta 0 and without sample clipping or thresholding,
    ``EulerDiscreteScheduler``, ``FlowMatchEulerDiscreteScheduler`` without stochastic sampling; anything else is a
    ``ConfigError``).

    The gradient reaches the latent and every tensor in ``params``. When ``params`` is None (the default), they are
    discovered from the autograd graph of one network call at the first step: every leaf tensor that requires grad
    and that ``model_fn`` uses (the network's trainable parameters, conditioning leaves such as optimized
    embeddings, and the leaves upstream of a non-leaf conditioning tensor). Pass ``params`` to choose them exactly,
    e.g. to receive ``torch.autograd.grad`` with respect to a non-leaf conditioning tensor; tensors in it that do
    not require grad are ignored. Double backward is not supported. The reverse walk is the one ``sdo.Invertible``
    also runs (``sdo._autograd``); this mode supplies the fixed-point reconstruction.

    Args:
        fixed_point_iters (`int`, defaults to 0): refinements of each reconstruction; 0 is the plain DDIM-inversion
            (or backward-Euler) reconstruction. The reconstruction error, and with it the gradient error, shrinks
            geometrically with it; each one costs a network call per step.
        checkpoint_every (`int`, *optional*): store the states entering steps ``start, start + k, ...`` in forward
            and rebuild only the states between two stored ones, from the later one: memory O(n / k) latents, the
            drift of each rebuilt state that of at most ``k - 1`` inversions. None (default) stores no state and
            rebuilds every one from the final latent; 1 rebuilds none (``sdo.Full()``'s gradient).
        params: the tensors (besides the latent) to differentiate, or None to discover them.
        stats: filled by every backward pass (``AdjointStats``); read ``mode.stats`` after ``loss.backward()``.
            An instance holds its own record, so an ``Adjoint`` is never a default argument value.
    """

    fixed_point_iters: int = 0
    checkpoint_every: int | None = None
    params: tuple[torch.Tensor, ...] | None = field(default=None, compare=False, repr=False)
    stats: AdjointStats = field(default_factory=AdjointStats, compare=False, repr=False)

    def __post_init__(self) -> None:
        iters = self.fixed_point_iters
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
            raise ConfigError(f"`fixed_point_iters` must be an integer >= 0, got {iters!r}.")
        every = self.checkpoint_every
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ConfigError(f"`checkpoint_every` must be None or an integer >= 1 (steps), got {every!r}.")
        super().__post_init__()

    def run(self, sampler, x: torch.Tensor, start: int, stop: int, generator: torch.Generator | None) -> torch.Tensor:
        check_deterministic_solver(sampler, "sdo.Adjoint")
        steps = _FixedPointSteps(sampler, x, self.fixed_point_iters)
        return self.walk(steps, (x,), start, stop, self.checkpoint_every)[0]


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


class SolverSteps:
    """A deterministic sampler's step ``i`` as a function of the state, callable at any index in any order.

    ``S_i(u, e) = a_i u + b_i e``: ``network(i, x)`` is ``f_i(x) = model_fn(scale_model_input(x, t_i), t_i)``,
    ``update(i, u, e)`` the solver update (the scheduler's own ``step``), ``coefficients(i)`` the pair
    ``(a_i, b_i)``. Euler and FlowMatch read their step index from the scheduler: it is set before every call, so a
    step recomputed in backward uses the same sigma as in forward. ``network_calls`` counts the network calls.

    Args:
        sampler: an ``sdo.Sampler`` with a deterministic solver (``check_deterministic_solver``); its scheduler is
            copied, never advanced.
        like: a tensor on the device the steps run on.
    """

    def __init__(self, sampler, like: torch.Tensor) -> None:
        self.model_fn = sampler.model_fn
        self.scheduler = sampler.fresh_scheduler(like.device)
        if hasattr(self.scheduler, "is_scale_input_called"):
            self.scheduler.is_scale_input_called = True  # scale_model_input is applied in network()
        self.timesteps = self.scheduler.timesteps
        self.network_calls = 0
        self._coefficients: dict[int, tuple[float, float]] = {}

    def _at(self, index: int) -> None:
        if hasattr(self.scheduler, "_step_index"):
            self.scheduler._step_index = index

    def network(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """``f_i(x) = model_fn(scale_model_input(x, t_i), t_i)``."""
        t = self.timesteps[index]
        self._at(index)
        self.network_calls += 1
        return self.model_fn(sched.scale_model_input(self.scheduler, x, t), t)

    def update(self, index: int, u: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """The solver update ``S_i(u, output) = a_i u + b_i output`` (``scheduler.step``)."""
        self._at(index)
        return self.scheduler.step(output, self.timesteps[index], u).prev_sample

    def coefficients(self, index: int, like: torch.Tensor) -> tuple[float, float]:
        """``(a_i, b_i)``, read off the scheduler's own update with unit inputs; ``ConfigError`` if ``a_i`` is 0 or
        not finite (the step cannot be inverted)."""
        if index not in self._coefficients:
            one = torch.ones(1, dtype=like.dtype, device=like.device)
            zero = torch.zeros_like(one)
            a, b = float(self.update(index, one, zero)), float(self.update(index, zero, one))
            if not math.isfinite(a) or a == 0:
                raise ConfigError(f"step {index} of the schedule cannot be inverted (its state coefficient is {a}).")
            self._coefficients[index] = a, b
        return self._coefficients[index]


class _FixedPointSteps(SolverSteps):
    """The chain of ``Adjoint``: one latent, each state rebuilt by the inverse step and fixed-point refinements."""

    def __init__(self, sampler, like: torch.Tensor, iters: int) -> None:
        super().__init__(sampler, like)
        self.iters = iters

    def first_input(self, states: tuple[torch.Tensor], index: int) -> torch.Tensor:
        return states[0]

    def step(self, index: int, states: tuple[torch.Tensor], first: torch.Tensor | None = None) -> tuple[torch.Tensor]:
        (x,) = states
        return (self.update(index, x, self.network(index, x) if first is None else first),)

    def invert(self, index: int, states: tuple[torch.Tensor]) -> tuple[torch.Tensor]:
        """``x_i`` from ``x_{i+1}``: the inverse step, then ``iters`` fixed-point refinements (module docstring)."""
        (x_next,) = states
        a, _ = self.coefficients(index, x_next)
        x = x_next
        for _ in range(1 + self.iters):  # the first pass, from x = x_{i+1}, is the DDIM inversion step
            x = x - (self.step(index, (x,))[0] - x_next) / a
        return (x,)
