"""Turn the outputs of benchmarks/run_gpu.sh into the GPU table of BENCHMARKS.md.

Usage: python benchmarks/gpu_report.py [benchmarks/results/gpu]

Prints: the card, one row per (run, steps, method) with seconds per iteration, first-iteration seconds (compile
included for compiled rows), peak memory (CUDA max allocated) and the plan's prediction, then the ratios the issue
asks for: sdo/nograd, sdo/checkpointed and compiled/eager (same process, same card).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RUNS = ("sd15-50", "sd15-50-compiled", "sd15-full", "sd15-50-lowmem")


def _rows(out: Path, name: str) -> list[dict]:
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else []


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def main(out: Path) -> str:
    card = (out / "gpu.csv").read_text().strip().splitlines()[-1] if (out / "gpu.csv").is_file() else "unknown card"
    plan_path = out / "plan" / "plan.json"
    plan = {}
    if plan_path.is_file():
        plan = {(r["method"], r["steps"]): r for r in json.loads(plan_path.read_text())["rows"]}
    lines = [
        f"Card: {card}",
        "",
        "| run | steps | method | s / iter | first iter s | peak memory (CUDA) | planned activations |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    seconds: dict[tuple[str, int, str], float] = {}
    for run in RUNS:
        for r in _rows(out, run):
            seconds[(run, r["steps"], r["method"])] = r["s_per_iter"]
            planned = plan.get((r["method"].removesuffix("+compile"), r["steps"]))
            planned_text = f"{planned['peak_activation_bytes'] / 2**30:.2f} GiB" if planned else ""
            lines.append(
                f"| {run} | {r['steps']} | {r['method']} | {r['s_per_iter']:.3f} | {r.get('first_iter_s', 0):.1f} "
                f"| {r['peak_mem_bytes'] / 2**30:.2f} GiB | {planned_text} |"
            )
    ratios = {
        "sdo / nograd (50 steps, eager)": (("sd15-50", "sdo"), ("sd15-50", "nograd")),
        "sdo / checkpointed (50 steps)": (("sd15-50", "sdo"), ("sd15-50", "checkpointed")),
        "compiled / eager sdo (50 steps)": (("sd15-50-compiled", "sdo+compile"), ("sd15-50-compiled", "sdo")),
        "compiled / eager nograd (50 steps)": (("sd15-50-compiled", "nograd+compile"), ("sd15-50-compiled", "nograd")),
        "compiled sdo / eager nograd (50 steps)": (
            ("sd15-50-compiled", "sdo+compile"),
            ("sd15-50-compiled", "nograd"),
        ),
    }
    lines.append("")
    for label, ((run_a, a), (run_b, b)) in ratios.items():
        lines.append(f"- {label}: {_ratio(seconds.get((run_a, 50, a)), seconds.get((run_b, 50, b)))}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(main(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/gpu")))
