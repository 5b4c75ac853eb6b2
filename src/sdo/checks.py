"""The one input-check module: checks of common arguments (seeds, devices, learning rates, counts, step ranges,
latents, reward outputs, optimizer settings), shared by the library and the ``sdo`` command, so that a bad value
fails up front with one ``ConfigError`` naming it instead of deep inside a run."""

from __future__ import annotations

import math
import numbers

import torch

from .errors import ConfigError

__all__ = [
    "FLOAT32_MAX",
    "GUIDANCE_MAX",
    "SEED_MAX",
    "check_betas",
    "check_device",
    "check_guidance",
    "check_int",
    "check_latent",
    "check_latent_fits",
    "check_learning_rate",
    "check_positive",
    "check_rewards",
    "check_schedule_start",
    "check_seed",
    "check_step_range",
    "check_text",
]

FLOAT32_MAX = float(torch.finfo(torch.float32).max)
"""The largest float32, what a step size or guidance scale applied in float32 may reach."""
GUIDANCE_MAX = 1000
"""The largest classifier-free guidance scale the library and the commands take (``check_guidance``)."""
SEED_MAX = 2**63 - 1
"""The largest seed: seeds are integers in ``[0, 2**63 - 1]`` (what ``torch.Generator.manual_seed`` takes
without wrapping negative values around)."""


def check_seed(seed: object, name: str = "seed") -> int:
    """``seed`` if it is an integer in ``[0, 2**63 - 1]``, else a ``ConfigError`` naming ``name``."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"`{name}` must be an integer in [0, 2**63 - 1], got {seed!r}.")
    return seed


def check_positive(value: object, name: str, *, allow_zero: bool = False) -> float:
    """``value`` if it is a finite number > 0 (>= 0 with ``allow_zero``), else a ``ConfigError`` naming ``name``."""
    bound = ">= 0" if allow_zero else "> 0"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"`{name}` must be a finite number {bound}, got {value!r}.") from None
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        raise ConfigError(f"`{name}` must be a finite number {bound}, got {value!r}.")
    return number


def check_learning_rate(value: object, name: str = "lr", largest: float = FLOAT32_MAX) -> float:
    """``value`` if it is a finite number in ``(0, largest]``, else a ``ConfigError`` naming ``name``. An optimizer
    steps in float32, so its step size must fit in one: ``largest`` is ``FLOAT32_MAX`` over what the optimizer
    multiplies the rate by (Adam's first step: ``1 / (1 - beta1)``, so ``FLOAT32_MAX * (1 - beta1)``)."""
    number = check_positive(value, name)
    if number > largest:
        raise ConfigError(f"`{name}` must be a finite number in (0, {largest:.4g}], got {value!r}.")
    return number


def check_guidance(value: object, name: str = "guidance_scale") -> float:
    """``value`` if it is a finite number in ``[0, GUIDANCE_MAX]`` (a classifier-free guidance scale: the range of
    the commands' ``--guidance`` and ``--inversion-guidance``), else a ``ConfigError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= GUIDANCE_MAX:
        raise ConfigError(f"`{name}` must be a finite number in [0, {GUIDANCE_MAX}], got {value!r}.")
    return float(value)


def check_text(value: object, name: str, flag: str | None = None) -> str:
    """``value`` if it is a string of UTF-8 text, else a ``ConfigError`` naming ``name`` (and the command's
    ``flag``). Python keeps the bytes of a command-line argument that are not UTF-8 as lone surrogates
    (``'\\udcff'``), which no tokenizer or file takes."""
    where = f" (flag {flag})" if flag else ""
    if not isinstance(value, str):
        raise ConfigError(f"`{name}` must be a string, got {type(value).__name__}{where}.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(
            f"`{name}` must be UTF-8 text, got {value!r}{where}: it holds bytes that are not UTF-8 (is the "
            "terminal or the file in another encoding?)."
        ) from None
    return value


def check_device(device: object, name: str = "device", present: bool = True) -> torch.device:
    """``device`` as a ``torch.device`` if this machine has it; ``--device cuda`` without CUDA is a ``ConfigError``
    (nothing silently falls back to the CPU). With ``present=False`` only the name is checked (a device planned
    for, not used: ``sdo bench --plan``)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        parsed = None
    if parsed is None:
        raise ConfigError(f"`{name}` must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got {device!r}.")
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"`{name}` must be 'cpu', 'cuda' (or 'cuda:N') or 'mps', got {device!r}.")
    if not present:
        return parsed
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"`{name}` is {device!r}, but CUDA is not available on this machine "
                "(torch.cuda.is_available() is False); use --device cpu."
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ConfigError(
                f"`{name}` is {device!r}, but this machine has {torch.cuda.device_count()} CUDA device(s)."
            )
    elif parsed.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"`{name}` is {device!r}, but MPS is not available on this machine; use --device cpu.")
    return parsed


