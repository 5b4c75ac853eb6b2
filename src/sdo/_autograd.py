"""The one reverse walk: flat-memory backpropagation through a chain of invertible sampling steps.

Private to the package (the module), public within it (its names): ``sdo.Adjoint`` (``adjoint.py``) and
``sdo.Invertible`` (``edict.py``) are both this walk and differ only in their chain, i.e. how a state is rebuilt
from the next one (fixed-point inverse solver step vs. exact EDICT inversion) and what one step is.

A *chain* maps a tuple of state tensors (``(x,)`` for a plain sampler, the coupled pair ``(x, y)`` for EDICT)
through steps ``start, ..., stop - 1``. The forward pass runs it under ``torch.no_grad()`` and keeps only the input
and output states. The backward pass walks the steps in reverse; at step i it

1. rebuilds the states entering step i from the states leaving it (``chain.invert``, no graph);
2. reruns the step from the rebuilt states with a graph and takes one vector-Jacobian product:
   ``g_i = (dS_i/ds_i)^T g_{i+1}`` and ``dL/dtheta += (dS_i/dtheta)^T g_{i+1}`` for every differentiated tensor.

With an exact rebuild this equals plain backpropagation through the chain (``sdo.Full()``); the only error is the
rebuild error, which the walk measures and records in an ``AdjointStats``. Memory holds one step's activations at a
time, whatever the number of steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.autograd.function import once_differentiable

from .errors import ConfigError
from .gradients import LoopMode

__all__ = ["AdjointStats", "Chain", "ReverseWalkMode", "graph_leaves", "relative_error", "run_chain"]

States = tuple[torch.Tensor, ...]


@dataclass
class AdjointStats:
    """What the last backward pass of an ``Adjoint`` (or ``Invertible``) run measured (NaN before any backward).

    Attributes:
        reconstruction_error: ``max_b ||x_hat_start - x_start|| / ||x_start||``, the relative error of the start
            latent reconstructed at the end of the backward walk (every step's reconstruction error, accumulated;
            the worst of the coupled latents for ``Invertible``).
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


