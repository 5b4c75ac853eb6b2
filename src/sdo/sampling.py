"""The sampling loop: one function of its inputs, whose gradient mode decides what each step keeps."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch.utils.checkpoint import checkpoint

from . import schedulers as sched
from .checks import check_latent, check_latent_fits, check_schedule_start, check_step_range
from .compiled import CompiledModelFn, CompileOptions, compile_options
from .errors import ConfigError
from .gradients import GradientMode, LoopMode, Shortcut, StepRole
from .protocols import ModelFn

__all__ = ["Sampler", "default_generator"]


class _StepNoise:
    """Replays one step's noise: a generator restored to the state the caller's generator had before the step.

    The step draws from ``generator()`` exactly what a plain loop passing the caller's generator would draw; a
    checkpointed step recomputed in backward gets a new generator in the same state, so the same noise.
    ``commit()`` then advances the caller's generator past what the forward step drew.
    """

    def __init__(self, source: torch.Generator) -> None:
        self.source = source
        self.state = source.get_state()
        self.last: torch.Generator | None = None

    def generator(self) -> torch.Generator:
        self.last = torch.Generator(device=self.source.device)
        self.last.set_state(self.state)
        return self.last

    def commit(self) -> None:
        if self.last is not None:
            self.source.set_state(self.last.get_state())


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _learned_variance(scheduler, output: torch.Tensor, x: torch.Tensor) -> bool:
    """DDPM with a learned variance takes ``2 C`` output channels for a ``C``-channel latent (mean and variance)."""
    learned = getattr(scheduler.config, "variance_type", None) in ("learned", "learned_range")
    return (
        learned
        and output.shape[:1] + output.shape[2:] == x.shape[:1] + x.shape[2:]
        and (output.shape[1] == 2 * x.shape[1])
    )


def default_generator(device: torch.device) -> torch.Generator:
    """The global RNG that ``torch.randn`` would use on ``device`` (what diffusers draws from without a generator)."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


