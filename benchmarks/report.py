"""Turn the outputs of benchmarks/run_cpu.sh into the markdown tables of BENCHMARKS.md.

Usage: python benchmarks/report.py [benchmarks/results/cpu]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def _load(path: Path):
    return json.loads(path.read_text())


def demo_table(out: Path) -> str:
    runs = [_load(out / f"demo-{i}" / "metrics.json") for i in (1, 2, 3)]
    walls = [float((out / f"demo-{i}.wall").read_text().split()[-1]) for i in (1, 2, 3)]
    lines = [
        "| method | reward start -> final | judge success start -> final | s / iter (median of 3 runs) "
        "| peak extra memory |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in ("sdo", "full"):
        m = runs[0]["methods"][name]
        seconds = statistics.median(r["methods"][name]["s_per_iter"] for r in runs)
        lines.append(
            f"| {name} | {m['reward_initial']:.2f} -> {m['reward_final']:.3f} | {m['judge_success_initial']:.0%} -> "
            f"{m['judge_success']:.0%} | {seconds:.3f} | {m['peak_mem_bytes'] / 2**20:.0f} MiB |"
        )
    ratio = statistics.median(r["s_per_iter_sdo_over_full"] for r in runs)
    memory = runs[0]["peak_mem_sdo_over_full"]
    lines.append("")
    ratios = ", ".join(f"{r['s_per_iter_sdo_over_full']:.2f}" for r in runs)
    wall = statistics.median(walls)
    lines.append(
        f"SDO / full: {ratio:.2f}x seconds per iteration (runs: {ratios}), {memory:.3f}x peak memory. Whole "
        f"`sdo demo` command: median {wall:.1f} s wall-clock (runs: {', '.join(f'{w:.1f}' for w in walls)})."
    )
    return "\n".join(lines)


def optimize_table(out: Path, prefix: str = "compare") -> str:
    lines = [
        "| task | method | reward start -> final | judge success start -> final | s / iter | peak extra memory "
        "| sdo/full time | sdo/full memory | reward within 5% of full |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for task in ("class", "style", "adversarial"):
        summaries = _load(out / f"{prefix}-{task}" / "metrics.json")["methods"]
        sdo, full = summaries["sdo"], summaries["full"]
        time_ratio = sdo["s_per_iter"] / full["s_per_iter"]
        memory_ratio = sdo["peak_mem_bytes"] / full["peak_mem_bytes"]
        reward_ok = sdo["reward_final"] >= full["reward_final"] - 0.05 * abs(full["reward_final"])
        for name, s in summaries.items():
            extra = (
                f"| {time_ratio:.2f} | {memory_ratio:.3f} | {'yes' if reward_ok else 'no'} |"
                if name == "sdo"
                else "| | | |"
            )
            lines.append(
                f"| {task} | {name} | {s['reward_initial']:.3f} -> {s['reward_final']:.3f} | "
                f"{s['judge_success_initial']:.0%} -> {s['judge_success']:.0%} | {s['s_per_iter']:.2f} | "
                f"{s['peak_mem_bytes'] / 2**20:.0f} MiB {extra}"
            )
    return "\n".join(lines)


def bench_table(out: Path, name: str) -> str:
    result = _load(out / name / "bench.json")
    lines = [
        "| steps | method | s / iter | peak extra memory | reward start -> final | reward at equal time | grad cosine "
        "| harness overhead |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        cosine = "" if r["grad_cosine"] is None else f"{r['grad_cosine']:.3f}"
        lines.append(
            f"| {r['steps']} | {r['method']} | {r['s_per_iter']:.3f} | {r['peak_mem_bytes'] / 2**20:.1f} MiB | "
            f"{r['reward_initial']:.3f} -> {r['reward_final']:.3f} | {r['reward_at_equal_time']:.3f} | {cosine} | "
            f"{r['harness_overhead']:.2%} |"
        )
    if result["cosine_sweep"]:
        lines += ["", "Cosine of `Shortcut(step=i)`'s gradient with `Full`'s, by kept step i:", ""]
        for steps in sorted({p["steps"] for p in result["cosine_sweep"]}):
            points = [p for p in result["cosine_sweep"] if p["steps"] == steps]
            lines.append(
                f"- {steps} steps: " + ", ".join(f"i={p['kept_step']}: {p['grad_cosine']:.3f}" for p in points)
            )
    return "\n".join(lines)


def finetune_table(out: Path, task: str) -> str:
    lines = [
        "| method | reward, first 5 updates (mean) | reward, last 5 updates (mean) | held-out judge accuracy "
        "(after 20 -> 40 updates) | Frechet distance (after 20 -> 40) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for method in ("sdo", "draft-1", "alignprop"):
        records = [
            json.loads(line) for line in (out / f"finetune-{task}-{method}" / "metrics.jsonl").read_text().splitlines()
        ]
        first = statistics.mean(r["reward"] for r in records[:5])
        last = statistics.mean(r["reward"] for r in records[-5:])
        mid, end = next(r for r in records if r["step"] == 20), records[-1]
        lines.append(
            f"| {method} | {first:.3f} | {last:.3f} | {mid['judge_accuracy']:.0%} -> {end['judge_accuracy']:.0%} | "
            f"{mid['frechet_judge']:.2f} -> {end['frechet_judge']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/cpu")
    sections = {
        "Demo": demo_table,
        "Latent optimization, DDIM 50 steps, latent at step 0": optimize_table,
        "Latent optimization, DDIM 50 steps, latent at step 40": lambda o: optimize_table(o, "compare-late"),
        "Estimators on latents": lambda o: bench_table(o, "bench-latent"),
        "Estimators on weights (fine-tuning workload), 50 steps": lambda o: bench_table(o, "bench-weights"),
        "Fine-tuning, 40 updates, task confidence": lambda o: finetune_table(o, "confidence"),
        "Fine-tuning, 40 updates, task bold": lambda o: finetune_table(o, "bold"),
    }
    for title, make in sections.items():
        try:
            print(f"### {title}\n\n{make(out)}\n")
        except FileNotFoundError as error:
            print(f"### {title}\n\n(missing: {error.filename})\n")


if __name__ == "__main__":
    main()
