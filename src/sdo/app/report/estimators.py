"""BENCHMARKS.md's blocks of ``sdo bench``'s runs: the estimators on latents and on weights
(``benchmarks/run_cpu.sh``), the SD-1.5-sized estimators, and the sampler's overhead
(``benchmarks/sampler_overhead.py``)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from sdo.app.report import markdown_table, mebibytes
from sdo.app.report.blocks import MEMORY, block, fill, load

__all__ = ["bench_table", "method_label"]


def method_label(row: dict) -> str:
    """A stored row's method name as it reads today: a row made by sdo's former ``alignprop`` (its gradient mode a
    ``RandomTruncation``) is ``random-truncation`` now that ``alignprop`` follows the official code."""
    former = row["method"] == "alignprop" and str(row.get("mode", "")).startswith("RandomTruncation")
    return "random-truncation" if former else row["method"]


def _optional(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def bench_table(out: Path, name: str) -> str:
    """``sdo bench``'s table: cost, memory, reward, and the reward at 25/50/100% of its time reference (iterate k
    credited at t_k), by steps and method."""
    result = load(out / name / "bench.json")
    if {r["time_reference"] for r in result["rows"]} != {"full"}:
        raise ValueError(f"{name}: the equal-time columns need `full` among the methods")
    headers = (
        "steps",
        "method",
        "s / iter",
        MEMORY,
        "reward start -> final",
        "reward at 25% / 50% / 100% of full's time",
        "grad cosine",
        "harness overhead",
    )
    rows = []
    for r in result["rows"]:
        rewards = f"{r['reward_initial']:.3f} -> {r['reward_final']:.3f}"
        at_time = " / ".join(_optional(r[f"reward_at_{pct}pct_time"]) for pct in (25, 50, 100))
        rows.append(
            [
                r["steps"],
                method_label(r),
                f"{r['s_per_iter']:.3f}",
                mebibytes(r["peak_mem_bytes"]),
                rewards,
                at_time,
                _optional(r["grad_cosine"]),
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


block("estimators-latents")(partial(bench_table, name="bench-latent"))
block("estimators-weights")(partial(bench_table, name="bench-weights"))


@block("sampler-overhead")
def sampler_overhead_block(out: Path) -> str:
    line = (out / "sampler-overhead.txt").read_text().strip()
    return (
        f"- **Sampler overhead**: {line} (DDIM 50 steps, batch 8, guidance 3; "
        "`python benchmarks/sampler_overhead.py`). The target was under 5%."
    )


def _seconds(value: float) -> str:
    return f"{value:.1f}" if value >= 1 else f"{value:.2f}"


@block("sd15-small-estimators")
def sd15_small_estimators_block(out: Path) -> str:
    result = load(out / "sd15-small-estimators" / "bench.json")
    rows = {r["method"]: r for r in result["rows"]}
    memory = ", ".join(
        f"{name} {mebibytes(r['peak_mem_bytes'])}" if r["peak_mem_bytes"] else f"{name} 0" for name, r in rows.items()
    )
    seconds = ", ".join(f"{name} {_seconds(r['s_per_iter'])}" for name, r in rows.items())
    text = (
        f"Memory (saved activations alive at once): {memory}. Adjoint's gradient cosine with the exact one is "
        f"{rows['adjoint']['grad_cosine']:.3f} here ({rows['sdo']['grad_cosine']:.3f} for sdo). Its seconds per "
        f"iteration ({seconds}) are medians of {result['config']['iters']} iterations that include the first one, "
        "on the loaded machine: read them as an order, not as ratios."
    )
    return fill(text)
