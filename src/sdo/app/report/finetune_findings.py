"""What the fine-tuning comparison (issue 29) says, in the README's words and its "Which method" row, generated from
its stored outputs (``sdo.app.report.finetune_comparison.method_rows``) so no prose figure drifts from the tables.

Until every reported run is stored (``complete``) the blocks say how far the run is, and the row follows the earlier
single-seed, untuned runs, as ``--method auto``'s guide does (``sdo.app.report.guide``); once it is, the row names
the method the guide ranks first (mean rank over ``confidence``, ``bold`` and ``bold-kl`` by ``rank_key``), with
its tuned lr, the regularizer's tuned weight and its place on each setting, and the methods ahead of ``sdo``.

Blocks: ``finetune-findings`` (the README's "Measured results") and ``which-method-weights`` (the README's
fine-tuning job).
"""

from __future__ import annotations

from pathlib import Path

from sdo.app.finetune_comparison import JUDGE_BAR, METHODS, REPORTED_SEEDS, SETTINGS
from sdo.app.report import markdown_table
from sdo.app.report.blocks import block, fill, load
from sdo.app.report.finetune_comparison import (
    FOLDER,
    complete,
    mean_sd,
    method_rows,
    rank_key,
    shared_rank,
    stored_runs,
)
from sdo.app.report.guide import earlier_finetune_scores, weights_ranking

__all__ = ["finetune_findings", "which_method_weights"]

JOB = "fine-tune weights on a reward"
HEADERS = ("job", "use", "why", "where SDO loses")


def _ranked(folder: Path, setting: str) -> list[dict]:
    return sorted(method_rows(folder, setting), key=lambda row: rank_key(row, setting), reverse=True)


def _held(row: dict) -> bool:
    return row["honest_seeds"] == len(row["seeds"])


def _setting_finding(folder: Path, setting: str) -> str:
    rows = _ranked(folder, setting)
    if setting == "confidence":
        ranking = "; ".join(f"{r['method']} {mean_sd(r['eval_reward_100'])}" for r in rows)
        return f"On `confidence`, the held-out reward at the end of the budget: {ranking}."
    held = [r for r in rows if _held(r)]
    hacked = [r for r in rows if not _held(r)]
    parts = [
        "; ".join(f"{r['method']} {mean_sd(r['honest'])}" for r in held),
        f"kept the judge at {JUDGE_BAR:.0%} or more on every seed",
    ]
    where = "with the regularizer" if setting == "bold-kl" else "without the regularizer"
    judges = ", ".join(f"{r['method']} {mean_sd(r['judge_accuracy_100'], '.0%')}" for r in hacked)
    if not held:
        return f"On `bold` {where}, no method {parts[1]}: the reward was hacked (judge accuracy at the end: {judges})."
    text = f"On `bold` {where}, {parts[0]} (reward at its last such evaluation; {parts[1]})"
    if hacked:
        text += f"; the others hack the reward (judge accuracy at the end: {judges})"
    return text + "."


def finetune_findings(folder: Path) -> str:
    """The README's fine-tuning bullet: how far the run is, or each setting's ranking (module docstring)."""
    total = len(SETTINGS) * len(REPORTED_SEEDS) * len(METHODS)
    if not complete(folder):
        return fill(
            "- **Fine-tuning**: the comparison at equal time (each method's lr tuned on seed 100, seeds "
            f"{', '.join(map(str, REPORTED_SEEDS))} reported, `confidence`, `bold` and `bold` with `--kl-weight`) "
            f"is running: {stored_runs(folder)} of {total} reported runs stored. Until it ends, the fine-tuning row "
            "below and `--method auto` follow the earlier single-seed, untuned runs (BENCHMARKS.md, "
            '"Fine-tuning, 40 updates").',
            bullet=True,
        )
    kl = load(folder / "tuning" / "kl.json")["chosen"]
    budget = load(folder / "calibration" / "confidence.json")["budget_seconds"]
    head = (
        f"- **Fine-tuning** at equal time ({budget:.0f} s of training per run, 40 `sdo` updates' worth; lr tuned per "
        f"method on seed 100; mean ± sd over seeds {', '.join(map(str, REPORTED_SEEDS))})."
    )
    findings = [_setting_finding(folder, "confidence"), _setting_finding(folder, "bold")]
    findings.append(_setting_finding(folder, "bold-kl").replace("the regularizer", f"`--kl-weight {kl:g}`", 1))
    return fill(" ".join([head, *findings]), bullet=True)


def which_method_weights(results: Path) -> str:
    """The README's fine-tuning row: the guide's first method, and why (module docstring)."""
    folder = results / FOLDER
    first = weights_ranking(results)[0]
    if not complete(folder):
        scores = earlier_finetune_scores(results)
        why = "; ".join(
            f"{task}: " + ", ".join(f"{m} {s:.3f}" for m, s in sorted(by.items(), key=lambda i: -i[1]))
            for task, by in scores.items()
        )
        row = [
            JOB,
            f"`--method {first}` with `--kl-weight` on a reward that can be hacked",
            f"best mean reward over the last 5 of 40 updates, one untuned seed per task ({why})",
            "not yet compared at equal time with tuned lrs (the comparison is running); without the regularizer "
            "every method hacks `bold`",
        ]
        return markdown_table(HEADERS, [row])
    kl = load(folder / "tuning" / "kl.json")["chosen"]
    rows = {setting: _ranked(folder, setting) for setting in SETTINGS}
    chosen = next(r for r in rows["confidence"] if r["method"] == first)
    why = "; ".join(_place(first, setting, ranked) for setting, ranked in rows.items())
    behind = [
        f"{setting}: {', '.join(r['method'] for r in ahead)} ahead"
        for setting, ranked in rows.items()
        if (ahead := _ahead_of("sdo", setting, ranked))
    ]
    row = [
        JOB,
        f"`--method {first} --lr {chosen['lr']:g}`, with `--kl-weight {kl:g}` where the reward can be hacked "
        "(tuned on `bold`)",
        f"best mean rank over {', '.join(f'`{s}`' for s in SETTINGS)} at equal time ({why}); "
        f"{chosen['s_per_update']:.2f} s / update on confidence",
        "; ".join(behind) or "no method ahead on any setting",
    ]
    return markdown_table(HEADERS, [row])


def _ahead_of(method: str, setting: str, ranked: list[dict]) -> list[dict]:
    """The methods ranked strictly ahead of ``method`` on ``setting`` (ties are not ahead)."""
    mine = next(rank_key(r, setting) for r in ranked if r["method"] == method)
    return [r for r in ranked if rank_key(r, setting) > mine]


def _place(method: str, setting: str, ranked: list[dict]) -> str:
    """``method``'s place and figure on ``setting``: ``bold-kl: place 2 of 6, 0.512 ± 0.010``."""
    row = next(r for r in ranked if r["method"] == method)
    place = shared_rank(row, ranked, setting)
    if place is None:
        alike = sum(shared_rank(r, ranked, setting) is None for r in ranked)
        return f"{setting}: no place, judge below {JUDGE_BAR:.0%} at every evaluation ({alike} of {len(ranked)} alike)"
    figure = mean_sd(row["eval_reward_100"] if setting == "confidence" else row["honest"])
    return f"{setting}: place {place} of {len(ranked)}, {figure}"


@block("finetune-findings")
def finetune_findings_block(out: Path) -> str:
    """The README's fine-tuning bullet (``finetune_findings``)."""
    return finetune_findings(out / FOLDER)


@block("which-method-weights")
def which_method_weights_block(out: Path) -> str:
    """The README's fine-tuning row (``which_method_weights``)."""
    return which_method_weights(out)
