"""The generated blocks of BENCHMARKS.md, from the stored outputs of the benchmark scripts.

Every table and every generated summary line of BENCHMARKS.md sits between a marker pair::

    <!-- generated: NAME -->
    ...
    <!-- /generated -->

and ``NAME`` is a generator registered in ``BLOCKS`` (``@block("NAME")``): a function of the results folder
(``benchmarks/results/cpu`` by default) that returns the block's markdown from the files stored there, and raises
``FileNotFoundError`` when one is missing. A block whose outputs are missing is an error, never a skip.

Usage:
    python benchmarks/report.py [RESULTS]                          print every block
    python benchmarks/report.py [RESULTS] --write BENCHMARKS.md    rewrite the file's blocks (atomically)
    python benchmarks/report.py [RESULTS] --check BENCHMARKS.md    exit 1 naming the blocks that differ

To add a block: write ``@block("my-name") def my_block(out: Path) -> str`` below, put
``<!-- generated: my-name -->`` / ``<!-- /generated -->`` where it goes in BENCHMARKS.md, and run ``--write``.

Which command regenerates which outputs: ``benchmarks/run_cpu.sh`` (demo, latent optimization, estimators,
fine-tuning), ``benchmarks/bold_kl.sh`` (the regularizer section, ``bold-kl/``), ``benchmarks/run_scale.sh``
(``scale/``), ``benchmarks/reproduce_comparison.sh`` (``comparison-repro/``; ``run_cpu.sh`` makes ``comparison/``,
``beyond-grid/``, ``adjoint-drift/`` and ``edict-vs-ddim/``), ``python benchmarks/sampler_overhead.py >
benchmarks/results/cpu/sampler-overhead.txt``, and the ``sdo bench`` command quoted in BENCHMARKS.md for
``sd15-small-estimators/``.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

try:
    from sdo.app.report import markdown_table, mebibytes
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from sdo.app.report import markdown_table, mebibytes
from sdo.errors import CorruptFileError

RESULTS = Path(__file__).resolve().parent / "results" / "cpu"
MEMORY = "extra memory (CPU: saved activations)"
GIB = 2**30

Generator = Callable[[Path], str]
BLOCKS: dict[str, Generator] = {}
"""Every block generator by name, in the order of BENCHMARKS.md."""


def block(name: str) -> Callable[[Generator], Generator]:
    """Register ``function(results_folder) -> markdown`` as the generator of block ``name``."""

    def register(function: Generator) -> Generator:
        if name in BLOCKS:
            raise ValueError(f"block {name!r} is registered twice")
        BLOCKS[name] = function
        return function

    return register


def _load(path: Path):
    return json.loads(path.read_text())


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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


def _optional(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def bench_table(out: Path, name: str) -> str:
    """``sdo bench``'s table: cost, memory, reward, and the reward at 25/50/100% of its time reference (iterate k
    credited at t_k), by steps and method."""
    result = _load(out / name / "bench.json")
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
                r["method"],
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


def _fill(text: str, bullet: bool = False) -> str:
    """Prose wrapped at BENCHMARKS.md's width (a bullet's continuation lines indented by two spaces)."""
    import textwrap

    return textwrap.fill(text, 119, subsequent_indent="  " if bullet else "", break_on_hyphens=False)


# --- run_cpu.sh: demo, latent optimization, estimators, fine-tuning -------------------------------------------


@block("demo")
def demo_block(out: Path) -> str:
    return demo_table(out)


@block("latent-step0")
def latent_step0_block(out: Path) -> str:
    return optimize_table(out, "compare")


@block("latent-step40")
def latent_step40_block(out: Path) -> str:
    return optimize_table(out, "compare-late")


@block("estimators-latents")
def estimators_latents_block(out: Path) -> str:
    return bench_table(out, "bench-latent")


@block("estimators-weights")
def estimators_weights_block(out: Path) -> str:
    return bench_table(out, "bench-weights")


@block("finetune-confidence")
def finetune_confidence_block(out: Path) -> str:
    return finetune_table(out, "confidence")


@block("finetune-bold")
def finetune_bold_block(out: Path) -> str:
    return finetune_table(out, "bold")


# --- bold_kl.sh: the base-model regularizer ---------------------------------------------------------------------

KL_WEIGHTS = (0, 10, 20, 30)
JUDGE_BAR = 0.8  # the held-out judge accuracy the regularizer should hold at every evaluation


def kl_runs(out: Path) -> dict[int, list[dict]]:
    """``bold-kl/klW/metrics.jsonl`` of every weight W of ``KL_WEIGHTS``."""
    return {weight: _records(out / "bold-kl" / f"kl{weight}" / "metrics.jsonl") for weight in KL_WEIGHTS}


def kl_base(out: Path) -> dict:
    """The base model's evaluation (``benchmarks/bold_kl_base.py``)."""
    return _load(out / "bold-kl" / "base.json")


