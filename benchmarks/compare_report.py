"""Tables and plots of the estimator comparison, from the stored cases of ``benchmarks/compare_estimators.py``
(what they show: ``sdo.app.report.comparison``).

Usage: python benchmarks/compare_report.py OUT   (writes OUT/compare.md, OUT/compare.json, OUT/compare.png)
"""

from __future__ import annotations

import sys
from pathlib import Path

from sdo.app.report.comparison import comparison_table, load_cases, save_plot, summaries, sweep_table
from sdo.io import atomic_path, save_json


def main(out: Path) -> None:
    cases = load_cases(out)
    table = summaries(cases)
    text = f"{sweep_table(out)}\n\n{comparison_table(table)}\n"
    with atomic_path(out / "compare.md") as tmp:
        tmp.write_text(text)
    save_json(table, out / "compare.json")
    if cases:
        save_plot(cases, out / "compare.png")
    print(text)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/cpu/comparison"))
