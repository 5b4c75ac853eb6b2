"""Turn the outputs of benchmarks/run_cpu.sh into the markdown tables of BENCHMARKS.md.

Usage: python benchmarks/report.py [benchmarks/results/cpu]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from sdo.app.report import markdown_table, mebibytes


def _load(path: Path):
    return json.loads(path.read_text())


MEMORY = "extra memory (CPU: saved activations)"


def demo_table(out: Path) -> str:
    runs = [_load(out / f"demo-{i}" / "metrics.json") for i in (1, 2, 3)]
    walls = [float((out / f"demo-{i}.wall").read_text().split()[-1]) for i in (1, 2, 3)]
    headers = (
        "method",
        "reward start -> final",
        "judge success start -> final",
        "s / iter (median of 3 runs)",
        MEMORY,
    )
    rows = []
    for name in ("sdo", "full"):
        m = runs[0]["methods"][name]
        seconds = statistics.median(r["methods"][name]["s_per_iter"] for r in runs)
        judge = f"{m['judge_success_initial']:.0%} -> {m['judge_success']:.0%}"
        rewards = f"{m['reward_initial']:.2f} -> {m['reward_final']:.3f}"
        rows.append([name, rewards, judge, f"{seconds:.3f}", mebibytes(m["peak_mem_bytes"], 0)])
    ratio = statistics.median(r["s_per_iter_sdo_over_full"] for r in runs)
    memory = runs[0]["peak_mem_sdo_over_full"]
    ratios = ", ".join(f"{r['s_per_iter_sdo_over_full']:.2f}" for r in runs)
    wall = statistics.median(walls)
    summary = (
        f"SDO / full: {ratio:.2f}x seconds per iteration (runs: {ratios}), {memory:.3f}x saved-activation memory. "
        f"Whole `sdo demo` command: median {wall:.1f} s wall-clock (runs: {', '.join(f'{w:.1f}' for w in walls)})."
    )
    return f"{markdown_table(headers, rows)}\n\n{summary}"


def optimize_table(out: Path, prefix: str = "compare") -> str:
    headers = (
        "task",
        "method",
        "reward start -> final",
        "judge success start -> final",
        "s / iter",
        MEMORY,
        "sdo/full time",
        "sdo/full memory",
        "reward within 5% of full",
    )
    rows = []
    for task in ("class", "style", "adversarial"):
        summaries = _load(out / f"{prefix}-{task}" / "metrics.json")["methods"]
        sdo, full = summaries["sdo"], summaries["full"]
        reward_ok = sdo["reward_final"] >= full["reward_final"] - 0.05 * abs(full["reward_final"])
        ratios = [
            f"{sdo['s_per_iter'] / full['s_per_iter']:.2f}",
            f"{sdo['peak_mem_bytes'] / full['peak_mem_bytes']:.3f}",
            "yes" if reward_ok else "no",
        ]
        for name, s in summaries.items():
            rewards = f"{s['reward_initial']:.3f} -> {s['reward_final']:.3f}"
            judge = f"{s['judge_success_initial']:.0%} -> {s['judge_success']:.0%}"
            cells = [task, name, rewards, judge, f"{s['s_per_iter']:.2f}", mebibytes(s["peak_mem_bytes"], 0)]
            rows.append(cells + (ratios if name == "sdo" else ["", "", ""]))
    return markdown_table(headers, rows)


def bench_table(out: Path, name: str) -> str:
    result = _load(out / name / "bench.json")
    headers = (
        "steps",
        "method",
        "s / iter",
        MEMORY,
        "reward start -> final",
        "reward at equal time",
        "grad cosine",
        "harness overhead",
    )
    rows = []
    for r in result["rows"]:
        cosine = "" if r["grad_cosine"] is None else f"{r['grad_cosine']:.3f}"
        rewards = f"{r['reward_initial']:.3f} -> {r['reward_final']:.3f}"
        rows.append(
            [
                r["steps"],
                r["method"],
                f"{r['s_per_iter']:.3f}",
                mebibytes(r["peak_mem_bytes"]),
                rewards,
                f"{r['reward_at_equal_time']:.3f}",
                cosine,
                f"{r['harness_overhead']:.2%}",
            ]
        )
    lines = [markdown_table(headers, rows)]
    if result["cosine_sweep"]:
        lines += ["", "Cosine of `Shortcut(step=i)`'s gradient with `Full`'s, by kept step i:", ""]
        for steps in sorted({p["steps"] for p in result["cosine_sweep"]}):
            points = [p for p in result["cosine_sweep"] if p["steps"] == steps]
            lines.append(
                f"- {steps} steps: " + ", ".join(f"i={p['kept_step']}: {p['grad_cosine']:.3f}" for p in points)
            )
    return "\n".join(lines)


def finetune_table(out: Path, task: str) -> str:
    headers = (
        "method",
        "reward, first 5 updates (mean)",
        "reward, last 5 updates (mean)",
        "held-out judge accuracy (after 20 -> 40 updates)",
        "Frechet distance (after 20 -> 40)",
    )
    rows = []
    for method in ("sdo", "draft-1", "alignprop"):
        lines = (out / f"finetune-{task}-{method}" / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        first = statistics.mean(r["reward"] for r in records[:5])
        last = statistics.mean(r["reward"] for r in records[-5:])
        mid, end = next(r for r in records if r["step"] == 20), records[-1]
        rows.append(
            [
                method,
                f"{first:.3f}",
                f"{last:.3f}",
                f"{mid['judge_accuracy']:.0%} -> {end['judge_accuracy']:.0%}",
                f"{mid['frechet_judge']:.2f} -> {end['frechet_judge']:.2f}",
            ]
        )
    return markdown_table(headers, rows)


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
