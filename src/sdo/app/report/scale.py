"""BENCHMARKS.md's blocks of ``benchmarks/run_scale.sh``: the compiled chain, items across processes, and the
plans of ``sdo bench --plan`` against measurements."""

from __future__ import annotations

import statistics
from pathlib import Path

from sdo.app.report import markdown_table, mebibytes
from sdo.app.report.blocks import GIB, block, fill, load

__all__ = ["PLAN_METHODS", "PLAN_STEPS", "PLAN_WORKLOADS", "SCALE_RUNS"]


def _first_seconds(value: float) -> str:
    return f"{value:.1f} s" if value >= 10 else f"{value:.2f} s"


@block("scale-compile")
def scale_compile_block(out: Path) -> str:
    result = load(out / "scale" / "compile" / "bench.json")
    rows = {r["method"]: r for r in result["rows"]}
    iters = result["config"]["iters"]
    headers = ("method", f"s / iter (median of {iters})", "first iteration", "final reward")
    table = []
    for name, r in rows.items():
        eager = rows.get(name.removesuffix("+compile"))
        seconds = f"{r['s_per_iter']:.3f}"
        if name.endswith("+compile") and eager is not None:
            seconds += f" ({r['s_per_iter'] / eager['s_per_iter']:.2f}x)"
        reward = "" if name.startswith("nograd") else f"{r['reward_final']:.3f}"
        table.append([name, seconds, _first_seconds(r["first_iter_s"]), reward])
    sdo, sdo_c = rows["sdo"], rows["sdo+compile"]
    nograd, nograd_c = rows["nograd"], rows["nograd+compile"]
    compile_s = sdo_c["first_iter_s"] - sdo_c["s_per_iter"]
    saved = sdo["s_per_iter"] - sdo_c["s_per_iter"]
    pays = f"after about {compile_s / saved:.0f} iterations of this size" if saved > 0 else "never at this size"
    bullets = [
        f"- Compile time: about {compile_s:.0f} s (the first compiled sdo iteration less its median), paid once per "
        f"network. `nograd+compile`'s first iteration took {_first_seconds(nograd_c['first_iter_s'])}: the "
        "compiled graph is shared by every sampler over the same module.",
        f"- Steady-state speed-up on CPU: {sdo_c['s_per_iter'] / sdo['s_per_iter']:.2f}x seconds per iteration for "
        f"sdo, {nograd_c['s_per_iter'] / nograd['s_per_iter']:.2f}x for nograd.",
        f"- Compiled sdo costs {sdo_c['s_per_iter'] / nograd['s_per_iter']:.2f}x eager nograd.",
        f"- Final rewards: eager {sdo['reward_final']:.3f}, compiled {sdo_c['reward_final']:.3f}; "
        "`tests/test_compiled.py` checks samples and gradients against eager.",
        f"- On CPU the compile pays for itself {pays}.",
    ]
    return markdown_table(headers, table) + "\n\n" + "\n".join(fill(b, bullet=True) for b in bullets)


SCALE_RUNS = (1, 2, 3)


def _wall(path: Path) -> float:
    return float(path.read_text().split()[-1])


def _slowest_rank_seconds(summary: dict) -> float:
    """The largest sum of per-item seconds over the processes (items are sharded as index % processes)."""
    processes = summary["processes"]
    sums = [0.0] * processes
    for item in summary["per_item"]:
        sums[item["index"] % processes] += item["seconds"]
    return max(sums)


@block("scale-processes")
def scale_processes_block(out: Path) -> str:
    folder = out / "scale" / "processes"
    rows, ratios, phases, one_sums, two_sums, differences = [], [], [], [], [], []
    for run in SCALE_RUNS:
        one, two = _wall(folder / f"run-{run}-1proc.wall"), _wall(folder / f"run-{run}-2proc.wall")
        ratios.append(two / one)
        rows.append([run, f"{one:.1f}", f"{two:.1f}", f"{two / one:.2f}"])
        s1 = load(folder / f"run-{run}-1proc" / "summary.json")
        s2 = load(folder / f"run-{run}-2proc" / "summary.json")
        one_sums.append(_slowest_rank_seconds(s1))
        two_sums.append(_slowest_rank_seconds(s2))
        phases.append(two_sums[-1] / one_sums[-1])
        finals = {r["index"]: r["reward_final"] for r in s1["per_item"]}
        differences += [abs(r["reward_final"] - finals[r["index"]]) for r in s2["per_item"]]
    median = statistics.median(ratios)
    met = "met" if median <= 0.6 else "not met"
    bullets = [
        f"- Median ratio: {median:.2f}. **The 0.6x target was {met}.**",
        f"- The item phase alone reached {min(phases):.2f} to {max(phases):.2f}. The slowest process's sum of "
        f"per-item seconds was {min(two_sums):.0f} to {max(two_sums):.0f} s for 2 processes, against "
        f"{min(one_sums):.0f} to {max(one_sums):.0f} s for 1 process.",
        f"- Per-item final rewards of the 1-process and 2-process runs differ by at most {max(differences):.1g}.",
    ]
    headers = ("run", "1 process (s)", "2 processes (s)", "ratio")
    return markdown_table(headers, rows) + "\n\n" + "\n".join(fill(b, bullet=True) for b in bullets)


