"""The compiled path of the no-grad chain: ``Sampler(..., compile=...)`` runs its detached network calls compiled.

An SDO iteration (Dou et al. 2025, arXiv 2505.07477) is one sampling pass whose network calls all run under
``torch.no_grad()`` but one, plus that step's backward: its cost is the cost of the no-grad chain. Those detached
calls (the ``NOGRAD`` and ``SHORTCUT`` roles of ``sdo.gradients``) are pure functions of ``(x, t, conditioning)``
with no autograd graph, which is what ``torch.compile`` (and, on CUDA, CUDA graphs via ``mode="reduce-overhead"``)
serves best. The kept step (``FULL``/``CHECKPOINT``), whose graph backward needs, stays eager, and so do the
solver update and any decoder or reward: the compiled graph never sees autograd.

What is compiled:

- for an ``sdo.Denoiser`` (what ``sdo.from_pipeline`` and the zoo build): its network module, with
  ``torch.compile(module)``; the guidance arithmetic stays eager. The compiled module is cached per module object
  and compile options, so every sampler over the same network (one per fine-tuning step, one per benchmarked
  method, one per optimized item) shares one compiled graph instead of recompiling per sampler.
- for any other ``model_fn``: the function itself (cached on the ``CompiledModelFn``).

Recompilation: dynamo guards on input shapes, dtypes, devices and ``requires_grad``, and on the global grad mode,
never on tensor values. The timestep arrives as a 0-d tensor (``scheduler.timesteps[i]``), so it is a graph input,
not a constant; inputs are detached before the call (they would otherwise differ in ``requires_grad`` between a
latent being optimized and a plain sample). So one graph serves every step of every ``sample`` call with the same
shapes.

On CUDA, ``compile=True`` means ``mode="reduce-overhead"`` (CUDA graphs; outputs are cloned out of the graph pool
before the next replay), and the network is converted once, in place, to ``channels_last`` memory format with
PyTorch's fused scaled-dot-product attention (``AttnProcessor2_0``) in its attention layers (values unchanged;
these help convolutional UNets on tensor cores). On CPU, ``compile=True`` means the default mode.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from .errors import ConfigError

__all__ = ["COMPILE_MODES", "CompileOptions", "CompiledModelFn", "compile_options", "prepare_for_cuda"]

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


@dataclass(frozen=True)
class CompileOptions:
    """How the detached network calls are compiled (the arguments of ``torch.compile``).

    Attributes:
        mode: one of ``COMPILE_MODES``, or None for the device's default: ``"reduce-overhead"`` (CUDA graphs) on
            CUDA, ``"default"`` elsewhere.
        backend: the ``torch.compile`` backend (``"inductor"``; ``"aot_eager"`` or ``"eager"`` trace with dynamo
            but generate no code, for quick checks).
        dynamic: ``torch.compile``'s ``dynamic`` (False: one graph per input shape, the fastest code).
        fullgraph: fail instead of splitting the graph at code dynamo cannot trace.
        cuda_layout: on CUDA, convert the network to channels_last and SDPA attention (``prepare_for_cuda``).
    """

    mode: str | None = None
    backend: str = "inductor"
    dynamic: bool | None = False
    fullgraph: bool = False
    cuda_layout: bool = True

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in COMPILE_MODES:
            raise ConfigError(f"compile `mode` must be one of {COMPILE_MODES} or None, got {self.mode!r}.")
        if not isinstance(self.backend, str) or not self.backend:
            raise ConfigError(f"compile `backend` must be a backend name such as 'inductor', got {self.backend!r}.")

    def mode_for(self, device: torch.device) -> str:
        """The mode used on ``device``: ``mode``, or ``"reduce-overhead"`` on CUDA and ``"default"`` elsewhere."""
        if self.mode is not None:
            return self.mode
        return "reduce-overhead" if device.type == "cuda" else "default"

    def uses_cuda_graphs(self, device: torch.device) -> bool:
        """Whether compiled calls on ``device`` replay CUDA graphs (whose outputs must be copied out)."""
        return device.type == "cuda" and self.backend == "inductor" and self.mode_for(device) in _CUDA_GRAPH_MODES


def compile_options(compile: bool | str | CompileOptions | None) -> CompileOptions | None:
    """Normalize ``Sampler``'s ``compile`` argument: False/None -> None (eager), True -> default options, a mode
    name -> that mode, a ``CompileOptions`` -> itself.

    Raises:
        ConfigError: anything else, or an unknown mode name.
    """
    if compile is None or compile is False:
        return None
    if compile is True:
        return CompileOptions()
    if isinstance(compile, CompileOptions):
        return compile
    if isinstance(compile, str):
        return CompileOptions(mode=compile)
    raise ConfigError(
        f"`compile` must be False, True, a mode in {COMPILE_MODES} or an sdo.compiled.CompileOptions, got {compile!r}."
    )


# module -> {(options, device type): compiled forward}. The compiled forwards reach the module only through a weak
# reference (_WeakForward), so an entry dies with its module.
_MODULE_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _compiled_module(module: torch.nn.Module, options: CompileOptions, device: torch.device) -> Callable:
    """``torch.compile(module)`` with ``options``, one per (module, options, device type), shared by all samplers."""
    per_module = _MODULE_CACHE.setdefault(module, {})
    key = (options, device.type)
    if key not in per_module:
        if device.type == "cuda" and options.cuda_layout:
            prepare_for_cuda(module)
        # The compiled wrapper must not keep ``module`` alive through the cache (a weak key whose value refers to
        # it would never be collected): compile the module's forward through a weak reference instead.
        per_module[key] = _compile(_WeakForward(module), options, device)
    return per_module[key]


class _WeakForward:
    """Calls ``module(*args, **kwargs)`` through a weak reference (the compile cache must not own the module)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self._module = weakref.ref(module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self._module()
        if module is None:  # pragma: no cover - the cache entry dies with the module
            raise ReferenceError("the compiled network no longer exists")
        return module(*args, **kwargs)


def _compile(fn: Callable, options: CompileOptions, device: torch.device) -> Callable:
    return torch.compile(
        fn,
        mode=options.mode_for(device) if options.backend == "inductor" else None,
        backend=options.backend,
        dynamic=options.dynamic,
        fullgraph=options.fullgraph,
    )


class CompiledModelFn:
    """``model_fn(x, t)`` for the detached (no-grad) network calls of a ``Sampler``, compiled on first use.

    Call it only under ``torch.no_grad()`` (the ``Sampler`` does): inputs are detached, and on CUDA with CUDA graphs
    the output is cloned out of the graph's memory pool, so that the next replay cannot overwrite it while a
    multistep solver still holds it. One compiled graph per device type.

    Args:
        model_fn: the eager ``model_fn``; an ``sdo.Denoiser`` has its network module compiled (shared across
            Denoisers over the same module), anything else is compiled whole.
        options: how to compile (``CompileOptions``).
    """

    def __init__(self, model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], options: CompileOptions):
        self.model_fn = model_fn
        self.options = options
        self._compiled: dict[str, Callable] = {}

    def _for_device(self, device: torch.device) -> Callable:
        if device.type not in self._compiled:
            from .models import Denoiser  # models imports nothing from here; keep the import local and cheap

            if isinstance(self.model_fn, Denoiser) and isinstance(self.model_fn.model, torch.nn.Module):
                module = self.model_fn.model
                if isinstance(module, torch.nn.parallel.DistributedDataParallel):
                    module = module.module  # no-grad calls need no gradient synchronization
                network = _compiled_module(module, self.options, device)
                self._compiled[device.type] = replace(self.model_fn, model=_NetworkView(self.model_fn.model, network))
            else:
                self._compiled[device.type] = _compile(self.model_fn, self.options, device)
        return self._compiled[device.type]

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            raise RuntimeError("CompiledModelFn serves no-grad calls only; the kept step calls the eager model_fn.")
        fn = self._for_device(x.device)
        cuda_graphs = self.options.uses_cuda_graphs(x.device)
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        t = torch.as_tensor(t, device=x.device)
        out = fn(x.detach(), t.detach())
        return out.clone() if cuda_graphs else out

    def __getattr__(self, name: str) -> Any:  # prediction_type and the like come from the eager model_fn
        if name == "model_fn":
            raise AttributeError(name)
        return getattr(self.model_fn, name)


