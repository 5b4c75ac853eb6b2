"""The generated blocks of BENCHMARKS.md, from the stored outputs of the benchmark scripts.

Every table and every generated summary line of BENCHMARKS.md sits between a marker pair
(``<!-- generated: NAME -->`` ... ``<!-- /generated -->``), and ``NAME`` is a generator registered with
``@block("NAME")`` in ``sdo.app.report``'s module of its subject (``latent``, ``estimators``, ``finetune``,
``comparison``, ``chains``, ``scale``): a function of the results folder (``benchmarks/results/cpu`` by default)
that returns the block's markdown from the files stored there (``sdo.app.report.document`` does the rest).

Usage:
    python benchmarks/report.py [RESULTS]                          print every block
    python benchmarks/report.py [RESULTS] --write BENCHMARKS.md    rewrite the file's blocks (atomically)
    python benchmarks/report.py [RESULTS] --check BENCHMARKS.md    exit 1 naming the blocks that differ

To add a block: write ``@block("my-name") def my_block(out: Path) -> str`` in its subject's module, put
``<!-- generated: my-name -->`` / ``<!-- /generated -->`` where it goes in BENCHMARKS.md, and run ``--write``.

Which command regenerates which outputs: ``benchmarks/run_cpu.sh`` (demo, latent optimization, estimators,
fine-tuning), ``benchmarks/bold_kl.sh`` (the regularizer section, ``bold-kl/``), ``benchmarks/run_scale.sh``
(``scale/``), ``benchmarks/compare_equal_time.py`` (``equal-time/``), ``benchmarks/reproduce_comparison.sh``
(``comparison-repro/``; ``run_cpu.sh`` makes ``comparison/``, ``beyond-grid/``, ``adjoint-drift/`` and
``edict-vs-ddim/``), ``python benchmarks/sampler_overhead.py > benchmarks/results/cpu/sampler-overhead.txt``, and
the ``sdo bench`` command quoted in BENCHMARKS.md for ``sd15-small-estimators/``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sdo.app.report.blocks import BLOCKS
from sdo.app.report.document import BlockError, check, find_blocks, render, write
from sdo.app.report.document import main as document_main

__all__ = ["BLOCKS", "RESULTS", "BlockError", "check", "find_blocks", "main", "render", "write"]

RESULTS = Path(__file__).resolve().parent / "results" / "cpu"


def main(argv: list[str] | None = None) -> int:
    """Print, ``--write`` or ``--check`` the blocks (``sdo.app.report.document.main``) from ``RESULTS`` by default."""
    return document_main(argv, RESULTS)


if __name__ == "__main__":
    sys.exit(main())