class Chain(Protocol):
    """Steps of a sampler over a tuple of states, runnable and invertible at any index in any order."""

    network_calls: int

    def network(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """The network output at step ``index`` for the state ``x``."""

    def first_input(self, states: States, index: int) -> torch.Tensor:
        """The state the first network call of step ``index`` reads."""

    def step(self, index: int, states: States, first: torch.Tensor | None = None) -> States:
        """Step ``index`` (``first``: the network output of its first call, if already computed)."""

    def invert(self, index: int, states: States) -> States:
        """The states entering step ``index``, rebuilt from the states leaving it."""


def run_chain(chain: Chain, states: States, start: int, stop: int, first: torch.Tensor | None = None) -> States:
    """Steps ``start, ..., stop - 1`` of ``chain`` from ``states`` (``first``: the first network output at
    ``start``, if already computed); records a graph only if grad mode is on."""
    for index in range(start, stop):
        states = chain.step(index, states, first if index == start else None)
    return states


def graph_leaves(output: torch.Tensor) -> tuple[torch.Tensor, ...]:
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


def relative_error(error: torch.Tensor, reference: torch.Tensor) -> float:
    """``max_b ||error_b|| / ||reference_b||`` over the batch (first) dimension."""
    return float((error.flatten(1).norm(dim=1) / reference.flatten(1).norm(dim=1).clamp_min(1e-30)).max())


class ReverseWalkMode(LoopMode):
    """Base of the gradient modes that backpropagate by the reverse walk (``sdo.Adjoint``, ``sdo.Invertible``).

    It owns what those modes share: validating ``params``, choosing the differentiated tensors, and running the
    walk as one autograd node. A subclass is a frozen dataclass with the fields ``params`` (a sequence of tensors,
    or None to discover them) and ``stats`` (an ``AdjointStats`` that every backward pass fills), and supplies the
    chain.
    """

    params: tuple[torch.Tensor, ...] | None
    stats: AdjointStats

    def __post_init__(self) -> None:
        if self.params is not None:
            params = tuple(self.params)
            if not all(torch.is_tensor(p) for p in params):
                raise ConfigError(
                    "`params` must be a sequence of tensors (the tensors model_fn uses to differentiate)."
                )
            object.__setattr__(self, "params", params)

    def walk(self, chain: Chain, states: States, start: int, stop: int) -> States:
        """The states after steps ``start, ..., stop - 1``: plain no-grad sampling when nothing is differentiated,
        otherwise one autograd node over ``(*states, *params)`` whose backward is the reverse walk."""
        if not torch.is_grad_enabled():
            return run_chain(chain, states, start, stop)
        first = None
        if self.params is not None:
            params = tuple(p for p in self.params if p.requires_grad)
        else:  # the leaves of one network call's graph; its output is the first step's, reused in forward
            with torch.enable_grad():
                probe = chain.network(start, chain.first_input(states, start).detach())
            params, first = graph_leaves(probe), probe.detach()
            del probe
        if not params and not any(s.requires_grad for s in states):
            with torch.no_grad():
                return run_chain(chain, states, start, stop, first)
        walk = _Walk(chain, start, stop, params, self.stats, first)
        return _ReverseFunction.apply(walk, len(states), *states, *params)


class _Walk:
    """One run: the forward no-grad pass and the reverse walk of the backward pass (module docstring)."""

    def __init__(self, chain: Chain, start: int, stop: int, params: States, stats: AdjointStats, first) -> None:
        self.chain, self.start, self.stop = chain, start, stop
        self.params, self.stats, self.first = params, stats, first

    def forward(self, states: States) -> States:
        self.chain.network_calls = 0
        out = run_chain(self.chain, states, self.start, self.stop, self.first)
        self.first = None
        return out

    def backward(self, start_states: States, final_states: States, grads: States) -> tuple[States, list]:
        """The gradients with respect to the start states and to every tensor in ``params``; fills ``stats``."""
        n = len(start_states)
        param_grads: list[torch.Tensor | None] = [None] * len(self.params)
        states, residual = final_states, 0.0
        for index in reversed(range(self.start, self.stop)):
            with torch.no_grad():
                inputs = tuple(s.detach().requires_grad_(True) for s in self.chain.invert(index, states))
            with torch.enable_grad():
                outputs = self.chain.step(index, inputs)
                found = torch.autograd.grad(
                    outputs, (*inputs, *self.params), grads, allow_unused=True, retain_graph=bool(self.params)
                )
            residual = max(
                residual, *(relative_error(o.detach() - s, s) for o, s in zip(outputs, states, strict=True))
            )
            del outputs
            grads = tuple(torch.zeros_like(s) if g is None else g for g, s in zip(found[:n], inputs, strict=True))
            for k, g in enumerate(found[n:]):
                if g is not None:
                    param_grads[k] = g if param_grads[k] is None else param_grads[k] + g
            states = tuple(s.detach() for s in inputs)
        self._record(start_states, states, residual)
        return grads, param_grads

    def _record(self, start_states: States, rebuilt: States, residual: float) -> None:
        self.stats.reconstruction_error = max(
            relative_error(r - s, s) for r, s in zip(rebuilt, start_states, strict=True)
        )
        self.stats.max_residual = residual
        self.stats.steps = self.stop - self.start
        self.stats.network_calls = self.chain.network_calls
        self.stats.tensors = len(self.params)


class _ReverseFunction(torch.autograd.Function):
    """``final_states = chain(states)`` as one autograd node over ``(*states, *params)``; backward is the walk."""

    @staticmethod
    def forward(ctx, walk: _Walk, n: int, *tensors: torch.Tensor) -> States:
        states = tensors[:n]
        final = walk.forward(states)
        ctx.walk, ctx.n = walk, n
        ctx.save_for_backward(*states, *final)
        return final

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: torch.Tensor | None):
        n, saved = ctx.n, ctx.saved_tensors
        start, final = saved[:n], saved[n:]
        grads = tuple(torch.zeros_like(f) if g is None else g for g, f in zip(grads, final, strict=True))
        state_grads, param_grads = ctx.walk.backward(start, final, grads)
        state_grads = tuple(g if ctx.needs_input_grad[2 + k] else None for k, g in enumerate(state_grads))
        return None, None, *state_grads, *param_grads
