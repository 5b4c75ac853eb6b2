"""The measured guide ``--method auto`` follows: for each job, the estimators ranked by the reward they reached at
equal time in the stored comparisons.

Jobs and their sources (the results folder is ``benchmarks/results/cpu``):

- ``noise`` (the initial noise) and ``edit`` (a latent at a later step, or a real image inverted to one): the latent
  comparison at equal time (``sdo.app.equal_time``; issue 28), protocols ``noise`` and ``edit``. Per task, each
  variant's mean over the reported seeds of R_v(1), its final-iterate reward within full backpropagation's training
  time, ranks it; a variant's score is its mean rank over the tasks where it ran, ties broken by the registry's order.
  Only variants a command line can express are ranked (not ``sdo-beta2``, whose betas are no flag, nor
  ``sdo-then-exact`` and ``sdo-coarse-to-fine``, harness rules); ``checkpointed`` is ``full``'s gradient credited
  at its own, slower time.
- ``weights``: the fine-tuning comparison (``sdo.app.finetune_comparison``; issue 29), ranked per setting
  (``confidence``; ``bold`` by the reward while the judge holds) and by mean rank over the settings. Until it has
  stored runs, the earlier 40-update runs (``finetune-<task>-<method>``: one seed, untuned) rank by their reward over
  the last 5 updates, and methods they did not run are not ranked.

``GUIDE`` is that ranking written in code, so ``auto`` needs no results folder at run time;
``tests/test_auto.py`` checks it against ``measured_guide`` on the stored outputs, so it cannot drift from
BENCHMARKS.md (``python -m sdo.app.guide`` prints the measured table to paste).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from pathlib import Path

from sdo.app.report.blocks import load_records

__all__ = ["FLAG_OPTIONS", "GUIDE", "JOBS", "guide_settings", "measured_guide"]

JOBS = ("noise", "edit", "weights")

GUIDE: dict[str, tuple[str, ...]] = {
    "noise": (
        "freedom",
        "freedom-official",
        "full",
        "full-cosine",
        "sdo",
        "sdo-multi-cosine",
        "sdo-cosine",
        "adjoint-0",
        "checkpointed",
        "doodl-adam",
    ),
    "edit": (
        "sdo",
        "full",
        "sdo-multi-cosine",
        "full-cosine",
        "checkpointed",
        "sdo-cosine",
        "adjoint-0",
        "freedom",
        "doodl-adam",
    ),
    "weights": ("sdo", "random-truncation", "draft-1"),
}
"""Per job, the guide's rows (equal-time variants for a latent, fine-tuning methods for weights), best first."""

FLAG_OPTIONS = frozenset(
    {"lr_schedule", "adjoint_iters", "adjoint_checkpoint_every", "freedom_schedule", "freedom_repeats"}
)
"""The variants' fixed options that are ``sdo optimize`` flags (``sdo.app.method_flags.MethodFlags``)."""

FINETUNE_SETTINGS = ("confidence", "bold")
EARLIER_FINETUNE_METHODS = ("sdo", "draft-1", "random-truncation")


def guide_settings(job: str, row: str) -> tuple[str, dict]:
    """``(method, flag options)`` of the guide's ``row`` for ``job``: an equal-time variant's registry method and
    fixed options (as flag fields: ``adjoint_checkpoint_every`` None is 0), or a fine-tuning method with none."""
    if job == "weights":
        return row, {}
    from sdo.app.equal_time import VARIANTS

    variant = VARIANTS[row]
    options = {key: (0 if value is None else value) for key, value in variant.fixed.items()}
    return variant.method, options


def measured_guide(results: Path) -> dict[str, tuple[str, ...]]:
    """The guide measured from the stored comparisons under ``results`` (module docstring)."""
    return {**_latent_guide(results), "weights": _weights_guide(results)}


def _latent_guide(results: Path) -> dict[str, tuple[str, ...]]:
    from sdo.app.equal_time import PROTOCOLS, VARIANTS
    from sdo.app.report.equal_time import FOLDER, load_cases, summaries

    expressible = [
        name for name, v in VARIANTS.items() if set(v.fixed) <= FLAG_OPTIONS and not (v.then_exact or v.coarse_to_fine)
    ]
    folder = results / FOLDER
    table = summaries(load_cases(folder), quality=False) if folder.is_dir() else {}
    guide = {}
    for protocol in PROTOCOLS:
        by_task = {
            pair: {
                row["variant"]: statistics.mean(row["reward_at_1"]) for row in rows if row["variant"] in expressible
            }
            for pair, rows in table.items()
            if pair.endswith(f"/{protocol}")
        }
        guide[protocol] = _by_mean_rank(by_task, expressible)
    return guide


def _weights_guide(results: Path) -> tuple[str, ...]:
    from sdo.app.finetune_comparison import METHODS
    from sdo.app.report.finetune_comparison import FOLDER, method_rows, rank_key

    folder = results / FOLDER
    by_setting = {
        setting: {row["method"]: rank_key(row, setting) for row in method_rows(folder, setting)}
        for setting in FINETUNE_SETTINGS
        if folder.is_dir()
    }
    if any(by_setting.values()):
        return _by_mean_rank(by_setting, METHODS)
    earlier = {}
    for task in FINETUNE_SETTINGS:
        scores = {}
        for method in EARLIER_FINETUNE_METHODS:
            path = results / f"finetune-{task}-{method}" / "metrics.jsonl"
            if path.exists():
                scores[method] = statistics.mean(r["reward"] for r in load_records(path)[-5:])
        earlier[task] = scores
    return _by_mean_rank(earlier, EARLIER_FINETUNE_METHODS)


def _by_mean_rank(scores: Mapping[str, Mapping[str, object]], order: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The names ranked by their mean rank over the groups of ``scores`` (``{group: {name: score}}``, higher is
    better; a name counts where it has a score), ties in ``order``'s order; names without a score are left out."""
    ranks: dict[str, list[int]] = {}
    for group in scores.values():
        ranked = sorted(group, key=lambda name: (group[name], -order.index(name)), reverse=True)
        for rank, name in enumerate(ranked, 1):
            ranks.setdefault(name, []).append(rank)
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