class Sampler:
    """A diffusers scheduler driven by our own loop, differentiable as the gradient mode says (an
    ``sdo.protocols.LatentSampler``).

    Each step ``i`` (timestep ``t_i``) computes ``out = model_fn(scheduler.scale_model_input(x, t_i), t_i)`` and
    ``x = scheduler.step(out, t_i, x, ...).prev_sample``. The gradient mode (``sdo.Full``, ``sdo.Shortcut``, ...)
    decides per step whether the network call and the solver update record a graph (see ``sdo.gradients``).

    Args:
        model_fn: ``model_fn(x, t) -> output`` of the kind the scheduler expects (``scheduler.config.
            prediction_type``: epsilon, v_prediction or sample; a flow velocity for FlowMatchEulerDiscreteScheduler).
            If it has a ``prediction_type`` attribute (``sdo.Denoiser`` does), it must match the scheduler's.
        scheduler: an unmodified DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler (dpmsolver++ or
            sde-dpmsolver++), EulerDiscreteScheduler or FlowMatchEulerDiscreteScheduler. Only its config is used:
            the caller's object is never mutated.
        num_inference_steps (`int`, defaults to 50): length of the schedule.
        eta (`float`, defaults to 0.0): DDIM's stochasticity (Song et al. 2021, Eq. 16); only for DDIMScheduler.
        timestep_options (`dict`, *optional*): extra ``scheduler.set_timesteps`` arguments, e.g. the ``sigmas`` and
            dynamic shift ``mu`` a Flux pipeline passes to FlowMatch.
        scale_noise (`bool`, defaults to False): ``x`` given at step 0 is unit-variance noise, multiplied by the
            schedule's ``init_noise_sigma`` before the first step: the convention of a diffusers pipeline's
            ``latents=`` argument (``sdo.from_pipeline`` samplers use it; it matters for Euler, whose sigma is > 1).
        compile (defaults to False): run the detached network calls (``NOGRAD`` and ``SHORTCUT`` steps) through
            ``torch.compile``: True, a mode name (``"reduce-overhead"``, ``"max-autotune"``, ...) or an
            ``sdo.compiled.CompileOptions``. The kept steps stay eager. See ``sdo.compiled``.
    """

    def __init__(
        self,
        model_fn: ModelFn,
        scheduler: SchedulerMixin,
        num_inference_steps: int = 50,
        *,
        eta: float = 0.0,
        timestep_options: dict | None = None,
        scale_noise: bool = False,
        compile: bool | str | CompileOptions = False,
    ) -> None:
        sched.check_scheduler(scheduler)
        train_steps = int(scheduler.config.num_train_timesteps)
        if not _is_int(num_inference_steps) or not 1 <= num_inference_steps <= train_steps:
            raise ConfigError(
                f"`num_inference_steps` must be an integer in [1, {train_steps}] (the schedule's training timesteps), "
                f"got {num_inference_steps!r}."
            )
        if not math.isfinite(float(eta)) or eta < 0 or (eta > 0 and not isinstance(scheduler, DDIMScheduler)):
            raise ConfigError(f"`eta` must be >= 0, and non-zero only with DDIMScheduler; got eta={eta}.")
        expected = sched.prediction_type(scheduler)
        declared = getattr(model_fn, "prediction_type", expected)
        if declared != expected:
            raise ConfigError(
                f"`model_fn` predicts {declared!r} but {type(scheduler).__name__} expects {expected!r}; "
                f"set the scheduler's `prediction_type` (or the adapter's) so that they agree."
            )
        self.model_fn = model_fn
        self.compile_options = compile_options(compile)
        self.detached_model_fn: ModelFn = (
            model_fn if self.compile_options is None else CompiledModelFn(model_fn, self.compile_options)
        )
        self.num_inference_steps = num_inference_steps
        self.eta = float(eta)
        self.timestep_options = dict(timestep_options or {})
        self.scale_noise = scale_noise
        self.scheduler = type(scheduler).from_config(scheduler.config)
        self.stochastic = sched.is_stochastic(self.scheduler, self.eta)
        self.first_timestep = float(self.timesteps[0])
        network = getattr(model_fn, "model", None)  # the network of an adapter such as sdo.Denoiser, when it has one
        self.network: torch.nn.Module | None = network if isinstance(network, torch.nn.Module) else None

    def with_options(self, **changes: object) -> Sampler:
        """A copy of this sampler that keeps every setting (``model_fn``, ``scheduler``, ``num_inference_steps``,
        ``eta``, ``timestep_options``, ``scale_noise``, ``compile``) except the ``changes`` given, e.g.
        ``sampler.with_options(compile=True)`` or ``sampler.with_options(num_inference_steps=10)``.

        Raises:
            ConfigError: a name that is not a ``Sampler`` argument, or a value ``Sampler`` refuses.
        """
        settings = {
            "model_fn": self.model_fn,
            "scheduler": self.scheduler,
            "num_inference_steps": self.num_inference_steps,
            "eta": self.eta,
            "timestep_options": self.timestep_options,
            "scale_noise": self.scale_noise,
            "compile": self.compile_options or False,
        }
        unknown = sorted(set(changes) - set(settings))
        if unknown:
            raise ConfigError(f"`with_options` takes Sampler arguments ({', '.join(settings)}), got {unknown}.")
        return Sampler(**{**settings, **changes})

    def fresh_scheduler(self, device: torch.device | str | None = None) -> SchedulerMixin:
        """A new scheduler with this sampler's config and timesteps (what each ``sample`` call starts from)."""
        return sched.fresh_copy(self.scheduler, self.num_inference_steps, device, **self.timestep_options)

    @property
    def timesteps(self) -> torch.Tensor:
        """The schedule's timesteps, ``[num_inference_steps]``; step ``i`` denoises at ``timesteps[i]``."""
        return self.fresh_scheduler().timesteps

    @property
    def init_noise_sigma(self) -> float:
        """Scale of the initial latent: ``x_T = init_noise_sigma * N(0, I)`` (1 for DDIM/DDPM/DPM/FlowMatch)."""
        return float(getattr(self.fresh_scheduler(), "init_noise_sigma", 1.0))  # FlowMatch has none: 1

    def sample(
        self,
        x: torch.Tensor,
        grad: GradientMode = Shortcut(),  # noqa: B008 (a frozen, immutable value)
        start_step: int = 0,
        generator: torch.Generator | None = None,
        *,
        stop_step: int | None = None,
    ) -> torch.Tensor:
        """Run steps ``start_step, ..., stop_step - 1`` from ``x`` and return the resulting latent.

        Args:
            x: ``[batch, ...]`` latent *at* ``start_step`` (the initial noise times ``init_noise_sigma`` when 0;
                unit noise with ``scale_noise``).
            grad: gradient mode (defaults to ``Shortcut()``, the first step run keeps its graph).
            start_step: index of the first step to run, in ``[0, num_inference_steps - 1]``.
            generator: source of the noise of stochastic schedulers; step ``i``'s noise is what a plain loop passing
                this generator to ``scheduler.step`` would draw, in every gradient mode. The global RNG when None.
            stop_step: one past the last step to run (defaults to ``num_inference_steps``, giving ``x_0``); a smaller
                value returns an intermediate latent (a warm-up).
        """
        stop = self.check_steps(start_step, stop_step)
        if not isinstance(grad, GradientMode):
            raise ConfigError(f"`grad` must be a gradient mode such as sdo.Shortcut() or sdo.Full(), got {grad!r}.")
        check_latent(x)
        check_latent_fits(x, self.network)
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise ConfigError(f"`generator` must be a torch.Generator or None, got {type(generator).__name__}.")
            if generator.device.type != x.device.type:
                raise ConfigError(
                    f"`generator` is on {generator.device} but `x` on {x.device}; create it with "
                    f"torch.Generator(device=x.device)."
                )
        if isinstance(grad, LoopMode):  # e.g. sdo.Adjoint: the mode runs the whole loop itself
            return grad.run(self, x, start_step, stop, generator)
        roles = grad.roles(start_step, stop)
        scheduler = self.fresh_scheduler(x.device)
        noise_source = (generator or default_generator(x.device)) if self.stochastic else None
        if self.scale_noise and start_step == 0:
            x = x * scheduler.init_noise_sigma if hasattr(scheduler, "init_noise_sigma") else x
        for index, role in zip(range(start_step, stop), roles, strict=True):
            noise = _StepNoise(noise_source) if noise_source is not None else None
            x = self._step(scheduler, x, scheduler.timesteps[index], role, noise)
            if noise is not None:
                noise.commit()
        return x

    def check_steps(self, start_step: int, stop_step: int | None = None) -> int:
        """The stop of a run of steps ``start_step, ..., stop_step - 1`` (``sdo.checks.check_step_range``), after
        refusing a degenerate schedule at ``start_step`` 0 (``sdo.checks.check_schedule_start``)."""
        stop = check_step_range(start_step, stop_step, self.num_inference_steps)
        check_schedule_start(self.first_timestep, int(self.scheduler.config.num_train_timesteps), start_step)
        return stop

    def _step(self, scheduler, x: torch.Tensor, t: torch.Tensor, role: StepRole, noise: _StepNoise | None):
        if role is StepRole.NOGRAD:
            with torch.no_grad():
                return self._denoise(scheduler, x, t, noise, detach_network=True)
        if role is StepRole.CHECKPOINT:
            state = sched.snapshot(scheduler)

            def replay(x_in: torch.Tensor) -> torch.Tensor:
                sched.restore(scheduler, state)
                return self._denoise(scheduler, x_in, t, noise, detach_network=False)

            return checkpoint(replay, x, use_reentrant=False)
        return self._denoise(scheduler, x, t, noise, detach_network=role is StepRole.SHORTCUT)

    def _denoise(self, scheduler, x, t, noise: _StepNoise | None, detach_network: bool) -> torch.Tensor:
        with torch.no_grad() if detach_network else nullcontext():
            model_fn = self.detached_model_fn if detach_network else self.model_fn
            output = model_fn(sched.scale_model_input(scheduler, x, t), t)
        if not torch.is_tensor(output) or (output.shape != x.shape and not _learned_variance(scheduler, output, x)):
            shape = tuple(output.shape) if torch.is_tensor(output) else type(output).__name__
            raise ConfigError(
                f"`model_fn` returned {shape} for a latent of shape {tuple(x.shape)}; its output must have the "
                "latent's shape (nothing is broadcast)."
            )
        kwargs = {"eta": self.eta} if isinstance(scheduler, DDIMScheduler) else {}
        if noise is not None:
            kwargs["generator"] = noise.generator()
        return scheduler.step(output, t, x, **kwargs).prev_sample
