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

Stored states (``checkpoint_every=k``): the forward pass also keeps the states entering steps ``start, start + k,
start + 2k, ...``. In backward, step i then starts from the stored states when it has them (the *reset*) and rebuilds
them otherwise, so a rebuilt state is always derived from the next stored one by at most ``k - 1`` inversions, never
from a rebuilt state of another segment: ``ceil(n / k) + 1`` stored states for ``n`` steps, drift bounded to ``k``
steps. At a reset that ends a segment of rebuilt states the walk also rebuilds the stored states once more and
compares (the segment's drift over its ``k`` inversions, recorded; no rebuild at all where ``k = 1``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.autograd.function import once_differentiable

from .errors import ConfigError
from .gradients import LoopMode

__all__ = [
    "AdjointStats",
    "Chain",
    "ReverseWalkMode",
    "checkpoint_indices",
    "graph_leaves",
    "relative_error",
    "run_chain",
]

States = tuple[torch.Tensor, ...]


@dataclass
class AdjointStats:
    """What the last backward pass of an ``Adjoint`` (or ``Invertible``) run measured (NaN before any backward).

    Attributes:
        reconstruction_error: ``max_b ||x_hat_start - x_start|| / ||x_start||``, the relative error of the start
            latent reconstructed at the end of the backward walk (every step's reconstruction error, accumulated;
            the worst of the coupled latents for ``Invertible``).
        max_residual: ``max_{i, b} ||S_i(x_hat_i) - x_{i+1}|| / ||x_{i+1}||`` over the rebuilt states ``x_hat_i``,
            the worst per-step residual of the reconstruction (0 for an exact inverse or when nothing is rebuilt).
        steps: number of steps walked; network_calls: network evaluations of the last forward + backward;
        tensors: number of tensors differentiated besides the latent (parameters, conditioning).
        segment_errors: with stored states (``Adjoint(checkpoint_every=k)``), the relative error of each segment's
            first states rebuilt from its end (``k`` inversions) against the stored ones, latest segment first;
            ``reconstruction_error`` is their maximum (0 when nothing is rebuilt, e.g. ``k = 1``). Without stored
            states, the one value ``(reconstruction_error,)``.
        stored_states: number of states kept from forward for backward (each a tuple of latents): 2 (input and
            output) without stored states, ``ceil(n / k) + 1`` with ``checkpoint_every=k``.
    """

    reconstruction_error: float = math.nan
    max_residual: float = math.nan
    steps: int = 0
    network_calls: int = 0
    tensors: int = 0
    segment_errors: tuple[float, ...] = ()
    stored_states: int = 0


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

    def walk(self, chain: Chain, states: States, start: int, stop: int, checkpoint_every: int | None = None) -> States:
        """The states after steps ``start, ..., stop - 1``: plain no-grad sampling when nothing is differentiated,
        otherwise one autograd node over ``(*states, *params)`` whose backward is the reverse walk (with the states
        entering steps ``start, start + k, ...`` stored and reset to when ``checkpoint_every`` is ``k``)."""
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
        walk.checkpoints = checkpoint_indices(start, stop, checkpoint_every)
        return _ReverseFunction.apply(walk, len(states), *states, *params)


def checkpoint_indices(start: int, stop: int, every: int | None) -> frozenset[int]:
    """The steps whose entering states the walk stores: ``start, start + every, ...`` below ``stop`` (none if
    ``every`` is None)."""
    return frozenset() if every is None else frozenset(range(start, stop, every))


class _Walk:
    """One run: the forward no-grad pass and the reverse walk of the backward pass (module docstring)."""

    def __init__(self, chain: Chain, start: int, stop: int, params: States, stats: AdjointStats, first) -> None:
        self.chain, self.start, self.stop = chain, start, stop
        self.params, self.stats, self.first = params, stats, first
        self.checkpoints: frozenset[int] = frozenset()  # the steps whose entering states are stored
        self.stored: dict[int, States] = {}
        self.errors: list[float] = []

    def forward(self, states: States) -> States:
        """Steps ``start, ..., stop - 1`` without a graph, storing the states entering the checkpoint steps."""
        self.chain.network_calls, self.stored = 0, {}
        for index in range(self.start, self.stop):
            if index in self.checkpoints:
                self.stored[index] = tuple(s.detach() for s in states)
            states = self.chain.step(index, states, self.first if index == self.start else None)
        self.first = None
        return states

    def entering(self, index: int, states: States) -> tuple[States, bool]:
        """The states entering step ``index`` and whether they were rebuilt: the stored ones (the reset) or ones
        rebuilt from ``states``, those leaving it. A reset after rebuilt states also records the segment's drift
        (module docstring)."""
        stored = self.stored.get(index)
        if stored is None:
            return self.chain.invert(index, states), True
        if index + 1 < self.stop and index + 1 not in self.stored:  # ``states`` were rebuilt
            rebuilt = self.chain.invert(index, states)
            self.errors.append(max(relative_error(r - s, s) for r, s in zip(rebuilt, stored, strict=True)))
        return stored, False

    def backward(self, start_states: States, final_states: States, grads: States) -> tuple[States, list]:
        """The gradients with respect to the start states and to every tensor in ``params``; fills ``stats``."""
        n = len(start_states)
        param_grads: list[torch.Tensor | None] = [None] * len(self.params)
        states, residual, self.errors = final_states, 0.0, []
        for index in reversed(range(self.start, self.stop)):
            with torch.no_grad():
                entering, rebuilt = self.entering(index, states)
                inputs = tuple(s.detach().requires_grad_(True) for s in entering)
            with torch.enable_grad():
                outputs = self.chain.step(index, inputs)
                found = torch.autograd.grad(
                    outputs, (*inputs, *self.params), grads, allow_unused=True, retain_graph=bool(self.params)
                )
            if rebuilt:
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
        if not self.checkpoints:  # one segment: the start states, rebuilt through every step
            self.errors = [max(relative_error(r - s, s) for r, s in zip(rebuilt, start_states, strict=True))]
        self.stats.segment_errors = tuple(self.errors)
        self.stats.reconstruction_error = max(self.errors, default=0.0)
        self.stats.stored_states = 1 + max(len(self.checkpoints), 1)
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
        ctx.walk, ctx.n, ctx.stored_at = walk, n, sorted(walk.stored)
        stored = [s for index in ctx.stored_at for s in walk.stored[index]]
        walk.stored = {}  # saved with the graph, so that it is freed with it
        ctx.save_for_backward(*states, *final, *stored)
        return final

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: torch.Tensor | None):
        n, saved = ctx.n, ctx.saved_tensors
        start, final, stored = saved[:n], saved[n : 2 * n], saved[2 * n :]
        ctx.walk.stored = {index: stored[k * n : (k + 1) * n] for k, index in enumerate(ctx.stored_at)}
        grads = tuple(torch.zeros_like(f) if g is None else g for g, f in zip(grads, final, strict=True))
        state_grads, param_grads = ctx.walk.backward(start, final, grads)
        ctx.walk.stored = {}
        state_grads = tuple(g if ctx.needs_input_grad[2 + k] else None for k, g in enumerate(state_grads))
        return None, None, *state_grads, *param_grads
