"""BENCHMARKS.md's blocks of the fine-tuning comparison (``sdo.app.finetune_comparison``,
``benchmarks/compare_finetuning.py``): the tuning, one table per setting, the regularizer's weight.

Per setting and method, over the reported seeds that finished: the held-out reward (``eval_reward``), judge
accuracy and Fréchet distance at 50% and 100% of the budget (mean ± sample sd), seconds per update (the setting's
calibration: the runs themselves are untimed) and updates run.
On ``bold`` and ``bold-kl`` the methods are ranked by the held-out reward at the last evaluation whose judge
accuracy is at least ``JUDGE_BAR`` (reward hacking does not count; a method whose every evaluation fell below it
gets no place); elsewhere by the final held-out reward.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from sdo.app.finetune_comparison import JUDGE_BAR, METHODS, REPORTED_SEEDS, SETTINGS
from sdo.app.report import markdown_table
from sdo.app.report.blocks import block, load

__all__ = [
    "comparison_tables",
    "complete",
    "kl_table",
    "mean_sd",
    "method_rows",
    "rank_key",
    "shared_rank",
    "stored_runs",
    "tuning_table",
]

FOLDER = "finetune-comparison"
NO_RESULTS = f"No results yet: run `python benchmarks/compare_finetuning.py` (it stores into `{FOLDER}/`)."


def _evaluations(record: dict) -> list[dict]:
    return [r for r in record["metrics"] if "eval_reward" in r]


def _honest_reward(record: dict) -> float | None:
    """The held-out reward at the last evaluation whose judge accuracy is at least ``JUDGE_BAR`` (None: none is)."""
    kept = [r["eval_reward"] for r in _evaluations(record) if r["judge_accuracy"] >= JUDGE_BAR]
    return kept[-1] if kept else None


def mean_sd(values: list[float], form: str = ".3f") -> str:
    """``mean ± sample sd`` of ``values`` formatted with ``form`` (the value alone for one, empty for none)."""
    if not values:
        return ""
    if len(values) == 1:
        return format(values[0], form)
    return f"{format(statistics.mean(values), form)} ± {format(statistics.stdev(values), form)}"


def _run_records(folder: Path) -> list[Path]:
    return [
        folder / "runs" / setting / f"{method}-s{seed}.json"
        for setting in SETTINGS
        for method in METHODS
        for seed in REPORTED_SEEDS
    ]


def stored_runs(folder: Path) -> int:
    """How many of the reported runs (every setting, method and reported seed) are stored."""
    return sum(path.exists() for path in _run_records(folder))


def complete(folder: Path) -> bool:
    """Whether every reported run is stored (the comparison has ended)."""
    return stored_runs(folder) == len(_run_records(folder))


def method_rows(folder: Path, setting: str) -> list[dict]:
    """One summary per method with at least one stored reported run on ``setting``."""
    rows = []
    seconds = None
    for method in METHODS:
        records = {
            seed: load(path)
            for seed in REPORTED_SEEDS
            if (path := folder / "runs" / setting / f"{method}-s{seed}.json").exists()
        }
        finished = {seed: r for seed, r in records.items() if "failed" not in r and len(_evaluations(r)) >= 2}
        if not finished:
            continue
        seconds = seconds or load(folder / "calibration" / f"{setting}.json")["seconds_per_update"]
        halves = [_evaluations(r)[-2] for r in finished.values()]
        ends = [_evaluations(r)[-1] for r in finished.values()]
        honest = [h for r in finished.values() if (h := _honest_reward(r)) is not None]
        rows.append(
            {
                "method": method,
                "seeds": sorted(finished),
                "failed": sorted(set(records) - set(finished)),
                "lr": next(iter(finished.values()))["config"]["lr"],
                "updates": sorted({len(r["metrics"]) for r in finished.values()}),
                "s_per_update": seconds[method],
                **{f"{name}_50": [e[name] for e in halves] for name in ("eval_reward", "judge_accuracy")},
                **{f"{name}_100": [e[name] for e in ends] for name in ("eval_reward", "judge_accuracy")},
                "frechet_50": [e["frechet_judge"] for e in halves],
                "frechet_100": [e["frechet_judge"] for e in ends],
                "honest": honest,
                "honest_seeds": len(honest),
            }
        )
    return rows


def rank_key(row: dict, setting: str) -> tuple[bool, float]:
    """Higher is better: on ``confidence`` the final held-out reward; on ``bold``/``bold-kl`` first whether every
    seed kept the judge above the bar at some evaluation, then the mean reward there."""
    if setting == "confidence":
        return True, statistics.mean(row["eval_reward_100"])
    held = row["honest_seeds"] == len(row["seeds"])
    return held, statistics.mean(row["honest"]) if row["honest"] else -math.inf


HEADERS = (
    "rank",
    "method",
    "lr (tuned)",
    "updates",
    "s / update",
    "held-out reward at 50% / 100%",
    "judge accuracy at 50% / 100%",
    "Fréchet at 50% / 100%",
    f"reward at the last evaluation with judge >= {JUDGE_BAR:.0%}",
    "seeds",
)


def shared_rank(row: dict, rows: list[dict], setting: str) -> int | None:
    """``row``'s place among ``rows`` by ``rank_key`` (equal keys share a place: 1, 2, 2, 4), None where no seed kept
    the judge at any evaluation on ``bold``/``bold-kl`` (the reward was hacked: no place)."""
    key = rank_key(row, setting)
    if key[1] == -math.inf:
        return None
    return 1 + sum(rank_key(other, setting) > key for other in rows)


def comparison_tables(folder: Path) -> str:
    """One table per setting, methods ranked (module docstring)."""
    parts = []
    for setting in SETTINGS:
        rows = sorted(method_rows(folder, setting), key=lambda row: rank_key(row, setting), reverse=True)
        if not rows:
            parts.append(f"**{setting}**: no runs yet.")
            continue
        ranks = [shared_rank(row, rows, setting) for row in rows]
        table = [
            [
                "-" if rank is None else rank,
                row["method"],
                f"{row['lr']:g}",
                "-".join(map(str, sorted({min(row["updates"]), max(row["updates"])}))),
                f"{row['s_per_update']:.2f}",
                f"{mean_sd(row['eval_reward_50'])} / {mean_sd(row['eval_reward_100'])}",
                f"{mean_sd(row['judge_accuracy_50'], '.0%')} / {mean_sd(row['judge_accuracy_100'], '.0%')}",
                f"{mean_sd(row['frechet_50'], '.1f')} / {mean_sd(row['frechet_100'], '.1f')}",
                f"{mean_sd(row['honest']) or 'none'} ({row['honest_seeds']} of {len(row['seeds'])} seeds)",
                ", ".join(map(str, row["seeds"])) + (f" (stopped: {row['failed']})" if row["failed"] else ""),
            ]
            for rank, row in zip(ranks, rows, strict=True)
        ]
        unranked = (
            f"\n\nNo place (-): judge accuracy below {JUDGE_BAR:.0%} at every evaluation of every seed (the "
            "reward was hacked)."
            if None in ranks
            else ""
        )
        parts.append(f"**{setting}**\n\n{markdown_table(HEADERS, table)}{unranked}")
    return "\n\n".join(parts)


def tuning_table(folder: Path) -> str:
    """Each method's lrs on the tuning seed with their final held-out reward, and the choice."""
    rows = []
    for method in METHODS:
        path = folder / "tuning" / f"{method}.json"
        if not path.exists():
            continue
        record = load(path)
        finals = sorted(record["finals"].items(), key=lambda item: float(item[0]))
        values = ", ".join(f"{lr}: {'stopped' if r is None else f'{r:.3f}'}" for lr, r in finals)
        flags = [flag for flag, on in (("edge", record["edge"]), ("within 1%", record["close"])) if on]
        rows.append([method, values, f"{record['chosen']:g}", ", ".join(flags)])
    if not rows:
        return NO_RESULTS
    headers = ("method", "lr: final held-out reward (confidence, seed 100)", "chosen", "flags")
    return markdown_table(headers, rows)


