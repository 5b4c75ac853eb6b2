"""Deterministic inversion: a sampler's solver run backwards, from a clean latent to the latent at a step.

Notation (``sdo.adjoint``): a deterministic solver step is affine in the state and the network output,

    x_{i+1} = a_i x_i + b_i f_i(x_i),    f_i(x) = model_fn(scale_model_input(x, t_i), t_i),

for DDIM with eta 0 and any prediction type (epsilon, v_prediction, sample: Song et al. 2021, Eq. 12), Euler
(``a_i = 1``, ``b_i = sigma_{i+1} - sigma_i`` for epsilon) and FlowMatch Euler (``a_i = 1``,
``b_i = sigma_{i+1} - sigma_i``, the flow ODE ``dx/dsigma = v``). Inversion walks the steps in reverse and
evaluates the network at the *known* later state (the unknown ``x_i`` is where the sampler would evaluate it):

    x_i = (x_{i+1} - b_i f_i(x_{i+1})) / a_i

This is DDIM inversion (Song et al. 2021, Sec. 4.3; Dhariwal & Nichol 2021, Eq. 13) for DDIM, and the Euler ODE
run backwards ("flow inversion", as in RF-Inversion, Rout et al. 2024, arXiv 2410.10792) for Euler and FlowMatch.
``a_i`` and ``b_i`` are read off the scheduler's own ``step``, so inversion and sampling share one arithmetic.
When ``f_i`` does not depend on its input the inversion is exact (sampling from the result gives back ``x0`` to
float precision); otherwise each step errs by ``b_i / a_i (f_i(x_i) - f_i(x_{i+1}))``, which shrinks with the step
size. ``fixed_point_iters`` refines each state by ``x_i <- (x_{i+1} - b_i f_i(x_i)) / a_i``, whose fixed point is
the exact inverse (as ``sdo.Adjoint`` reconstructs states), at one network call each.
"""

from __future__ import annotations

import torch

from .adjoint import SolverSteps, check_deterministic_solver
from .errors import ConfigError
from .sampling import Sampler

__all__ = ["invert"]


@torch.no_grad()
def invert(sampler: Sampler, x0: torch.Tensor, step: int, *, fixed_point_iters: int = 0) -> torch.Tensor:
    """The latent at schedule index ``step`` whose sampling gives ``x0``: the solver run backwards (module docstring).

    Runs steps ``n - 1, ..., step`` backwards from ``x0`` (``n = sampler.num_inference_steps``). Sampling from the
    result, ``sampler.sample(latent, sdo.NoGrad(), start_step=step)``, reconstructs ``x0`` (exactly for a model
    whose output does not depend on its input; otherwise up to the inversion error). For ``step = 0`` with a
    ``scale_noise`` sampler (pipelines) the result is divided by ``init_noise_sigma``, as the sampler's
    ``latents=`` convention takes it.

    Args:
        sampler: a deterministic sampler: DDIMScheduler with eta 0 (no clipping or thresholding),
            EulerDiscreteScheduler, or FlowMatchEulerDiscreteScheduler without stochastic sampling.
        x0: ``[batch, ...]`` the clean latent (what ``sampler.sample`` returns).
        step: index of the schedule to invert to, in ``[0, num_inference_steps - 1]``.
        fixed_point_iters (`int`, defaults to 0): refinements of each state (one network call each); 0 is plain
            DDIM / flow inversion.

    Raises:
        ConfigError: a stochastic or unsupported solver, or ``step`` / ``fixed_point_iters`` out of range.
    """
    check_deterministic_solver(sampler, "`invert`")
    n = sampler.num_inference_steps
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < n:
        raise ConfigError(f"`step` must be an integer in [0, {n - 1}], got {step!r}.")
    if isinstance(fixed_point_iters, bool) or not isinstance(fixed_point_iters, int) or fixed_point_iters < 0:
        raise ConfigError(f"`fixed_point_iters` must be an integer >= 0, got {fixed_point_iters!r}.")
    steps = SolverSteps(sampler, x0)  # the solver step as a function of the state (shared with sdo.Adjoint)
    x = x0
    for index in reversed(range(step, n)):
        a, b = steps.coefficients(index, x0)
        x_next = x
        for _ in range(1 + fixed_point_iters):  # the first pass, at x = x_{i+1}, is the plain inversion step
            x = (x_next - b * steps.network(index, x)) / a
    if step == 0 and sampler.scale_noise:
        x = x / float(getattr(steps.scheduler, "init_noise_sigma", 1.0))
    return x
