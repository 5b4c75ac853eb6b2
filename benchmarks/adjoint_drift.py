"""How far the discrete adjoint drifts, and how much stored states help (``sdo.Adjoint``; AdjointDPM, Pan et al.,
ICLR 2024, arXiv 2307.10711).

``sdo.Adjoint`` rebuilds each state of the sampling chain backward from the next one by an inverse solver step
refined by ``n`` fixed-point iterations; the errors of those rebuilds accumulate along the backward walk (the drift),
and the gradient is exact only where they vanish. ``checkpoint_every=k`` stores ``x_0, x_k, x_2k, ...`` in forward
and rebuilds only between stored states, so that each rebuilt state carries at most ``k - 1`` inversions' drift,
for ``ceil(S / k) + 1`` stored latents.

On the embedded model's class task (4 samples of class 3 from seed 0, reward ``log p(8)`` of the reward classifier,
DDIM with eta 0 and guidance 3), for every number of steps ``S``, of refinements ``n`` and ``k`` (none: no stored
state), this measures the cosine and relative error of the adjoint's latent gradient against the exact one
(``sdo.Checkpointed()``), the maximum and mean over segments of the relative reconstruction error
(``Adjoint.stats.segment_errors``: each segment's first state rebuilt from its end, against the stored one), the
stored latents and the network calls per step, counted by a wrapper around the model function and checked against
the formula ``2 S + (1 + n) R`` (a forward and a VJP call per step, ``1 + n`` per rebuilt state ``R``, including each
segment's check). Nothing is timed.

Usage: python benchmarks/adjoint_drift.py OUT [--steps 10,20,50] [--refinements 0,2,8] [--every none,10,5]
Writes OUT/adjoint-drift.json and OUT/adjoint-drift.md; ``sdo.app.report.chains.drift_table(OUT)`` remakes the
table from the JSON.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import sdo
from sdo.app.report import machine_info, markdown_table
from sdo.app.report.chains import DRIFT_HEADERS, DRIFT_JSON, drift_table, format_drift_row
from sdo.app.tasks.latent import LatentTaskConfig, build_task, load_resources
from sdo.io import atomic_path, save_json

TABLE_NAME = "adjoint-drift.md"


class CountedModelFn:
    """``model_fn`` that counts its calls (and declares the same ``prediction_type`` and ``model``)."""

    def __init__(self, model_fn) -> None:
        self.model_fn, self.calls = model_fn, 0
        self.prediction_type = getattr(model_fn, "prediction_type", "epsilon")
        self.model = getattr(model_fn, "model", None)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.model_fn(x, t)


def rebuilt_states(steps: int, every: int | None) -> int:
    """States the backward walk rebuilds over ``steps`` steps: all of them without stored states; with them, per
    segment of ``L >= 2`` steps its ``L - 1`` inner states and one check of its stored start (none for ``L = 1``)."""
    if every is None:
        return steps
    return sum(length for length in (min(every, steps - s) for s in range(0, steps, every)) if length > 1)


def expected_calls(steps: int, refinements: int, every: int | None) -> int:
    """Network calls of one forward + backward: ``2 S + (1 + n) R`` (``rebuilt_states`` for ``R``)."""
    return 2 * steps + (1 + refinements) * rebuilt_states(steps, every)


def latent_gradient(task, mode: sdo.GradientMode) -> tuple[torch.Tensor, int]:
    """d(sum of rewards)/d latent with ``mode``, and the network calls it took."""
    counted = CountedModelFn(task.sampler.model_fn)
    sampler = task.sampler.with_options(model_fn=counted)
    z = task.latent.detach().clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(task.reward(sampler.sample(z, grad=mode), None).sum(), z)
    return gradient.double().flatten(), counted.calls


def measure(task, exact: torch.Tensor, steps: int, refinements: int, every: int | None) -> dict:
    """One row: the adjoint's latent gradient against ``exact``, its drift, memory and calls."""
    mode = sdo.Adjoint(fixed_point_iters=refinements, checkpoint_every=every)
    gradient, calls = latent_gradient(task, mode)
    expected = expected_calls(steps, refinements, every)
    if calls != expected:
        raise AssertionError(f"counted {calls} network calls, the formula says {expected} ({steps=}, {every=})")
    errors = mode.stats.segment_errors
    return {
        "steps": steps,
        "refinements": refinements,
        "checkpoint_every": every,
        "cosine": float(torch.nn.functional.cosine_similarity(gradient, exact, dim=0)),
        "relative_error": float((gradient - exact).norm() / exact.norm()),
        "reconstruction_max": mode.stats.reconstruction_error,
        "reconstruction_mean": sum(errors) / len(errors) if errors else 0.0,
        "stored_latents": mode.stats.stored_states,
        "network_calls": calls,
        "calls_per_step": calls / steps,
    }


def run_steps(steps: int, args: argparse.Namespace, resources) -> list[dict]:
    """Every (refinements, checkpoint_every) row at ``steps`` steps, against one exact gradient."""
    config = LatentTaskConfig(task="class", source=3, target=8, batch=args.batch, seed=args.seed, steps=steps)
    task = build_task(config, resources)
    exact, _ = latent_gradient(task, sdo.Checkpointed())
    rows = []
    for refinements in args.refinements:
        for every in args.every:
            rows.append(measure(task, exact, steps, refinements, every))
            print("| " + " | ".join(format_drift_row(rows[-1])) + " |", flush=True)
    return rows


def int_list(text: str) -> list[int]:
    """``"10,20"`` as ``[10, 20]``."""
    return [int(part) for part in text.split(",")]


def every_list(text: str) -> list[int | None]:
    """``"none,10,5"`` as ``[None, 10, 5]``."""
    return [None if part.strip().lower() == "none" else int(part) for part in text.split(",")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output folder")
    parser.add_argument("--steps", type=int_list, default=[10, 20, 50], help="sampling steps S (comma-separated)")
    parser.add_argument("--refinements", type=int_list, default=[0, 2, 8], help="fixed-point refinements n")
    parser.add_argument("--every", type=every_list, default=[None, 10, 5], help="checkpoint_every k ('none': off)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    torch.manual_seed(args.seed)
    resources = load_resources(LatentTaskConfig())
    print(markdown_table(DRIFT_HEADERS, []))
    rows = [row for steps in args.steps for row in run_steps(steps, args, resources)]
    save_json({"machine": machine_info(torch.device("cpu")), "args": vars(args), "rows": rows}, out / DRIFT_JSON)
    with atomic_path(out / TABLE_NAME) as tmp:
        tmp.write_text(drift_table(out) + "\n")
    print(drift_table(out))


if __name__ == "__main__":
    main()
