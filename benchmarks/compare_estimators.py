"""The paper's comparison on the embedded model: every estimator on the three tasks, both protocols.

For each task (class, style, adversarial) and protocol (initial noise at step 0; the paper's editing protocol,
latent at step 40 of 50 after a no-grad warm-up), every method starts from the same latent and runs the same
number of iterations (FreeDoM: one guided pass). Per method: final reward, judge success, seconds per iteration
(per pass for FreeDoM) and in total, extra memory (CPU: saved activations alive at once), and the cosine of its
first latent gradient with the exact one (``Checkpointed``), where defined.

Usage: python benchmarks/compare_estimators.py OUT [--steps 50] [--iters 8] [--batch 4] [--runs 1]
Writes OUT/compare.json, OUT/compare.md and OUT/compare.png (reward against wall-clock, one panel per task and
protocol).
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from sdo.app.demo import summarize
from sdo.app.plots import save_comparison_plot
from sdo.app.report import machine_info, markdown_table, mebibytes
from sdo.app.tasks.latent import LatentTaskConfig, build_task, run_task
from sdo.io import atomic_path, save_json
from sdo.methods import METHODS, gradient_mode

METHODS_COMPARED = (
    "sdo",
    "sdo-last",
    "sdo-random",
    "sdo-multi",
    "full",
    "checkpointed",
    "adjoint",
    "doodl",
    "freedom",
)
TASKS = ("class", "style", "adversarial")


def first_gradient(config: LatentTaskConfig, task, name: str) -> torch.Tensor:
    """d reward / d latent at the task's latent, with method ``name``'s gradient mode."""
    z = task.latent.detach().clone().requires_grad_(True)
    generator = torch.Generator().manual_seed(config.seed)
    x0 = task.sampler.sample(
        z, grad=gradient_mode(name, config.method_options()), start_step=config.start_step, generator=generator
    )
    (gradient,) = torch.autograd.grad(task.reward(x0, None).sum(), z)
    return gradient.double().flatten()


def cosines(config: LatentTaskConfig, task) -> dict[str, float]:
    exact = first_gradient(config, task, "checkpointed")
    return {
        name: float(torch.nn.functional.cosine_similarity(first_gradient(config, task, name), exact, dim=0))
        for name in METHODS_COMPARED
        if METHODS[name].kind == "mode"
    }


def run_case(base: LatentTaskConfig, runs: int) -> dict:
    task = build_task(base)
    rows, histories = {}, {}
    for name in METHODS_COMPARED:
        summaries = []
        for _ in range(runs):
            result = run_task(replace(base, method=name), task, progress=False)
            summaries.append(summarize(result.history))
        row = dict(summaries[0])
        row["s_per_iter"] = statistics.median(s["s_per_iter"] for s in summaries)
        row["total_s"] = row["s_per_iter"] * max(row["iters"], 1)
        rows[name] = row
        histories[name] = [{k: r[k] for k in ("iter", "reward", "elapsed")} for r in result.history]
        print(f"  {name}: {row['reward_initial']:.3f} -> {row['reward_final']:.3f}, {row['s_per_iter']:.2f} s/iter")
    for name, cosine in cosines(base, task).items():
        rows[name]["grad_cosine"] = cosine
    return {"task": task.description, "rows": rows, "histories": histories}


def table(cases: dict) -> str:
    headers = (
        "task",
        "protocol",
        "method",
        "reward start -> final",
        "judge success start -> final",
        "s / iter (FreeDoM: per pass)",
        "total s",
        "extra memory (CPU: saved activations)",
        "grad cosine",
    )
    lines = []
    for key, case in cases.items():
        task, protocol = key.split("/")
        for name, r in case["rows"].items():
            judge = f"{r['judge_success_initial']:.0%} -> {r['judge_success']:.0%}"
            cosine = f"{r['grad_cosine']:.3f}" if "grad_cosine" in r else ""
            lines.append(
                [
                    task,
                    protocol,
                    name,
                    f"{r['reward_initial']:.3f} -> {r['reward_final']:.3f}",
                    judge,
                    f"{r['s_per_iter']:.2f}",
                    f"{r['total_s']:.1f}",
                    mebibytes(r["peak_mem_bytes"], 0),
                    cosine,
                ]
            )
    return markdown_table(headers, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--late-step", type=int, default=40)
    args = parser.parse_args()
    out = Path(args.out)
    cases = {}
    for task in TASKS:
        for protocol, start in (("noise", 0), ("edit", args.late_step)):
            print(f"{task} / {protocol}")
            base = LatentTaskConfig(
                task=task,
                source=3,
                steps=args.steps,
                iters=args.iters,
                batch=args.batch,
                start_step=start,
                out=str(out),
            )
            cases[f"{task}/{protocol}"] = run_case(base, args.runs)
            save_json(
                {"machine": machine_info(torch.device("cpu")), "args": vars(args), "cases": cases},
                out / "compare.json",
            )
    with atomic_path(out / "compare.md") as tmp:
        tmp.write_text(table(cases) + "\n")
    save_comparison_plot(cases, out / "compare.png")
    print(table(cases))


if __name__ == "__main__":
    main()