def check_int(value: object, name: str, low: int = 0, high: int | None = None) -> int:
    """``value`` if it is an integer (not a bool) in ``[low, high]`` (no upper bound when ``high`` is None), else a
    ``ConfigError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"`{name}` must be an integer {bounds}, got {value!r}.")
    return value


def check_step_range(start_step: object, stop_step: object, num_inference_steps: int) -> int:
    """The stop of a run of steps ``start_step, ..., stop_step - 1`` of a schedule of ``num_inference_steps``
    (``stop_step`` None: the whole rest of the schedule), or a ``ConfigError`` naming the bad argument."""
    n = num_inference_steps
    if isinstance(start_step, bool) or not isinstance(start_step, int) or not 0 <= start_step < n:
        raise ConfigError(
            f"`start_step` must be an integer in [0, {n - 1}] (num_inference_steps={n}), got {start_step!r}."
        )
    stop = n if stop_step is None else stop_step
    if isinstance(stop, bool) or not isinstance(stop, int) or not start_step < stop <= n:
        raise ConfigError(f"`stop_step` must be an integer in [{start_step + 1}, {n}], got {stop_step!r}.")
    return stop


def check_schedule_start(first_timestep: float, num_train_timesteps: int, start_step: int) -> None:
    """Refuse a schedule that would start from a mostly clean state: at ``start_step`` 0 its first timestep must be
    at least half of the training timesteps. A 1-step DDIM schedule with leading spacing is ``[0]``: it would
    return the noise as the sample. Editing from a later ``start_step`` (the latent is then not pure noise) is
    allowed whatever the timestep."""
    if start_step == 0 and first_timestep < num_train_timesteps / 2:
        raise ConfigError(
            f"`num_inference_steps` gives a schedule whose first timestep is {first_timestep:g}, below half of the "
            f"{num_train_timesteps} training timesteps: sampling from noise would return (nearly) the noise. "
            "Use more inference steps (or another timestep spacing), or start from a later `start_step`."
        )


def check_latent(x: object, name: str = "x") -> torch.Tensor:
    """``x`` if it is a finite floating-point ``[batch, ...]`` tensor with batch >= 1, else a ``ConfigError`` naming
    ``name`` (an integer tensor is refused: latents are Gaussian noise, never counts)."""
    if not torch.is_tensor(x) or not x.is_floating_point():
        kind = f"a tensor of {x.dtype}" if torch.is_tensor(x) else type(x).__name__
        raise ConfigError(f"`{name}` must be a floating-point tensor, got {kind}.")
    if x.ndim < 2 or x.shape[0] == 0:
        raise ConfigError(f"`{name}` must be a [batch, ...] latent with batch >= 1, got shape {tuple(x.shape)}.")
    if not bool(torch.isfinite(x.detach()).all()):
        raise ConfigError(f"`{name}` holds NaN or infinite values; a latent must be finite.")
    return x


def check_latent_fits(x: torch.Tensor, model: torch.nn.Module | None, name: str = "x") -> None:
    """Check a latent against the network that will denoise it, where the network says what it takes.

    - dtype: ``x`` must be float32 (the solver's precision; the adapter casts to a bf16/fp16 network) or the
      network's own parameter dtype. Anything else (float64 or float16 on a float32 network, ...) is refused with
      one message rather than cast silently: a cast would change the numbers the caller asked for.
    - shape, for a UNet (a diffusers config with ``in_channels`` and ``down_block_types``): ``[B, in_channels, H,
      W]`` with ``H`` and ``W`` multiples of the UNet's total downsampling ``2 ** (len(down_block_types) - 1)``.

    ``model`` None (an arbitrary ``model_fn``): nothing is checked here; the sampler's output-shape check applies.
    """
    if model is None:
        return
    parameter = next(model.parameters(), None)
    if parameter is not None and x.dtype not in (torch.float32, parameter.dtype):
        raise ConfigError(
            f"`{name}` has dtype {x.dtype}, but the network runs in {parameter.dtype}; pass a float32 latent "
            f"(or one in {parameter.dtype}), e.g. `{name}.float()`."
        )
    config = getattr(model, "config", None)
    channels, blocks = getattr(config, "in_channels", None), getattr(config, "down_block_types", None)
    if not isinstance(channels, int) or not blocks:
        return
    multiple = 2 ** (len(blocks) - 1)
    if x.ndim != 4 or x.shape[1] != channels or x.shape[2] % multiple or x.shape[3] % multiple:
        raise ConfigError(
            f"`{name}` has shape {tuple(x.shape)}, but the network takes [batch, {channels}, H, W] latents with H "
            f"and W multiples of {multiple}."
        )


def check_rewards(rewards: object, batch: int) -> torch.Tensor:
    """``rewards`` if it is a floating-point tensor of shape ``[batch]`` (what ``reward(x0, cond)`` must return),
    else a ``ConfigError`` naming ``reward``: a Python float or a tensor of another shape is not broadcast."""
    if not torch.is_tensor(rewards) or not rewards.is_floating_point():
        kind = f"a tensor of {rewards.dtype}" if torch.is_tensor(rewards) else type(rewards).__name__
        number = isinstance(rewards, int | float) and not isinstance(rewards, bool)
        hint = " (a Python number carries no gradient)" if number else ""
        raise ConfigError(
            f"`reward` must return a floating-point [batch] tensor of shape ({batch},), got {kind}{hint}."
        )
    if rewards.shape != (batch,):
        raise ConfigError(f"`reward` must return a [batch] tensor of shape ({batch},), got {tuple(rewards.shape)}.")
    return rewards


def check_betas(betas: object, name: str = "betas") -> tuple[float, float]:
    """``betas`` as a pair of floats in ``[0, 1)`` (Adam's moment decays), else a ``ConfigError`` naming ``name``."""
    try:
        pair = tuple(float(b) for b in betas)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        pair = ()
    if len(pair) != 2 or not all(0 <= b < 1 for b in pair):
        raise ConfigError(f"`{name}` must be a pair of numbers in [0, 1) (Adam's decays), got {betas!r}.")
    return pair