def _at(records: list[dict], step: int) -> dict:
    return next(r for r in records if r["step"] == step)


def _evaluations(records: list[dict]) -> list[dict]:
    return [r for r in records if "judge_accuracy" in r]


def _holds_bar(records: list[dict]) -> bool:
    return all(r["judge_accuracy"] >= JUDGE_BAR for r in _evaluations(records))


def _kl_chosen(runs: dict[int, list[dict]]) -> int | None:
    """The smallest weight whose held-out judge accuracy stays at or above the bar at every evaluation."""
    return next((w for w in sorted(runs) if w and _holds_bar(runs[w])), None)


def _first_last(records: list[dict]) -> tuple[float, float]:
    return statistics.mean(r["reward"] for r in records[:5]), statistics.mean(r["reward"] for r in records[-5:])


@block("kl-base")
def kl_base_block(out: Path) -> str:
    base = kl_base(out)
    return (
        f"The base model before fine-tuning: judge accuracy {base['judge_accuracy']:.0%}, Fréchet distance "
        f"{base['frechet_judge']:.2f}."
    )


@block("kl-table")
def kl_table_block(out: Path) -> str:
    runs = kl_runs(out)
    chosen = _kl_chosen(runs)
    headers = (
        "`--kl-weight`",
        "reward, first 5 updates (mean)",
        "reward, last 5 updates (mean)",
        "highest batch reward",
        "held-out judge accuracy (after 20 -> 40 updates)",
        "Frechet distance (after 20 -> 40)",
    )
    rows = []
    for weight, records in runs.items():
        first, last = _first_last(records)
        mid, end = _at(records, 20), records[-1]
        cells = [
            f"{mid['judge_accuracy']:.0%} -> {end['judge_accuracy']:.0%}",
            f"{mid['frechet_judge']:.2f} -> {end['frechet_judge']:.2f}",
        ]
        label = "0 (without)" if weight == 0 else str(weight)
        if weight == chosen:
            label, cells = f"**{label}**", [f"**{cell}**" for cell in cells]
        best = max(r["reward"] for r in records)
        rows.append([label, f"{first:.3f}", f"{last:.3f}", f"{best:.3f}", *cells])
    return markdown_table(headers, rows)


def _same_figures(a: list[dict], b: list[dict]) -> bool:
    """Whether two bold runs give the same figures in the tables (rounded as printed)."""

    def figures(records):
        first, last = _first_last(records)
        evaluated = [
            (f"{_at(records, s)['judge_accuracy']:.0%}", f"{_at(records, s)['frechet_judge']:.2f}") for s in (20, 40)
        ]
        return f"{first:.3f}", f"{last:.3f}", evaluated

    return figures(a) == figures(b)


@block("kl-findings")
def kl_findings_block(out: Path) -> str:
    runs, base = kl_runs(out), kl_base(out)
    without = runs[0]
    first, last = _first_last(without)
    same = _same_figures(without, _records(out / "finetune-bold-sdo" / "metrics.jsonl"))
    agreement = (
        "These figures are identical to the `bold` table above (a separate run): the run is deterministic."
        if same
        else "These figures differ from the `bold` table above (a separate run)."
    )
    early = _evaluations(without)[0]
    bullets = [
        f"- **Without the regularizer** the reward goes from {first:.2f} to {last:.2f} and the judge accuracy falls "
        f"to {early['judge_accuracy']:.0%} after {early['step']} updates and {without[-1]['judge_accuracy']:.0%} "
        f"after {without[-1]['step']} (Fréchet distance {without[-1]['frechet_judge']:.0f}): the model draws "
        f"blobs. {agreement}"
    ]
    chosen = _kl_chosen(runs)
    if chosen is None:
        bullets.append(
            f"- No weight holds the held-out judge accuracy at {JUDGE_BAR:.0%} or more at every evaluation."
        )
    else:
        records = runs[chosen]
        first, last = _first_last(records)
        peak = max(records, key=lambda r: r["reward"])
        evaluated = _evaluations(records)
        lowest = min(r["judge_accuracy"] for r in evaluated)
        farthest = max(r["frechet_judge"] for r in evaluated)
        bullets.append(
            f"- **With `--kl-weight {chosen}`** the reward still rises, from {first:.3f} over the first 5 updates to "
            f"{peak['reward']:.2f} around update {peak['step']} and {last:.3f} over the last 5. The held-out judge "
            f"accuracy stays at or above {lowest:.0%}, and the Fréchet distance stays at {farthest:.0f} or less "
            f"(base model: {base['frechet_judge']:.1f}). The digits get bolder without becoming blobs. The price is "
            f"a much smaller reward gain. After update {peak['step']} the penalty pulls the model back toward the "
            "base model, and the reward falls back with it."
        )
        weaker = []
        for weight in (w for w in sorted(runs) if 0 < w < chosen):
            worst = min(_evaluations(runs[weight]), key=lambda r: r["judge_accuracy"])
            weaker.append(
                f"A weight of {weight} falls to {worst['judge_accuracy']:.0%} at {worst['step']} updates "
                f"({runs[weight][-1]['judge_accuracy']:.0%} at {runs[weight][-1]['step']})."
            )
        if weaker:
            bullets.append(
                f"- {' '.join(weaker)} Below about {chosen}, on this task, the ≥ {JUDGE_BAR:.0%} bar is not held "
                "throughout."
            )
    return "\n".join(_fill(b, bullet=True) for b in bullets)