PLAN_WORKLOADS = {"mnist": "mnist", "sd15-tiny": "sd15 tiny"}
PLAN_STEPS = 4
PLAN_METHODS = ("sdo", "full", "checkpointed")


@block("scale-plan-vs-measured")
def scale_plan_vs_measured_block(out: Path) -> str:
    headers = (
        "workload",
        "steps",
        "method",
        "planned saved activations",
        "measured (CPU figure)",
        "planned / measured time vs nograd",
    )
    rows, gaps = [], []
    for folder, label in PLAN_WORKLOADS.items():
        plan = {(r["method"], r["steps"]): r for r in load(out / "scale" / f"plan-{folder}" / "plan.json")["rows"]}
        measured = {
            (r["method"], r["steps"]): r for r in load(out / "scale" / f"measured-{folder}" / "bench.json")["rows"]
        }
        floor = measured[("nograd", PLAN_STEPS)]["s_per_iter"]
        for method in PLAN_METHODS:
            p, m = plan[(method, PLAN_STEPS)], measured[(method, PLAN_STEPS)]
            gaps.append(abs(p["saved_bytes"] / m["peak_mem_bytes"] - 1))
            rows.append(
                [
                    label,
                    PLAN_STEPS,
                    method,
                    mebibytes(p["saved_bytes"], 2),
                    mebibytes(m["peak_mem_bytes"], 2),
                    f"{p['relative_time']:.2f} / {m['s_per_iter'] / floor:.2f}",
                ]
            )
    summary = fill(
        f"- Memory agrees within {max(gaps):.0%} everywhere. `tests/test_plan.py` asserts a factor of 1.25.",
        bullet=True,
    )
    return markdown_table(headers, rows) + "\n\n" + summary


@block("scale-plan-full-size")
def scale_plan_full_size_block(out: Path) -> str:
    plain = load(out / "scale" / "plan-sd15" / "plan.json")
    lowmem = load(out / "scale" / "plan-sd15-lowmem" / "plan.json")
    rows = {(r["method"], r["steps"]): r for r in plain["rows"]}
    few, many = sorted({steps for _, steps in rows})[0], sorted({steps for _, steps in rows})[-1]
    kept = {(r["method"], r["steps"]): r for r in lowmem["rows"]}[("sdo", many)]
    sdo_sizes = {rows[("sdo", s)]["peak_activation_bytes"] for s in (few, many)}
    steps_note = "whatever the number of steps" if len(sdo_sizes) == 1 else f"at {many} steps"

    def gib(value: float, digits: int = 1) -> str:
        return f"{value / GIB:.{digits}f} GiB"

    bullets = [
        "- Full-size plan for SD-1.5 (`sdo bench --plan --model sd15 --device cuda`, bf16, batch 1, CFG):",
        f"  - one UNet call saves {gib(plain['profiles']['network']['saved_bytes'], 2)}, which agrees with the "
        "1.5 GiB per step measured before this project;",
        f"  - the VAE decode saves {gib(plain['profiles']['reward']['saved_bytes'], 2)};",
        f"  - sdo comes to {gib(rows[('sdo', many)]['peak_activation_bytes'])} {steps_note};",
        f"  - full comes to {gib(rows[('full', few)]['peak_activation_bytes'])} at {few} steps and "
        f"{gib(rows[('full', many)]['peak_activation_bytes'], 0)} at {many};",
        f"  - checkpointed peaks at {gib(rows[('checkpointed', many)]['peak_activation_bytes'])}, set by the decoder;",
        f"  - sdo with `--checkpoint-kept --checkpoint-decoder` comes to {gib(kept['peak_activation_bytes'])};",
        f"  - predicted time against nograd at {many} steps: sdo {rows[('sdo', many)]['relative_time']:.2f}x, "
        f"checkpointed {rows[('checkpointed', many)]['relative_time']:.2f}x. These are FLOP ratios, and the GPU "
        "run will test them.",
    ]
    return "\n".join(fill(b, bullet=True).replace("\n  ", "\n    ") if b.startswith("  ") else b for b in bullets)
