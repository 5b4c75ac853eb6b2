"""BENCHMARKS.md's blocks of ``benchmarks/run_cpu.sh``'s demo and latent optimization runs (``sdo demo``,
``sdo optimize --method sdo,full`` at step 0 and step 40)."""

from __future__ import annotations

import statistics
from functools import partial
from pathlib import Path

from sdo.app.report import markdown_table, mebibytes
from sdo.app.report.blocks import MEMORY, block, load

__all__ = ["demo_table", "optimize_table"]


def demo_table(out: Path) -> str:
    runs = [load(out / f"demo-{i}" / "metrics.json") for i in (1, 2, 3)]
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
        summaries = load(out / f"{prefix}-{task}" / "metrics.json")["methods"]
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


block("demo")(demo_table)
block("latent-step0")(partial(optimize_table, prefix="compare"))
block("latent-step40")(partial(optimize_table, prefix="compare-late"))