# --- the sampler and the SD-1.5-sized estimators ----------------------------------------------------------------


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
    result = _load(out / "sd15-small-estimators" / "bench.json")
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
    return _fill(text)


# --- run_scale.sh: compiled chain, items across processes, plans ------------------------------------------------


def _first_seconds(value: float) -> str:
    return f"{value:.1f} s" if value >= 10 else f"{value:.2f} s"


@block("scale-compile")
def scale_compile_block(out: Path) -> str:
    result = _load(out / "scale" / "compile" / "bench.json")
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
    return markdown_table(headers, table) + "\n\n" + "\n".join(_fill(b, bullet=True) for b in bullets)


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
        s1 = _load(folder / f"run-{run}-1proc" / "summary.json")
        s2 = _load(folder / f"run-{run}-2proc" / "summary.json")
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
    return markdown_table(headers, rows) + "\n\n" + "\n".join(_fill(b, bullet=True) for b in bullets)


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
        plan = {(r["method"], r["steps"]): r for r in _load(out / "scale" / f"plan-{folder}" / "plan.json")["rows"]}
        measured = {
            (r["method"], r["steps"]): r for r in _load(out / "scale" / f"measured-{folder}" / "bench.json")["rows"]
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
    summary = _fill(
        f"- Memory agrees within {max(gaps):.0%} everywhere. `tests/test_plan.py` asserts a factor of 1.25.",
        bullet=True,
    )
    return markdown_table(headers, rows) + "\n\n" + summary


@block("scale-plan-full-size")
def scale_plan_full_size_block(out: Path) -> str:
    plain = _load(out / "scale" / "plan-sd15" / "plan.json")
    lowmem = _load(out / "scale" / "plan-sd15-lowmem" / "plan.json")
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
    return "\n".join(_fill(b, bullet=True).replace("\n  ", "\n    ") if b.startswith("  ") else b for b in bullets)


# --- compare_estimators.py, adjoint_drift.py, edict_vs_ddim.py: the fair comparison -----------------------------


def _benchmark_module(name: str):
    """A sibling script of this file, imported as a module (``compare_report``, ``adjoint_drift``)."""
    folder = str(Path(__file__).resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return __import__(name)


def _comparison_folder(out: Path) -> Path:
    folder = out / "comparison"
    if not (folder / "cases").is_dir():
        raise FileNotFoundError(f"no stored cases in {folder}; run benchmarks/compare_estimators.py {folder}")
    return folder


@block("comparison-sweep")
def comparison_sweep_block(out: Path) -> str:
    return _benchmark_module("compare_report").sweep_table(_comparison_folder(out))


@block("comparison")
def comparison_block(out: Path) -> str:
    report = _benchmark_module("compare_report")
    return report.comparison_table(report.summaries(report.load_cases(_comparison_folder(out))))


REPRO_VARIANTS = ("sdo", "full")


@block("comparison-repro")
def comparison_repro_block(out: Path) -> str:
    """The stored cases against a rerun of ``sdo`` and ``full`` alone (``benchmarks/reproduce_comparison.sh``):
    the largest reward difference over all iterates, and SDO's median seconds per iteration over full's in each."""
    load_cases = _benchmark_module("compare_report").load_cases
    folder = out / "comparison-repro"
    stored, rerun = load_cases(_comparison_folder(out)), load_cases(folder)
    if not rerun:
        raise FileNotFoundError(f"no stored cases in {folder}; run benchmarks/reproduce_comparison.sh")
    headers = ("case", "seed", "largest reward difference, every iterate (sdo, full)", "sdo / full s per iter")
    rows = []
    for (task, protocol), seeds in sorted(rerun.items()):
        for seed, records in sorted(seeds.items()):
            before = stored[(task, protocol)][seed]
            differences = [_largest_reward_difference(before[v], records[v]) for v in REPRO_VARIANTS]
            ratios = [_time_ratio(cases) for cases in (before, records)]
            rows.append(
                [
                    f"{task}/{protocol}",
                    seed,
                    ", ".join(f"{d:.1e}" for d in differences),
                    f"stored {ratios[0]:.2f}, rerun {ratios[1]:.2f}",
                ]
            )
    return markdown_table(headers, rows)


def _largest_reward_difference(a: dict, b: dict) -> float:
    rewards = [[it["reward"] for it in record["iterates"]] for record in (a, b)]
    if len(rewards[0]) != len(rewards[1]):
        raise ValueError("the rerun and the stored case have different numbers of iterates")
    return max(abs(x - y) for x, y in zip(*rewards, strict=True))


def _time_ratio(records: dict[str, dict]) -> float:
    sdo, full = (statistics.median(records[v]["step_seconds"]) for v in REPRO_VARIANTS)
    return sdo / full


@block("comparison-beyond-grid")
def comparison_beyond_grid_block(out: Path) -> str:
    """``benchmarks/beyond_grid.py``'s runs against the stored sweep and cases: each edge-of-grid variant one value
    further, and ``full`` at that lr on the class task's editing protocol."""
    folder, comparison = out / "beyond-grid", _comparison_folder(out)
    edge = [_load(path) for path in sorted((folder / "edge").glob("*.json"))]
    edit = [_load(path) for path in sorted((folder / "edit").glob("*.json"))]
    if not edge or not edit:
        raise FileNotFoundError(f"no results in {folder}; run python benchmarks/beyond_grid.py {folder}")
    order = list(_benchmark_module("compare_estimators").VARIANTS)
    rows = [_past_the_edge_row(comparison, r) for r in sorted(edge, key=lambda r: order.index(r["variant"]))]
    headers = ("variant", "knob", "chosen: final reward", "one step past the edge: final reward", "difference")
    return markdown_table(headers, rows) + "\n\n" + _edit_past_the_edge_table(comparison, edit)


def _past_the_edge_row(comparison: Path, record: dict) -> list:
    estimators = _benchmark_module("compare_estimators")
    chosen = estimators.chosen_value(comparison, record["variant"])
    reached = estimators.sweep_result(comparison, record["variant"], chosen)["final_reward"]
    past = f"{record['value']:g}: {record['final_reward']:.3f}"
    return [
        record["variant"],
        record["knob"],
        f"{chosen:g}: {reached:.3f}",
        past,
        f"{record['final_reward'] - reached:+.3f}",
    ]


def _edit_past_the_edge_table(comparison: Path, edit: list[dict]) -> str:
    """Per class/edit seed: the stored sdo and full finals beside full's at the lr past its grid."""
    rows, lrs = [], {}
    for record in sorted(edit, key=lambda r: r["case"]["seed"]):
        case = comparison / "cases" / f"class-edit-s{record['case']['seed']}"
        stored = {v: _load(case / f"{v}.json") for v in ("sdo", "full")}
        lrs = {v: r["options"]["lr"] for v, r in stored.items()} | {"past": record["value"]}
        finals = [stored["sdo"], stored["full"], record]
        rows.append([record["case"]["seed"], *(f"{r['iterates'][-1]['reward']:.4f}" for r in finals)])
    headers = (
        "class/edit seed",
        f"sdo (lr {lrs['sdo']:g})",
        f"full (lr {lrs['full']:g}, chosen)",
        f"full (lr {lrs['past']:g})",
    )
    return markdown_table(headers, rows)


@block("adjoint-drift")
def adjoint_drift_block(out: Path) -> str:
    return _benchmark_module("adjoint_drift").drift_table(out / "adjoint-drift")


@block("edict-vs-ddim")
def edict_vs_ddim_block(out: Path) -> str:
    text = (out / "edict-vs-ddim" / "edict-vs-ddim.md").read_text()
    table = text[text.index("| chain") :]
    return table.split("\n\n")[0].strip()  # the table; its finding is in BENCHMARKS.md's prose


# --- the markers ----------------------------------------------------------------------------------------------

OPEN = re.compile(r"^<!-- generated: (?P<name>[A-Za-z0-9_.-]+) -->$", re.M)
CLOSE = "<!-- /generated -->"


class BlockError(Exception):
    """A document's markers are malformed, name no generator, or a generator's outputs are missing."""


def find_blocks(text: str) -> list[tuple[str, int, int]]:
    """Every generated block of ``text``: ``(name, start, end)``, the body being ``text[start:end]`` (from after
    the opening marker's line to before the closing one's)."""
    blocks = []
    for match in OPEN.finditer(text):
        start = match.end() + 1
        end = text.find("\n" + CLOSE, match.end())
        following = OPEN.search(text, match.end())
        if end < 0 or (following is not None and following.start() < end):
            raise BlockError(f"block {match['name']!r} has no `{CLOSE}` before the next block")
        blocks.append((match["name"], start, max(start, end + 1)))
    if text.count(CLOSE) != len(blocks):
        raise BlockError(f"{text.count(CLOSE)} `{CLOSE}` markers for {len(blocks)} blocks")
    names = [name for name, _, _ in blocks]
    if len(set(names)) != len(names):
        raise BlockError(f"a block appears twice: {sorted({n for n in names if names.count(n) > 1})}")
    return blocks


def render(name: str, results: Path) -> str:
    """Block ``name`` from the outputs in ``results``; ``BlockError`` when it has no generator or outputs."""
    if name not in BLOCKS:
        raise BlockError(f"block {name!r}: no generator (known: {', '.join(BLOCKS)})")
    try:
        return BLOCKS[name](results).strip("\n") + "\n"
    except FileNotFoundError as error:
        raise BlockError(f"block {name!r}: missing output {error.filename}") from error
    except CorruptFileError as error:  # a stored output that sdo.io cannot read (missing or damaged)
        raise BlockError(f"block {name!r}: unreadable output: {error}") from error


def regenerate(text: str, results: Path) -> tuple[str, list[str], list[str]]:
    """``text`` with every block regenerated, the names of the blocks that changed, and the errors (blocks left
    as they were)."""
    pieces, changed, errors, position = [], [], [], 0
    for name, start, end in find_blocks(text):
        try:
            body = render(name, results)
        except BlockError as error:
            errors.append(str(error))
            body = text[start:end]
        if body != text[start:end]:
            changed.append(name)
        pieces += [text[position:start], body]
        position = end
    pieces.append(text[position:])
    return "".join(pieces), changed, errors


def check(doc: Path, results: Path) -> int:
    """0 when every block of ``doc`` equals its regeneration; else 1, naming the blocks that differ."""
    text = doc.read_text()
    try:
        new, changed, errors = regenerate(text, results)
    except BlockError as error:
        print(f"{doc}: {error}", file=sys.stderr)
        return 1
    for name in changed:
        print(f"{doc}: block {name!r} differs from its stored outputs", file=sys.stderr)
    if changed:
        diff = difflib.unified_diff(text.splitlines(), new.splitlines(), str(doc), "regenerated", lineterm="", n=1)
        print("\n".join(diff), file=sys.stderr)
    for error in errors:
        print(f"{doc}: {error}", file=sys.stderr)
    return 1 if changed or errors else 0


def write(doc: Path, results: Path) -> int:
    """Rewrite ``doc``'s blocks from ``results`` in one atomic replacement; nothing is written on any error."""
    from sdo.io import atomic_path

    try:
        new, changed, errors = regenerate(doc.read_text(), results)
    except BlockError as error:
        print(f"{doc}: {error}", file=sys.stderr)
        return 1
    if errors:
        print("\n".join(f"{doc}: {error}" for error in errors) + f"\n{doc}: not written", file=sys.stderr)
        return 1
    if changed:
        with atomic_path(doc) as tmp:
            tmp.write_text(new)
    print(f"{doc}: {len(changed)} block(s) rewritten" + (f" ({', '.join(changed)})" if changed else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="?", type=Path, default=RESULTS, help="the stored outputs")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", type=Path, metavar="DOC", help="rewrite DOC's generated blocks")
    action.add_argument("--check", type=Path, metavar="DOC", help="exit 1 if a block of DOC differs")
    args = parser.parse_args(argv)
    if args.write:
        return write(args.write, args.results)
    if args.check:
        return check(args.check, args.results)
    status = 0
    for name in BLOCKS:
        try:
            print(f"<!-- generated: {name} -->\n{render(name, args.results)}{CLOSE}\n")
        except BlockError as error:
            print(f"({error})\n")
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