class _NetworkView(torch.nn.Module):
    """What a compiled ``Denoiser`` calls: the compiled forward, with the eager module's parameters and dtype."""

    def __init__(self, module: torch.nn.Module, compiled: Callable) -> None:
        super().__init__()
        object.__setattr__(self, "_eager", module)  # not a registered submodule: no second copy in state dicts
        object.__setattr__(self, "_compiled_forward", compiled)

    def parameters(self, recurse: bool = True):  # Denoiser reads the dtype from the first parameter
        return self._eager.parameters(recurse)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._compiled_forward(*args, **kwargs)


def prepare_for_cuda(module: torch.nn.Module) -> torch.nn.Module:
    """Convert ``module`` in place for fast CUDA inference: channels_last memory format (4-D weights; values
    unchanged) and PyTorch's scaled-dot-product attention in diffusers attention layers that use another processor.
    Returns ``module``. A no-op for modules on other devices.
    """
    parameter = next(module.parameters(), None)
    if parameter is None or parameter.device.type != "cuda":
        return module
    module.to(memory_format=torch.channels_last)
    processors = getattr(module, "attn_processors", None)
    if processors:
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        if any(type(processor) is AttnProcessor for processor in processors.values()):
            module.set_attn_processor(AttnProcessor2_0())
    return module
