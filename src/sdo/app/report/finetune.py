"""BENCHMARKS.md's blocks of the fine-tuning runs: ``benchmarks/run_cpu.sh``'s tasks and ``benchmarks/bold_kl.sh``'s
base-model regularizer (``bold-kl/``)."""

from __future__ import annotations

import statistics
from functools import partial
from pathlib import Path

from sdo.app.report import markdown_table
from sdo.app.report.blocks import block, fill, load, load_records

__all__ = ["JUDGE_BAR", "KL_WEIGHTS", "finetune_table", "kl_base", "kl_runs"]


def finetune_table(out: Path, task: str) -> str:
    headers = (
        "method",
        "reward, first 5 updates (mean)",
        "reward, last 5 updates (mean)",
        "held-out judge accuracy (after 20 -> 40 updates)",
        "Frechet distance (after 20 -> 40)",
    )
    rows = []
    for method in ("sdo", "draft-1", "random-truncation"):
        records = load_records(out / f"finetune-{task}-{method}" / "metrics.jsonl")
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


block("finetune-confidence")(partial(finetune_table, task="confidence"))
block("finetune-bold")(partial(finetune_table, task="bold"))


KL_WEIGHTS = (0, 10, 20, 30)
JUDGE_BAR = 0.8  # the held-out judge accuracy the regularizer should hold at every evaluation


def kl_runs(out: Path) -> dict[int, list[dict]]:
    """``bold-kl/klW/metrics.jsonl`` of every weight W of ``KL_WEIGHTS``."""
    return {weight: load_records(out / "bold-kl" / f"kl{weight}" / "metrics.jsonl") for weight in KL_WEIGHTS}


def kl_base(out: Path) -> dict:
    """The base model's evaluation (``benchmarks/bold_kl_base.py``)."""
    return load(out / "bold-kl" / "base.json")


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
    same = _same_figures(without, load_records(out / "finetune-bold-sdo" / "metrics.jsonl"))
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
    return "\n".join(fill(b, bullet=True) for b in bullets)
