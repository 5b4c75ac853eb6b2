"""``sdo bench --plan``: activation memory and relative time per iteration, predicted without running the work.

The prediction traces *one* network call and *one* reward evaluation (decoder included) on PyTorch's ``meta``
device - shapes and dtypes only, no weights, no arithmetic, no memory - built from the workload's model config,
resolution and batch. The trace gives, per call:

- ``A``: bytes autograd saves for backward (distinct storages, parameters and their views excluded: what
  ``sdo.memory.PeakMemory`` counts on CPU), with the same ``requires_grad`` pattern as the real run (the latent,
  or the weights);
- ``F`` and ``B``: forward and backward FLOPs (``torch.utils.flop_counter``: matmuls, convolutions, attention);
- ``X``: bytes of the latent a step takes.

The gradient mode's roles (``sdo.gradients``) for ``n`` steps then compose them. With ``f`` steps of role FULL,
``c`` of role CHECKPOINT, and the reward's ``A_r, F_r, B_r``:

    saved activations (the CPU figure)  = f A + A_r
    peak activations                    = f A + c X + max(A_r, [c > 0] A)   (a checkpointed step's activations
                                          are alive only while it is recomputed, after the reward's backward; with
                                          a checkpointed decoder, A_r is its rematerialized size)
    FLOPs per iteration                 = n F + f B + c (F + B) + F_r + B_r     (nograd: n F + F_r)
    relative time                       = FLOPs / FLOPs(nograd)

so ``sdo`` costs one step's activations whatever ``n`` is, ``full`` grows as ``n A``, and ``checkpointed`` costs
``n X + A`` at about ``(2F + B) / F`` times the no-grad compute. ``alignprop`` and ``random-truncation`` (their
graphed steps checkpointed, as in the official code) have their peak at their largest draw (every step graphed;
the largest depth) and their time at the mean one (n / 2 graphed steps; the mean depth). The solver update saves only
scalars (DDIM) and is neglected; so are the FLOPs of elementwise operations, which is why the time ratios are a
floor on small models, where per-call overhead dominates (the embedded model on CPU). On CUDA the allocator's peak
adds the transient workspace of one call and the weights' gradients and optimizer state (``--variable weights``,
given separately).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch

from sdo.app.bench import BenchConfig, build_workload
from sdo.app.bench import workload_dtype as plan_dtype
from sdo.app.method_flags import AUTO
from sdo.app.planner import CallProfile, MethodPlan, plan_any, plan_loop_method, plan_method, profile_call
from sdo.app.report import markdown_table, mebibytes
from sdo.app.tasks.bench import Workload

__all__ = [
    "CallProfile",
    "MethodPlan",
    "format_plan",
    "plan_any",
    "plan_bench",
    "plan_dtype",
    "plan_loop_method",
    "plan_method",
    "profile_call",
]


@dataclass(frozen=True)
class _MetaWorkload:
    """A workload's network call and reward on meta tensors, and the weights trained with ``--variable weights``."""

    network: Callable[..., torch.Tensor]
    reward: Callable[[torch.Tensor], torch.Tensor]
    reward_as_run: Callable[[torch.Tensor], torch.Tensor]  # with the decoder checkpointed, if the config says so
    latent: torch.Tensor
    timestep: torch.Tensor
    model: torch.nn.Module
    built: Workload  # the workload as run (what --methods auto plans on)


def _meta_workload(config: BenchConfig, dtype: torch.dtype | None = None) -> _MetaWorkload:
    """The benchmark's workload (``sdo.app.bench.build_workload``) on the meta device (SD-1.5 in ``dtype``, default
    ``plan_dtype(config)``): its network call, its reward without and as run (the decoder checkpointed when the
    config says so), its latent; nothing touches ``config.device``."""
    workload = build_workload(config, "meta", dtype)
    plain = (
        build_workload(replace(config, checkpoint_decoder=False), "meta", dtype)
        if config.checkpoint_decoder
        else workload
    )
    reward = lambda x0: plain.reward(x0, None)  # noqa: E731
    as_run = (lambda x0: workload.reward(x0, None)) if config.checkpoint_decoder else reward
    network = workload.make_sampler(1, workload.model).model_fn
    timestep = torch.tensor(500, device="meta")
    return _MetaWorkload(network, reward, as_run, workload.latent, timestep, workload.model, workload)


def plan_bench(config: BenchConfig, dtype: torch.dtype | None = None) -> dict:
    """Predict, for every method and number of steps of ``config``, the activation memory and relative time of
    one iteration (nothing runs: see the module docstring). Everything is traced on the meta device, so
    ``config.device`` need not exist on this machine (a CUDA plan on a CPU-only one); it only sets the SD-1.5
    dtype (``plan_dtype``) unless ``dtype`` is given. Returns ``{"config", "profiles", "rows"}``."""
    workload = _meta_workload(config, dtype)
    weights = config.variable == "weights"
    if weights:
        workload.model.requires_grad_(True)
    x = workload.latent.clone().requires_grad_(not weights)
    network = profile_call(workload.network, x, workload.timestep)
    reward = profile_call(workload.reward, workload.latent.clone().requires_grad_(True))
    if workload.reward_as_run is not workload.reward:  # checkpointed decoder: saves little, recomputes in backward
        recomputed = profile_call(workload.reward_as_run, workload.latent.clone().requires_grad_(True))
        reward = CallProfile(
            recomputed.saved_bytes,
            reward.forward_flops,
            reward.backward_flops + reward.forward_flops,
            reward.input_bytes,
            peak_bytes=reward.saved_bytes + recomputed.saved_bytes,
        )
    param_bytes = sum(p.numel() * p.element_size() for p in workload.model.parameters())
    rows = []
    for steps in config.step_counts:
        nograd_flops = steps * network.forward_flops + reward.forward_flops
        for name in config.method_names:
            options = config.method_options(generator=torch.Generator().manual_seed(config.seed))
            label = name
            if name == AUTO:  # the method --method auto would choose here, planned like the others
                name, options = _auto_choice(config, workload.built, steps, options)
                label = f"{AUTO} ({name})"
            plan = plan_any(name, options, steps, network, reward, nograd_flops)
            if plan is None:
                continue
            plan = replace(plan, method=label)
            trained = param_bytes if weights and plan.saved_bytes else 0
            rows.append(asdict(plan) | {"param_bytes": param_bytes, "grad_and_optimizer_bytes": 3 * trained})
    return {
        "config": asdict(config),
        "profiles": {"network": asdict(network), "reward": asdict(reward)},
        "rows": rows,
    }


def _auto_choice(config: BenchConfig, workload: Workload, steps: int, options) -> tuple[str, object]:
    """``(method, options)`` that ``sdo.app.auto`` chooses for ``config``'s meta ``workload`` at ``steps``."""
    from sdo.app.auto import choose_for_bench, with_row_options

    choice = choose_for_bench(config, workload, steps)
    return choice.method, with_row_options(options, choice.options)


def format_plan(plan: dict) -> str:
    """Markdown table of a plan."""
    headers = (
        "steps",
        "method",
        "predicted peak activations",
        "saved activations (CPU figure)",
        "GFLOP / iter",
        "time vs nograd",
        "weights: grads + Adam",
    )
    rows = [
        [
            r["steps"],
            r["method"],
            mebibytes(r["peak_activation_bytes"]),
            mebibytes(r["saved_bytes"]),
            f"{r['flops'] / 1e9:.1f}",
            f"{r['relative_time']:.2f}x",
            mebibytes(r["grad_and_optimizer_bytes"]),
        ]
        for r in plan["rows"]
    ]
    return markdown_table(headers, rows)
