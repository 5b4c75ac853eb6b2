"""Tables, goal verdict and plot of the equal-time comparison, from the stored outputs of
``benchmarks/compare_equal_time.py`` (what they show: ``sdo.app.report.equal_time``).

Usage: python benchmarks/equal_time_report.py [OUT]   (default OUT: benchmarks/results/cpu/equal-time; writes
       OUT/equal-time.md, OUT/equal-time.json and OUT/equal-time.png)
"""

from __future__ import annotations

import sys
from pathlib import Path

from sdo.app.report.equal_time import (
    authors_table,
    equal_time_tables,
    goal_text,
    goal_verdict,
    load_cases,
    save_plot,
    summaries,
    tuning_table,
)
from sdo.io import atomic_path, save_json


def main(out: Path) -> None:
    cases = load_cases(out)
    table = summaries(cases)
    sections = {
        "Tuning": tuning_table(out),
        "At equal time": equal_time_tables(table) if table else "No results yet.",
        "Goal": goal_text(table, out),
        "The authors' setting": authors_table(cases, out),
    }
    text = "\n\n".join(f"## {title}\n\n{body}" for title, body in sections.items()) + "\n"
    with atomic_path(out / "equal-time.md") as tmp:
        tmp.write_text(text)
    save_json({"tables": table, "goal": goal_verdict(table)}, out / "equal-time.json")
    if table:
        save_plot(cases, out / "equal-time.png")
    print(text)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/cpu/equal-time"))
