"""The measured guide of ``--method auto`` (``sdo.app.guide``, whose docstring gives the ranking rule), computed from
the stored comparisons; ``python -m sdo.app.report.guide`` prints it as ``GUIDE``'s literal."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from sdo.app.guide import JOBS, flag_fields
from sdo.app.report.blocks import load_records

__all__ = [
    "by_mean_rank",
    "earlier_finetune_scores",
    "expressible_variants",
    "latent_ranking",
    "measured_guide",
    "weights_ranking",
]

EARLIER_FINETUNE_TASKS = ("confidence", "bold")
EARLIER_FINETUNE_METHODS = ("sdo", "draft-1", "random-truncation")


def measured_guide(results: Path) -> dict[str, tuple[str, ...]]:
    """The guide measured from the stored comparisons under ``results`` (module docstring)."""
    return {**_latent_guide(results), "weights": weights_ranking(results)}


def _latent_guide(results: Path) -> dict[str, tuple[str, ...]]:
    from sdo.app.equal_time import PROTOCOLS
    from sdo.app.report.equal_time import FOLDER, load_cases, summaries

    folder = results / FOLDER
    table = summaries(load_cases(folder), quality=False) if folder.is_dir() else {}
    return {protocol: latent_ranking(table, protocol, expressible_variants()) for protocol in PROTOCOLS}


def expressible_variants() -> tuple[str, ...]:
    """The equal-time variants a command line can express: fixed options that are flags (``flag_fields``), no
    harness rule (``then_exact``, ``coarse_to_fine``)."""
    from sdo.app.equal_time import VARIANTS

    return tuple(
        name
        for name, v in VARIANTS.items()
        if flag_fields(v.fixed) is not None and not (v.then_exact or v.coarse_to_fine)
    )


def latent_ranking(table: Mapping[str, list[dict]], protocol: str, names: Sequence[str]) -> tuple[str, ...]:
    """``names`` ranked by their mean rank over ``protocol``'s tasks of mean R_v(100%) (``by_mean_rank``; ``table``
    is ``sdo.app.report.equal_time.summaries``')."""
    by_task = {
        pair: {row["variant"]: statistics.mean(row["reward_at_1"]) for row in rows if row["variant"] in names}
        for pair, rows in table.items()
        if pair.endswith(f"/{protocol}")
    }
    return by_mean_rank(by_task, list(names))


def weights_ranking(results: Path) -> tuple[str, ...]:
    """The fine-tuning methods by mean rank (``by_mean_rank``): over the fine-tuning comparison's settings
    (``confidence``, ``bold``, ``bold-kl``; ``rank_key``) once every reported run is stored, else over
    ``EARLIER_FINETUNE_TASKS`` of the earlier single-seed runs (``earlier_finetune_scores``); a partial comparison
    would rank only the methods that happen to have run."""
    from sdo.app.finetune_comparison import METHODS, SETTINGS
    from sdo.app.report.finetune_comparison import FOLDER, complete, method_rows, rank_key

    folder = results / FOLDER
    if complete(folder):
        by_setting = {
            setting: {row["method"]: rank_key(row, setting) for row in method_rows(folder, setting)}
            for setting in SETTINGS
        }
        return by_mean_rank(by_setting, METHODS)
    return by_mean_rank(earlier_finetune_scores(results), EARLIER_FINETUNE_METHODS)


def earlier_finetune_scores(results: Path) -> dict[str, dict[str, float]]:
    """``{task: {method: mean training reward over the last 5 updates}}`` of the earlier single-seed, untuned
    40-update runs (``finetune-<task>-<method>/``)."""
    scores: dict[str, dict[str, float]] = {}
    for task in EARLIER_FINETUNE_TASKS:
        for method in EARLIER_FINETUNE_METHODS:
            path = results / f"finetune-{task}-{method}" / "metrics.jsonl"
            if path.exists():
                scores.setdefault(task, {})[method] = statistics.mean(r["reward"] for r in load_records(path)[-5:])
    return scores


def by_mean_rank(scores: Mapping[str, Mapping[str, object]], order: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The names ranked by their mean rank over the groups of ``scores`` (``{group: {name: score}}``, higher is
    better; a name counts where it has a score). Equal scores share the mean of their places (fractional ranking:
    a group where every method hacked the reward ranks nobody); equal mean ranks keep ``order``'s order; names
    without a score are left out."""
    ranks: dict[str, list[float]] = {}
    for group in scores.values():
        for name, score in group.items():
            ahead = sum(other > score for other in group.values())
            level = sum(other == score for other in group.values())
            ranks.setdefault(name, []).append(ahead + (level + 1) / 2)
    return tuple(sorted(ranks, key=lambda name: (statistics.mean(ranks[name]), order.index(name))))


def main() -> None:
    """Print the guide measured from ``benchmarks/results/cpu`` as ``GUIDE``'s literal."""
    guide = measured_guide(Path("benchmarks/results/cpu"))
    print("GUIDE: dict[str, tuple[str, ...]] = {")
    for job in JOBS:
        print(f"    {job!r}: {guide[job]!r},")
    print("}")


if __name__ == "__main__":
    main()
