"""What the equal-time comparison (issue 28) says, in words and in the README's "Which method" rows, generated from
its stored outputs (``sdo.app.report.equal_time.summaries``) so no prose figure drifts from the tables.

Per (task, protocol), a variant's figures are means over the reported seeds of R_v(f), its final-iterate reward
within f x full backpropagation's training time. "Meets full" is the goal's rule (mean R_v(100%) >= mean
R_full(100%) - sd_full(100%)); "ahead at 25%" is mean R_v(25%) > mean R_full(25%). Ranking a protocol's variants
over its tasks is ``sdo.app.report.guide.latent_ranking`` (the rule ``--method auto`` follows): the blocks name the
same estimator ``auto`` takes when memory allows.

Blocks: ``equal-time-findings`` (BENCHMARKS.md's "Where SDO wins and where it loses", the README's "Measured
results") and ``which-method-latents`` (the README's latent jobs).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from sdo.app.equal_time import PROTOCOLS, TASKS, VARIANTS
from sdo.app.guide import flag_fields
from sdo.app.report import markdown_table
from sdo.app.report.blocks import block, fill
from sdo.app.report.equal_time import (
    FOLDER,
    MEMORY_OF_SDO,
    NO_RESULTS,
    ahead_early,
    load_cases,
    meets,
    summaries,
)
from sdo.app.report.guide import expressible_variants, latent_ranking

__all__ = ["SDO_FAMILY", "findings", "which_method_latents"]

SDO_FAMILY = tuple(name for name, v in VARIANTS.items() if v.method in ("sdo", "sdo-multi"))
"""The variants whose gradient is SDO's (the fallbacks included)."""
GUIDED = tuple(name for name, v in VARIANTS.items() if v.method == "freedom")
"""One guided pass: a sample, not a latent that replays in a plain pipeline."""
START = {"noise": "From the initial noise", "edit": "Editing the latent at step 40 after a no-grad warm-up"}
JOBS = {
    "noise": "steer from the initial noise, you need the latent (`pipe(latents=...)`)",
    "edit": "edit a latent after a no-grad warm-up (the paper's protocol, step 40 of 50)",
}

Table = dict[str, list[dict]]


def _mean(row: dict, fraction: str = "1") -> float:
    return statistics.mean(row[f"reward_at_{fraction}"])


def _sd(row: dict) -> float:
    values = row["reward_at_1"]
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _rows(table: Table, task: str, protocol: str) -> dict[str, dict]:
    return {row["variant"]: row for row in table.get(f"{task}/{protocol}", [])}


def _tasks(table: Table, protocol: str) -> list[str]:
    return [task for task in TASKS if "full" in _rows(table, task, protocol)]


def _best(rows: dict[str, dict], names: tuple[str, ...], fraction: str = "1") -> dict | None:
    present = [rows[name] for name in names if name in rows]
    return max(present, key=lambda row: _mean(row, fraction)) if present else None


def _versus(row: dict, full: dict, fraction: str = "1") -> str:
    return f"{row['variant']} {_mean(row, fraction):.3f} against {_mean(full, fraction):.3f}"


def _protocol_finding(table: Table, protocol: str) -> str:
    tasks = _tasks(table, protocol)
    early, late, ahead, met = [], [], 0, 0
    for task in tasks:
        rows = _rows(table, task, protocol)
        full = rows["full"]
        first, last = _best(rows, SDO_FAMILY, "0.25"), _best(rows, SDO_FAMILY)
        leads = ahead_early(first, full)
        ahead += leads
        early.append(f"{task}: {_versus(first, full, '0.25')}{'' if leads else ', behind'}")
        met += meets(last, full)
        late.append(f"{task}: {_versus(last, full)} ± {_sd(full):.3f}, {'meets' if meets(last, full) else 'behind'}")
    seeds = ", ".join(map(str, _rows(table, tasks[0], protocol)["full"]["seeds"]))
    return (
        f"**{START[protocol]}** (seeds {seeds}; each variant tuned per task on seed 100; mean over seeds). At 25% of "
        f"full backpropagation's time the best SDO variant is ahead of full on {ahead} of {len(tasks)} tasks "
        f"({'; '.join(early)}). At 100% of its time the best SDO variant meets full (within one sd of its mean) on "
        f"{met} of {len(tasks)} ({'; '.join(late)})."
    )


