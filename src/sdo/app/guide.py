"""The measured guide ``--method auto`` follows: for each job, the estimators ranked by the reward they reached at
equal time in the stored comparisons.

Jobs and their sources (the results folder is ``benchmarks/results/cpu``):

- ``noise`` (the initial noise) and ``edit`` (a latent at a later step, or a real image inverted to one): the latent
  comparison at equal time (``sdo.app.equal_time``; issue 28), protocols ``noise`` and ``edit``. Per task, each
  variant's mean over the reported seeds of R_v(1), its final-iterate reward within full backpropagation's training
  time, ranks it; a variant's score is its mean rank over the tasks where it ran (equal rewards share the mean of
  their places), ties broken by the registry's order.
  Only variants a command line can express are ranked (``sdo-beta2`` is ``--adam-beta2 0.999``; not
  ``sdo-then-exact`` and ``sdo-coarse-to-fine``, harness rules); ``checkpointed`` is ``full``'s gradient credited
  at its own, slower time.
- ``weights``: the fine-tuning comparison (``sdo.app.finetune_comparison``; issue 29), ranked per setting
  (``confidence`` by the final held-out reward; ``bold`` and ``bold-kl`` by the reward at the last evaluation whose
  judge accuracy held, so methods that all hacked the reward tie) and by mean rank over the three settings. Until
  every reported run is stored, the earlier 40-update runs (``finetune-<task>-<method>``: one seed, untuned) rank by
  their reward over the last 5 updates, and methods they did not run are not ranked.

``GUIDE`` is that ranking written in code, so ``auto`` needs no results folder at run time;
``tests/test_auto.py`` checks it against ``sdo.app.report.guide.measured_guide`` on the stored outputs, so it cannot
drift from BENCHMARKS.md (``python -m sdo.app.report.guide`` prints the measured table to paste).
"""

from __future__ import annotations

__all__ = ["FLAG_OPTIONS", "GUIDE", "JOBS", "flag_fields", "guide_settings"]

JOBS = ("noise", "edit", "weights")

GUIDE: dict[str, tuple[str, ...]] = {
    "noise": (
        "freedom",
        "full",
        "full-cosine",
        "sdo-multi-cosine",
        "freedom-official",
        "sdo",
        "sdo-cosine",
        "sdo-beta2",
        "checkpointed",
        "adjoint-0",
        "doodl-adam",
    ),
    "edit": (
        "sdo-beta2",
        "sdo",
        "full",
        "full-cosine",
        "sdo-multi-cosine",
        "sdo-cosine",
        "checkpointed",
        "adjoint-0",
        "freedom",
        "doodl-adam",
    ),
    "weights": ("sdo", "alignprop", "draft-k", "full", "random-truncation", "draft-1"),
}
"""Per job, the guide's rows (equal-time variants for a latent, fine-tuning methods for weights), best first."""

FLAG_OPTIONS = frozenset(
    {"lr_schedule", "adjoint_iters", "adjoint_checkpoint_every", "freedom_schedule", "freedom_repeats", "betas"}
)
"""The variants' fixed options (``sdo.methods.MethodOptions`` fields) that ``sdo optimize`` flags can set
(``sdo.app.method_flags.MethodFlags``; ``betas`` through ``--adam-beta2``, its first decay being the default's)."""


def flag_fields(fixed: dict) -> dict | None:
    """A variant's fixed ``MethodOptions`` fields as ``MethodFlags`` fields (``adjoint_checkpoint_every`` None is 0;
    ``betas`` (0.9, b) is ``adam_beta2`` b), or None where a flag cannot express them (an option that is no flag, a
    first decay other than the default's)."""
    from sdo.latent import AdamSettings

    if not set(fixed) <= FLAG_OPTIONS:
        return None
    fields = {key: (0 if value is None else value) for key, value in fixed.items() if key != "betas"}
    if "betas" in fixed:
        beta1, beta2 = fixed["betas"]
        if beta1 != AdamSettings.betas[0]:
            return None
        fields["adam_beta2"] = beta2
    return fields


def guide_settings(job: str, row: str) -> tuple[str, dict]:
    """``(method, flag options)`` of the guide's ``row`` for ``job``: an equal-time variant's registry method and
    fixed options as ``MethodFlags`` fields (``flag_fields``), or a fine-tuning method with none."""
    if job == "weights":
        return row, {}
    from sdo.app.equal_time import VARIANTS

    variant = VARIANTS[row]
    fields = flag_fields(variant.fixed)
    if fields is None:
        raise ValueError(f"The guide's row {row!r} has options no flag expresses: {variant.fixed}")
    return variant.method, fields
