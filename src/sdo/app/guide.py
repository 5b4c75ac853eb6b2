"""The measured guide ``--method auto`` follows: for each job, the estimators ranked by the reward they reached at
equal time in the stored comparisons.

Jobs and their sources (the results folder is ``benchmarks/results/cpu``):

- ``noise`` (the initial noise) and ``edit`` (a latent at a later step, or a real image inverted to one): the latent
  comparison at equal time (``sdo.app.equal_time``; issue 28), protocols ``noise`` and ``edit``. Per task, each
  variant's mean over the reported seeds of R_v(1), its final-iterate reward within full backpropagation's training
  time, ranks it; a variant's score is its mean rank over the tasks where it ran (equal rewards share the mean of
  their places), ties broken by the registry's order.
  Only variants a command line can express are ranked (not ``sdo-beta2``, whose betas are no flag, nor
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

__all__ = ["FLAG_OPTIONS", "GUIDE", "JOBS", "guide_settings"]

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
        "checkpointed",
        "adjoint-0",
        "doodl-adam",
    ),
    "edit": (
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
    {"lr_schedule", "adjoint_iters", "adjoint_checkpoint_every", "freedom_schedule", "freedom_repeats"}
)
"""The variants' fixed options that are ``sdo optimize`` flags (``sdo.app.method_flags.MethodFlags``)."""


def guide_settings(job: str, row: str) -> tuple[str, dict]:
    """``(method, flag options)`` of the guide's ``row`` for ``job``: an equal-time variant's registry method and
    fixed options (as flag fields: ``adjoint_checkpoint_every`` None is 0), or a fine-tuning method with none."""
    if job == "weights":
        return row, {}
    from sdo.app.equal_time import VARIANTS

    variant = VARIANTS[row]
    options = {key: (0 if value is None else value) for key, value in variant.fixed.items()}
    return variant.method, options