def _harness_finding(table: Table) -> str | None:
    """Which of the SDO variants the bullets name are rules of the comparison's harness, not ``sdo optimize`` flags
    (``expressible_variants``), so that no reader looks for them on the command line."""
    cited = {
        best["variant"]
        for protocol in PROTOCOLS
        for task in _tasks(table, protocol)
        for fraction in ("0.25", "1")
        if (best := _best(_rows(table, task, protocol), SDO_FAMILY, fraction))
    }
    harness = [name for name in SDO_FAMILY if name in cited.difference(expressible_variants())]
    if not harness:
        return None
    return (
        f"**Harness only.** {', '.join(harness)} {'are rules' if len(harness) > 1 else 'is a rule'} of this "
        "comparison's harness "
        '(`sdo.app.equal_time`; issue 28\'s fallbacks), not `sdo optimize` flags; "Which method, for which job" '
        "names only what a command line runs."
    )


def _cost_finding(table: Table) -> str:
    ratios, memory = [], {}
    for protocol in PROTOCOLS:
        for task in _tasks(table, protocol):
            rows = _rows(table, task, protocol)
            if "sdo" in rows:
                ratios.append(rows["sdo"]["s_per_iter"] / rows["full"]["s_per_iter"])
                memory.setdefault(protocol, []).append((rows["sdo"]["peak_mem_bytes"], rows["full"]["peak_mem_bytes"]))
    spans = [
        f"{protocol}: {max(s for s, _ in pairs) / 2**20:.0f} MiB against {max(f for _, f in pairs) / 2**20:.0f} MiB"
        for protocol, pairs in memory.items()
    ]
    return (
        f"**Cost.** An SDO iteration costs {min(ratios):.2f}-{max(ratios):.2f}x a full-backpropagation iteration "
        f"(calibrated), so at equal time it runs {1 / max(ratios):.1f}-{1 / min(ratios):.1f}x the iterations; "
        f"its extra memory is flat in the number of steps ({'; '.join(spans)} for full)."
    )


def _guided_finding(table: Table) -> str | None:
    lines, costs = [], []
    for task in _tasks(table, "noise"):
        rows = _rows(table, task, "noise")
        if (guided := _best(rows, GUIDED)) is not None:
            lines.append(f"{task}: {_versus(guided, rows['full'])}")
            costs.append(guided["s_per_iter"] / rows["full"]["s_per_iter"])
    if not lines:
        return None
    return (
        f"**FreeDoM** (one guided pass, {min(costs):.1f}-{max(costs):.1f}x the time of one full-backpropagation "
        f"iteration) from the noise: {'; '.join(lines)}. It gives a guided sample, not a latent that replays in a "
        "plain pipeline."
    )


def findings(table: Table) -> str:
    """The bullets (module docstring): per protocol, SDO at 25% and 100% of full's time against full; cost; FreeDoM."""
    bullets = [_protocol_finding(table, protocol) for protocol in PROTOCOLS if _tasks(table, protocol)]
    bullets += [harness] if bullets and (harness := _harness_finding(table)) else []
    bullets += [_cost_finding(table)] if bullets else []
    bullets += [guided] if bullets and (guided := _guided_finding(table)) else []
    missing = [f"{t}/{p}" for t in TASKS for p in PROTOCOLS if t not in _tasks(table, p)]
    if missing:
        bullets.append(f"No results yet for {', '.join(missing)}.")
    return "\n".join(fill(f"- {text}", bullet=True) for text in bullets)


def _flags(name: str, rows_by_task: dict[str, dict]) -> str:
    """``name``'s ``sdo optimize`` flags, its tuned knob per task (from the rows' stored options)."""
    variant = VARIANTS[name]
    flags = [f"--method {variant.method}"]
    for key, value in (flag_fields(variant.fixed) or {}).items():
        flags.append(f"--{key.replace('_', '-')} {value}")
    schedule = next(iter(rows_by_task.values()))["options"].get("lr_schedule", "constant")
    if variant.schedule_of and schedule != "constant":  # full's schedule, taken on the class task
        flags.append(f"--lr-schedule {schedule}")
    text = f"`{' '.join(flags)}`"
    if not variant.grid:
        return text
    values = {task: f"{row['options'][variant.knob]:g}" for task, row in rows_by_task.items()}
    knob = f"--{variant.knob.replace('_', '-')}"
    if not variant.per_pair:  # every task takes the class task's choice
        return f"`{' '.join(flags)} {knob} {next(iter(values.values()))}` (tuned on the class task)"
    return f"{text}, `{knob}` tuned per task ({'; '.join(f'{task} {value}' for task, value in values.items())})"


