"""FreeDoM: training-free energy guidance inside one sampling pass (Yu et al., ICCV 2023, arXiv 2303.09833).

Notation: step i maps ``x_i`` (timestep ``t_i``) to ``x_{i+1}``; the marginal at step i is
``x_i = alpha_i x_0 + sigma_i eps`` (DDIM/DDPM: ``alpha = sqrt(ab_t)``, ``sigma = sqrt(1 - ab_t)``; Euler:
``alpha = 1``, ``sigma = sigma_i``; FlowMatch: ``alpha = 1 - s_i``, ``sigma = s_i``). The energy is ``E = -reward``.
At each step i inside the guidance window ``[window[0], window[1])``:

1. ``out = model_fn(x_i, t_i)`` with a graph; the solver gives the unguided ``x'_{i+1}`` and the x0 prediction
   ``x0_hat(x_i)`` (``pred_original_sample``; FlowMatch: ``x_i - s_i v``);
2. ``g_i = d reward(D(x0_hat), cond) / d x_i`` (one network VJP; ``D`` the optional decoder);
3. ``x_{i+1} = x'_{i+1} + rho_i g_i`` (a step down the energy), with FreeDoM's adaptive step size
   ``rho_i = scale * rms(x'_{i+1} - x_i) / rms(g_i)`` per sample: the guidance moves the state by ``scale`` times
   the solver's own update (the authors' CLIP rule sets ``0.02`` of the update's x0 term; measuring the whole
   update makes it one formula on every scheduler);
4. time travel (inside ``[travel[0], travel[1])``, ``repeats`` > 1): re-noise ``x_{i+1}`` back to step i,
   ``x_i = (alpha_i / alpha_{i+1}) x_{i+1} + sqrt(sigma_i^2 - (alpha_i / alpha_{i+1})^2 sigma_{i+1}^2) z``, and redo
   the step, ``repeats`` passes in all.

Steps outside the window run under ``torch.no_grad()``. Nothing is optimized across passes: one guided pass per
sample, whose cost is one network forward + backward (and the reward's) per guided pass.

Two schedules (``schedule``): ``"sdo"`` (the default, above) guides every step with the step size of step 3;
``"official"`` is the schedule of the authors' code (https://github.com/vvictoryuki/FreeDoM, ``SD_style/ldm/models/
diffusion/ddim.py``, run by its ``run.sh`` with 100 steps, guidance 5, batch 1). That code's loop counts
``index = 99 - i`` down from the noisy end (loop step ``i = 0``); it guides ``70 > index >= 30`` (our steps
``30 <= i < 70``) and time-travels (3 passes) in ``70 > index >= 40`` (our steps ``30 <= i < 60``), with the step

    rho = 0.2 * w * rms(e_cond - e_uncond) / rms(g)

(``g`` the gradient at ``x_i`` of its energy, a style distance; here of the reward, the step adding ``rho g``), where
``w (e_cond - e_uncond)`` is the classifier-free guidance term of the model's output (``sdo.Denoiser.guidance_parts``)
and both root mean squares run over the whole batch at once (one ``rho`` per pass, not per sample). Under
``"official"``, ``scale`` is that code's 0.2 (``FreedomSettings.scale``, the same default), and the window and travel
range default to the official ones scaled to the run: with ``N`` steps, step ``i`` is guided when
``30 <= 100 i / N < 70`` and travels when ``30 <= 100 i / N < 60`` (``FreedomSettings.official_window`` and
``official_travel``), i.e. ``(ceil(0.3 N), ceil(0.7 N))`` and ``(ceil(0.3 N), ceil(0.6 N))``: exactly the official
steps at ``N = 100``, ``(15, 35)`` and ``(15, 30)`` at ``N = 50`` (that code's hard-coded indices would guide loop
steps 0-19 of a 50-step run). ``repeats`` keeps its meaning (default 1): the official 3 passes are
``repeats=FreedomSettings.official_repeats``. sdo keeps the sampler's own solver step, whereas that code steps with
the DDPM posterior whatever its eta (a DDIM step with eta = 1): a DDPM or DDIM eta = 1 sampler matches it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from . import schedulers as sched
from .checks import check_int, check_latent, check_latent_fits, check_positive, check_rewards
from .errors import ConfigError, NonFiniteRewardError
from .gradients import NoGrad
from .latent import LatentProblem, OptimizationResult, history_record
from .memory import PeakMemory
from .models import Denoiser
from .protocols import LatentReward
from .sampling import Sampler, default_generator

__all__ = ["FREEDOM_SCHEDULES", "FreedomSettings", "GuidanceResult", "GuidanceStepper", "freedom_sample"]

FREEDOM_SCHEDULES = ("sdo", "official")
"""``freedom_sample``'s schedules: sdo's step on every step, or the authors' code's window and step (module
docstring)."""

_X0_SCHEDULERS = (DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler)


@dataclass(frozen=True)
class FreedomSettings:
    """FreeDoM's guidance defaults, written once: ``freedom_sample``, ``GuidanceStepper``,
    ``sdo.methods.MethodOptions`` and the ``--freedom-*`` flags read them.

    Attributes:
        scale: the guidance step as a fraction of the solver's update (>= 0; module docstring, step 3); under the
            official schedule, the factor of its rule (the authors' code's 0.2, the same default).
        repeats: passes per step inside the time-travel range (1 disables time travel).
        schedule: one of ``FREEDOM_SCHEDULES``: ``"sdo"`` or ``"official"`` (module docstring).
        official_window, official_travel: the official schedule's guided and time-travel steps, ``(first, stop)`` of
            its 100 steps (loop steps ``i``, counted from the noisy end), scaled to a run of ``N`` steps as
            ``ceil(first N / 100), ceil(stop N / 100)``.
        official_repeats: the official code's passes per step in its travel range (pass it as ``repeats``).
    """

    scale: float = 0.2
    repeats: int = 1
    schedule: str = "sdo"
    official_window: tuple[int, int] = (30, 70)
    official_travel: tuple[int, int] = (30, 60)
    official_repeats: int = 3


@dataclass
class GuidanceResult:
    """What ``freedom_sample`` returns.

    Attributes:
        sample: ``[B, ...]`` the guided final latent (detached).
        rewards: ``[B]`` the reward of the final sample (decoded when a decoder is given).
        history: one dict per guided pass: ``step`` (schedule index), ``pass`` (0 .. repeats - 1), ``timestep``,
            ``reward`` (batch mean of the reward at the x0 prediction), ``rho`` (batch mean step size), ``grad_rms``.
        seconds: wall-clock of the whole guided pass (without the final reward evaluation).
        network_calls: network evaluations of the pass.
    """

    sample: torch.Tensor
    rewards: torch.Tensor
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    network_calls: int = 0


def freedom_sample(
    sampler: Sampler,
    x: torch.Tensor,
    reward: LatentReward,
    *,
    cond: object = None,
    decoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
    scale: float = FreedomSettings.scale,
    window: tuple[int, int] | None = None,
    repeats: int = FreedomSettings.repeats,
    travel: tuple[int, int] | None = None,
    start_step: int = 0,
    generator: torch.Generator | None = None,
    schedule: str = FreedomSettings.schedule,
) -> GuidanceResult:
    """One FreeDoM-guided sampling pass (Yu et al. 2023, arXiv 2303.09833; formulas in the module docstring). The
    defaults are ``FreedomSettings``'s.

    Args:
        sampler: an ``sdo.Sampler`` on DDIM (any eta), DDPM, Euler or FlowMatch Euler (a scheduler with an x0
            prediction; DPM-Solver gives a ``ConfigError``).
        x: ``[B, ...]`` the latent at ``start_step`` (initial noise times ``init_noise_sigma`` when 0).
        reward: ``reward(image, cond) -> [B]``, higher is better (the energy is its negative).
        cond: passed to ``reward``. decoder: optional ``x0 -> image`` applied before the reward (e.g. a VAE decode).
        scale (`float`, defaults to 0.2): the guidance step as a fraction of the solver's update (>= 0); under
            ``schedule="official"`` the factor of the official rule (0.2 in the authors' code).
        window: ``(first, stop)`` schedule indices of the guided steps (defaults to every step run, or under
            ``"official"`` to the official window scaled to the run, from ``start_step`` on); must satisfy
            ``start_step <= first < stop <= num_inference_steps``.
        repeats (`int`, defaults to 1): passes per step inside ``travel`` (time travel; 1 disables it; the official
            code makes 3).
        travel: ``(first, stop)`` steps that time-travel, inside ``window`` (defaults to the first half of it, or under
            ``"official"`` to the official travel range scaled to the run).
        start_step: first step run. generator: noise of stochastic schedulers and of time travel (global RNG if None).
        schedule (`str`, defaults to "sdo"): ``"sdo"`` or ``"official"`` (the authors' code's window, travel range and
            step size, module docstring); ``"official"`` needs ``sampler.model_fn`` to be an ``sdo.Denoiser`` with
            classifier-free guidance.

    Raises:
        ConfigError: unsupported scheduler, window or travel range outside the run, repeats < 1, bad scale, an
            unknown schedule, or ``"official"`` without classifier-free guidance or with no official step in the run.
        NonFiniteRewardError: the reward or its gradient is NaN or infinite.
    """
    first, stop, travel_first, travel_stop = _check(sampler, x, scale, window, repeats, travel, start_step, schedule)
    official = schedule == "official"
    started = time.perf_counter()
    scheduler = sampler.fresh_scheduler(x.device)
    noise = generator or default_generator(x.device)
    kwargs = {"eta": sampler.eta} if isinstance(scheduler, DDIMScheduler) else {}
    history, calls, x = [], 0, x.detach()
    for index in range(start_step, sampler.num_inference_steps):
        t = scheduler.timesteps[index]
        guided = first <= index < stop
        passes = repeats if guided and travel_first <= index < travel_stop else 1
        state = sched.snapshot(scheduler)
        for number in range(passes):
            sched.restore(scheduler, state)
            extra = {**kwargs, "generator": noise} if sched.is_stochastic(scheduler, sampler.eta) else kwargs
            calls += 1
            if not guided:
                with torch.no_grad():
                    output = sampler.model_fn(sched.scale_model_input(scheduler, x, t), t)
                    x_next = scheduler.step(output, t, x, **extra).prev_sample
            else:
                x_next, record = _guided_step(
                    sampler, scheduler, index, x, reward, cond, decoder, scale, extra, official
                )
                history.append({"step": index, "pass": number, "timestep": int(t), **record})
            if number + 1 < passes:
                x = _renoise(scheduler, index, x_next, noise)
        x = x_next
    seconds = time.perf_counter() - started
    with torch.no_grad():
        rewards = check_rewards(reward(decoder(x) if decoder is not None else x, cond), x.shape[0])
    return GuidanceResult(x, rewards.detach(), history, seconds, calls)


def _guided_step(sampler, scheduler, index, x, reward, cond, decoder, scale, extra, official):
    """Steps 1-3 of the module docstring: the unguided update plus ``rho g``, and the pass's metrics (``official``:
    the official step size)."""
    t = scheduler.timesteps[index]
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        model_input = sched.scale_model_input(scheduler, x_in, t)
        if official:
            output, term = sampler.model_fn.guidance_parts(model_input, t)
        else:
            output = sampler.model_fn(model_input, t)
        step = scheduler.step(output, t, x_in, **extra)
        x0 = _x0_prediction(scheduler, step, x_in, output, index)
        rewards = check_rewards(reward(decoder(x0) if decoder is not None else x0, cond), x.shape[0])
        (gradient,) = torch.autograd.grad(rewards.sum(), x_in)
    if not (torch.isfinite(rewards).all() and torch.isfinite(gradient).all()):
        raise NonFiniteRewardError(f"FreeDoM: the reward or its gradient is not finite at step {index}; stopped.")
    x_next = step.prev_sample.detach()
    if official:  # one rho for the batch: root mean squares over all its elements, as the authors' code
        rho = (scale * _rms(term.detach().flatten()[None]) / _rms(gradient.flatten()[None]).clamp_min(1e-30)).expand(
            x.shape[0]
        )
    else:
        rho = scale * _rms(x_next - x) / _rms(gradient).clamp_min(1e-30)
    x_next = x_next + rho.view(-1, *[1] * (x.ndim - 1)) * gradient
    record = {
        "reward": float(rewards.detach().mean()),
        "rho": float(rho.mean()),
        "grad_rms": float(_rms(gradient).mean()),
    }
    return x_next, record


def _rms(tensor: torch.Tensor) -> torch.Tensor:
    """Root mean square per batch element, ``[B]``."""
    return tensor.flatten(1).square().mean(dim=1).sqrt()


def _x0_prediction(scheduler, step, x: torch.Tensor, output: torch.Tensor, index: int) -> torch.Tensor:
    """The step's x0 prediction: ``pred_original_sample``, or ``x - s_i v`` for FlowMatch (which returns none)."""
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return x - scheduler.sigmas[index].to(x.dtype) * output
    return step.pred_original_sample


