"""The diffusers schedulers the sampler supports, used unmodified: validation, fresh state, replayable state.

Each ``Sampler.sample`` call works on its own copy of the scheduler (``from_config`` + ``set_timesteps``), so the
caller's scheduler is never mutated, and Euler / FlowMatch step indices and DPM-Solver's history start afresh.
``snapshot``/``restore`` capture the mutable state around one step so that a checkpointed step recomputed in
backward replays exactly what the forward pass did.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .errors import ConfigError

SUPPORTED_SCHEDULERS = (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)
# The one vocabulary of scheduler names (the zoo, pipelines and the CLI use it).
SCHEDULER_NAMES = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "flowmatch": FlowMatchEulerDiscreteScheduler,
}
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")
_DPM_ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++")


def check_scheduler(scheduler: object) -> None:
    """Raise ``ConfigError`` unless ``scheduler`` is one of ``SUPPORTED_SCHEDULERS`` in a supported configuration."""
    if type(scheduler) not in SUPPORTED_SCHEDULERS:
        names = ", ".join(cls.__name__ for cls in SUPPORTED_SCHEDULERS)
        raise ConfigError(f"`scheduler` must be one of {names}; got {type(scheduler).__name__}.")
    algorithm = getattr(scheduler.config, "algorithm_type", None)
    if isinstance(scheduler, DPMSolverMultistepScheduler) and algorithm not in _DPM_ALGORITHMS:
        raise ConfigError(
            f"`scheduler.config.algorithm_type` must be one of {_DPM_ALGORITHMS} for DPMSolverMultistepScheduler, "
            f"got {algorithm!r}."
        )
    prediction_type(scheduler)


def prediction_type(scheduler: SchedulerMixin) -> str:
    """The model output ``scheduler.step`` expects: its ``config.prediction_type``, or ``"flow"`` for FlowMatch."""
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return "flow"
    value = scheduler.config.prediction_type
    if value not in PREDICTION_TYPES[:3]:
        raise ConfigError(f"`scheduler.config.prediction_type` must be one of {PREDICTION_TYPES[:3]}, got {value!r}.")
    return value


def scheduler_by_name(name: str, config: Any = None, **options: Any) -> SchedulerMixin:
    """The scheduler ``name`` (a key of ``SCHEDULER_NAMES``) built from ``config`` (a diffusers scheduler config,
    e.g. a pipeline's) or from ``options`` alone. DDIM and DDPM get ``clip_sample=False``: gradients are never cut
    by a clamp."""
    if name not in SCHEDULER_NAMES:
        raise ConfigError(f"`scheduler` must be one of {tuple(SCHEDULER_NAMES)}, got {name!r}.")
    if name in ("ddim", "ddpm"):
        options = {"clip_sample": False, **options}
    cls = SCHEDULER_NAMES[name]
    return cls.from_config(config, **options) if config is not None else cls(**options)


def is_stochastic(scheduler: SchedulerMixin, eta: float) -> bool:
    """Whether ``scheduler.step`` adds fresh noise (and so needs a generator to be replayable)."""
    if isinstance(scheduler, DDPMScheduler):
        return True
    if isinstance(scheduler, DDIMScheduler):
        return eta > 0
    if isinstance(scheduler, DPMSolverMultistepScheduler):
        return scheduler.config.algorithm_type.startswith("sde")
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return bool(scheduler.config.stochastic_sampling)
    return False


def fresh_copy(scheduler: SchedulerMixin, num_inference_steps: int, device: torch.device | str | None, **options: Any):
    """A new scheduler with the same config and ``set_timesteps(num_inference_steps, **options)`` applied."""
    copy = type(scheduler).from_config(scheduler.config)
    copy.set_timesteps(num_inference_steps, device=device, **options)
    return copy


def scale_model_input(scheduler: SchedulerMixin, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``scheduler.scale_model_input(x, t)`` where the scheduler has one (FlowMatch has none: identity)."""
    scale = getattr(type(scheduler), "scale_model_input", None)
    return x if scale is None else scale(scheduler, x, t)


def snapshot(scheduler: SchedulerMixin) -> dict[str, Any]:
    """The scheduler's mutable state (its ``__dict__``, lists and dicts copied one level deep)."""
    return {key: _copy_container(value) for key, value in vars(scheduler).items()}


def restore(scheduler: SchedulerMixin, state: dict[str, Any]) -> None:
    """Put back a state taken by ``snapshot`` (the state stays reusable: containers are copied again)."""
    vars(scheduler).update({key: _copy_container(value) for key, value in state.items()})


def _copy_container(value: Any) -> Any:
    if type(value) in (list, dict):  # plain containers only: the FrozenDict config is shared, never mutated
        return type(value)(value)
    return value