def _job_row(
    table: Table, protocol: str, names: tuple[str, ...], job: str, caveat: str | None = None, best: str | None = None
) -> list[str]:
    """One row: ``best`` (default: the best-ranked of ``names``), its flags and rewards, and where the best SDO
    variant among ``names`` is behind full."""
    best = best or latent_ranking(table, protocol, names)[0]
    per_task = {task: _rows(table, task, protocol) for task in _tasks(table, protocol)}
    chosen = {task: rows[best] for task, rows in per_task.items() if best in rows}
    against = "" if best == "full" else " against full's {:.3f}"
    why = "; ".join(
        f"{task}: {_mean(row):.3f}" + against.format(_mean(per_task[task]["full"])) for task, row in chosen.items()
    )
    memory = max(row["peak_mem_bytes"] for row in chosen.values()) / 2**20
    losses, judged = [], (best,) if best in SDO_FAMILY else tuple(n for n in SDO_FAMILY if n in names)
    for task, rows in per_task.items():
        sdo = _best(rows, judged)
        if sdo is not None and not meets(sdo, rows["full"]):
            losses.append(f"{task}: {_versus(sdo, rows['full'])}")
    lose = caveat or ("behind full on " + "; ".join(losses) if losses else "meets full on every task")
    return [job, _flags(best, chosen), f"best mean rank at 100% of full's time: {why}; {memory:.0f} MiB extra", lose]


def which_method_latents(table: Table) -> str:
    """The README's latent rows: per protocol, the best-ranked latent variant a command line can express, and the
    best-ranked of them within ``MEMORY_OF_SDO`` x sdo's memory (the first such in the same ranking, as
    ``--method auto`` reads ``GUIDE``: not a ranking of the lean variants alone, which can order them differently);
    the last column says where the best SDO variant is behind full."""
    expressible = tuple(name for name in expressible_variants() if name not in GUIDED)
    rows = []
    for protocol in PROTOCOLS:
        if not _tasks(table, protocol):
            continue
        ranking = latent_ranking(table, protocol, expressible)
        rows.append(_job_row(table, protocol, expressible, JOBS[protocol], best=ranking[0]))
        lean = tuple(name for name in ranking if _within_memory(table, protocol, name))
        if lean and lean[0] != ranking[0]:
            rows.append(_job_row(table, protocol, lean, f"{JOBS[protocol]}, memory short", best=lean[0]))
    if not rows:
        return NO_RESULTS.format(folder=FOLDER)
    guided = latent_ranking(table, "noise", GUIDED)
    if guided:
        job, caveat = "steer from the initial noise, a guided sample is enough", "not a latent: it does not replay"
        rows.insert(0, _job_row(table, "noise", (guided[0],), job, caveat))
    headers = ("job", "use", "why (mean final reward over seeds)", "where SDO loses")
    return markdown_table(headers, rows)


def _within_memory(table: Table, protocol: str, name: str) -> bool:
    """Whether ``name``'s extra memory is at most ``MEMORY_OF_SDO`` x sdo's on every task of ``protocol``."""
    pairs = [_rows(table, task, protocol) for task in _tasks(table, protocol)]
    present = [rows for rows in pairs if name in rows and "sdo" in rows]
    return bool(present) and all(
        rows[name]["peak_mem_bytes"] <= MEMORY_OF_SDO * rows["sdo"]["peak_mem_bytes"] for rows in present
    )


def _table(out: Path) -> Table:
    return summaries(load_cases(out / FOLDER), quality=False)


@block("equal-time-findings")
def equal_time_findings_block(out: Path) -> str:
    """Where SDO wins and where it loses at equal time (``findings``)."""
    table = _table(out)
    return findings(table) if table else NO_RESULTS.format(folder=FOLDER)


@block("which-method-latents")
def which_method_latents_block(out: Path) -> str:
    """The README's latent rows of "Which method, for which job" (``which_method_latents``)."""
    return which_method_latents(_table(out))