def _signal_noise(scheduler, index: int) -> tuple[float, float]:
    """``(alpha_i, sigma_i)`` of the marginal ``x_i = alpha_i x_0 + sigma_i eps`` (index n: the clean end)."""
    if isinstance(scheduler, (EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler)):
        s = float(scheduler.sigmas[index])
        return (1.0, s) if isinstance(scheduler, EulerDiscreteScheduler) else (1.0 - s, s)
    if index >= len(scheduler.timesteps):
        ab = float(getattr(scheduler, "final_alpha_cumprod", 1.0))
    else:
        ab = float(scheduler.alphas_cumprod[int(scheduler.timesteps[index])])
    return math.sqrt(ab), math.sqrt(1.0 - ab)


def _renoise(scheduler, index: int, x_next: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Time travel: a draw of ``x_i`` given ``x_{i+1}`` under the forward process (module docstring, step 4)."""
    alpha, sigma = _signal_noise(scheduler, index)
    alpha_next, sigma_next = _signal_noise(scheduler, index + 1)
    ratio = alpha / alpha_next
    spread = math.sqrt(max(sigma**2 - (ratio * sigma_next) ** 2, 0.0))
    z = torch.randn(x_next.shape, generator=generator, device=x_next.device, dtype=x_next.dtype)
    return ratio * x_next + spread * z


def _range(name: str, value, low: int, high: int) -> tuple[int, int]:
    ok = isinstance(value, (tuple, list)) and len(value) == 2
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if not ok or not low <= value[0] < value[1] <= high:
        raise ConfigError(
            f"`{name}` must be a pair of step indices (first, stop) with {low} <= first < stop <= {high}, "
            f"got {value!r}."
        )
    return int(value[0]), int(value[1])


def official_steps(steps: int, percent: tuple[int, int]) -> tuple[int, int]:
    """The steps ``(first, stop)`` of a run of ``steps`` whose position ``100 i / steps`` lies in ``[percent[0],
    percent[1])``: ``FreedomSettings.official_window`` or ``official_travel`` (given for 100 steps) scaled to the run,
    ``ceil(percent * steps / 100)`` (exactly ``percent`` at 100 steps)."""
    return -(-percent[0] * steps // 100), -(-percent[1] * steps // 100)


def _official_ranges(n: int, start_step: int, window) -> tuple[tuple[int, int], tuple[int, int]]:
    """The official schedule's window (``window`` if given) and its travel range within it, in a run of ``n`` steps
    from ``start_step``; the travel range may be empty (``first == stop``: no step travels)."""
    if window is None:
        first, stop = official_steps(n, FreedomSettings.official_window)
        window = (max(first, start_step), stop)
        if window[0] >= stop:
            raise ConfigError(
                f"FreeDoM's official schedule (`schedule`='official', --freedom-schedule official) guides the steps "
                f"{FreedomSettings.official_window[0]}% to {FreedomSettings.official_window[1]}% of the way through "
                f"the run (steps {first}..{stop - 1} of {n}), none of which runs from step {start_step}; use more "
                "steps, an earlier start step, or schedule 'sdo'."
            )
    first, stop = _range("window", window, start_step, n)
    travel_first, travel_stop = official_steps(n, FreedomSettings.official_travel)
    travel_first, travel_stop = max(travel_first, first), min(travel_stop, stop)
    return (first, stop), (travel_first, max(travel_first, travel_stop))


def _check_official(sampler) -> None:
    model_fn = sampler.model_fn
    if isinstance(model_fn, Denoiser) and model_fn.guided:
        return
    got = (
        f"an sdo.Denoiser without guidance (guidance_scale={model_fn.guidance_scale})"
        if isinstance(model_fn, Denoiser)
        else f"a {type(model_fn).__name__}"
    )
    raise ConfigError(
        "FreeDoM's official schedule (`schedule`='official', --freedom-schedule official) sizes its step by the "
        "classifier-free guidance term w (e_cond - e_uncond): it needs `sampler.model_fn` to be an sdo.Denoiser with "
        f"guidance (a condition and guidance_scale != 1), got {got}; guide the model, or use schedule 'sdo'."
    )


def _check(sampler, x, scale, window, repeats, travel, start_step, schedule):
    if not isinstance(sampler, Sampler):
        raise ConfigError(f"`sampler` must be an sdo.Sampler, got {type(sampler).__name__}.")
    if type(sampler.scheduler) not in _X0_SCHEDULERS:
        raise ConfigError(
            f"FreeDoM needs a scheduler whose step predicts x0 (DDIM, DDPM, Euler, FlowMatch Euler); "
            f"{type(sampler.scheduler).__name__} gives none."
        )
    n = sampler.num_inference_steps
    sampler.check_steps(start_step)
    check_latent(x)
    check_latent_fits(x, sampler.network)
    if isinstance(scale, bool):
        raise ConfigError(f"`scale` must be a finite number >= 0, got {scale!r}.")
    check_positive(scale, "scale", allow_zero=True)
    check_int(repeats, "repeats", low=1)
    if schedule not in FREEDOM_SCHEDULES:
        raise ConfigError(f"`schedule` must be one of {FREEDOM_SCHEDULES}, got {schedule!r}.")
    if schedule == "official":
        _check_official(sampler)
        (first, stop), official_travel = _official_ranges(n, start_step, window)
        if travel is None:
            return first, stop, *official_travel
    else:
        first, stop = _range("window", (start_step, n) if window is None else window, start_step, n)
    default_travel = (first, first + max(1, (stop - first) // 2))
    travel_first, travel_stop = _range("travel", default_travel if travel is None else travel, first, stop)
    return first, stop, travel_first, travel_stop


class GuidanceStepper:
    """FreeDoM as a method beside latent optimization. FreeDoM optimizes nothing: the latent never moves, and a run is
    one guided sampling pass from it.

    ``run()`` is that pass, reported in the shape of a one-iteration latent optimization: record 0 is the unguided
    sample of the latent (the starting point), which the one iteration, the guided pass, starts from, so it carries
    the pass's cost (``seconds``, and ``peak_mem_bytes``/``mem_kind`` with ``measure``); record 1 is the guided sample
    (the final evaluation). Each record's ``best_so_far`` is its own reward: FreeDoM keeps no best iterate (its
    result, ``best_reward`` included, is the last pass). ``iterate()`` is one guided pass on its own (a record of the
    guided sample): ``sdo bench`` interleaves passes with other methods' iterations, each from the same latent.

    Args:
        problem: an ``sdo.latent.LatentProblem``: its sampler, latent (``freedom_sample``'s ``x``), reward, cond and
            start_step go to ``freedom_sample``; its seed seeds the noise generator of every pass (one latent, one
            seed: one guided sample); judge and measure as for ``sdo.optimize_latent``.
        scale, repeats, schedule: as for ``freedom_sample`` (``FreedomSettings``'s defaults).

    Raises:
        ConfigError: ``schedule`` is unknown, or ``"official"`` and the problem's ``sampler.model_fn`` has no
            classifier-free guidance (before any pass).
    """

    iterations = 1
    """The iterations of a run: one guided pass, whatever an optimizer's run length is."""

    def __init__(
        self,
        problem: LatentProblem,
        scale: float = FreedomSettings.scale,
        repeats: int = FreedomSettings.repeats,
        schedule: str = FreedomSettings.schedule,
    ) -> None:
        if schedule not in FREEDOM_SCHEDULES:
            raise ConfigError(f"`schedule` must be one of {FREEDOM_SCHEDULES}, got {schedule!r}.")
        if schedule == "official":
            _check_official(problem.sampler)
        self.problem, self.scale, self.repeats, self.schedule = problem, scale, repeats, schedule
        self.latent = problem.latent.detach()
        self.history: list[dict] = []
        self.last: GuidanceResult | None = None
        self.gradient = None  # FreeDoM gives the latent no gradient

    def iterate(self) -> dict:
        """One guided pass; returns (and appends to ``history``) its record (the guided sample's reward)."""
        cost = self._guided_pass()
        elapsed = (self.history[-1]["elapsed"] if self.history else 0.0) + self.last.seconds
        record = self._record(len(self.history), self.last.rewards, self.last.sample, self.last.seconds, elapsed)
        self.history.append({**record, **cost})
        return self.history[-1]

    def step(self) -> dict:
        """The old name of ``iterate()`` (one guided pass, not a solver step); kept for existing callers."""
        return self.iterate()

    def finish(self) -> OptimizationResult:
        """The result of the last pass (``latent`` is the unchanged starting latent)."""
        if self.last is None:
            raise ConfigError("GuidanceStepper.finish() needs one guided pass first (iterate() or run()).")
        guided = self.last
        return OptimizationResult(self.latent, guided.sample, self.latent, guided.sample, guided.rewards, self.history)

    def run(self, iters: int = 1, description: str = "", progress: bool = True) -> OptimizationResult:
        """The run: one guided pass (``iters`` must be ``iterations``, 1; ``description`` and ``progress`` are unused:
        a pass shows no bar), as the two-record history of the class docstring.

        Raises:
            ConfigError: ``iters`` is not 1 (``sdo.methods.Method.optimize`` asks the runner for its iterations).
        """
        if iters != self.iterations:
            raise ConfigError(f"FreeDoM runs one guided sampling pass: `iters` must be 1, got {iters!r}.")
        cost = self._guided_pass()
        problem, seconds = self.problem, self.last.seconds
        with torch.no_grad():
            unguided = problem.sampler.sample(
                self.latent, NoGrad(), start_step=problem.start_step, generator=self._generator()
            )
            before = check_rewards(problem.reward(unguided, problem.cond), self.latent.shape[0])
        start = {**self._record(0, before, unguided, seconds, seconds), **cost}
        self.history.extend([start, self._record(1, self.last.rewards, self.last.sample, 0.0, seconds)])
        return self.finish()

    def _guided_pass(self) -> dict:
        """Run one guided pass into ``last``; returns its memory fields (none unless the problem measures)."""
        problem = self.problem
        with PeakMemory(self.latent.device) if problem.measure else nullcontext() as memory:
            self.last = freedom_sample(
                problem.sampler,
                self.latent,
                problem.reward,
                cond=problem.cond,
                scale=self.scale,
                repeats=self.repeats,
                start_step=problem.start_step,
                schedule=self.schedule,
                generator=self._generator(),
            )
        return {} if memory is None else {"peak_mem_bytes": memory.peak_bytes, "mem_kind": memory.kind}

    def _generator(self) -> torch.Generator:
        return torch.Generator(device=self.latent.device).manual_seed(self.problem.seed)

    def _record(self, iteration: int, rewards, sample, seconds: float, elapsed: float) -> dict:
        record = history_record(iteration, rewards, None, seconds, elapsed)
        if self.problem.judge is not None:
            record["judge_success"] = float(self.problem.judge(sample).float().mean())
        return record