def kl_table(folder: Path) -> str:
    """The regularizer's weight: ``sdo`` on ``bold``, seed 100, each weight's final reward and whether the judge
    stayed above the bar."""
    path = folder / "tuning" / "kl.json"
    if not path.exists():
        return NO_RESULTS
    record = load(path)
    rows = [
        [weight, "stopped" if r is None else f"{r:.3f}", "yes" if float(weight) in record["held"] else "no"]
        for weight, r in record["finals"].items()
    ]
    headers = ("--kl-weight", "final held-out reward", f"judge >= {JUDGE_BAR:.0%} at every evaluation")
    why = "" if record["held"] else f"; no weight kept the judge at {JUDGE_BAR:.0%}: the largest run"
    return f"{markdown_table(headers, rows)}\n\nChosen: `--kl-weight {record['chosen']:g}` (lr {record['lr']:g}{why})."


def _folder(out: Path) -> Path:
    return out / FOLDER


@block("finetune-comparison-tuning")
def finetune_comparison_tuning_block(out: Path) -> str:
    """The lr tuning of every method (``tuning_table``)."""
    return tuning_table(_folder(out))


@block("finetune-comparison-kl")
def finetune_comparison_kl_block(out: Path) -> str:
    """The regularizer's weight (``kl_table``)."""
    return kl_table(_folder(out))


@block("finetune-comparison")
def finetune_comparison_block(out: Path) -> str:
    """The ranked tables (``comparison_tables``)."""
    return comparison_tables(_folder(out)) if (_folder(out) / "runs").exists() else NO_RESULTS
