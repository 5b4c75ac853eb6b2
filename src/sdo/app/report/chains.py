"""BENCHMARKS.md's blocks of the sampling chains: the discrete adjoint's drift (``benchmarks/adjoint_drift.py``,
whose table is made here) and EDICT against DDIM (``benchmarks/edict_vs_ddim.py``)."""

from __future__ import annotations

from pathlib import Path

from sdo.app.report import markdown_table
from sdo.app.report.blocks import block
from sdo.io import load_json

__all__ = ["DRIFT_HEADERS", "DRIFT_JSON", "drift_table", "format_drift_row"]

DRIFT_JSON = "adjoint-drift.json"
"""The file ``benchmarks/adjoint_drift.py`` stores its rows in."""


def format_drift_row(row: dict) -> list[str]:
    """A table row's cells."""
    every = row["checkpoint_every"]
    return [
        str(row["steps"]),
        str(row["refinements"]),
        "none" if every is None else str(every),
        f"{row['cosine']:.4f}",
        f"{row['relative_error']:.3f}",
        f"{row['reconstruction_max']:.2e}",
        f"{row['reconstruction_mean']:.2e}",
        str(row["stored_latents"]),
        f"{row['calls_per_step']:.2f}",
    ]


DRIFT_HEADERS = (
    "steps S",
    "refinements n",
    "checkpoint every k",
    "grad cosine",
    "grad rel. error",
    "reconstruction max",
    "reconstruction mean",
    "stored latents",
    "network calls / step",
)


def drift_table(out: str | Path) -> str:
    """The markdown table of ``out/adjoint-drift.json`` (a folder ``benchmarks/adjoint_drift.py`` wrote)."""
    data = load_json(Path(out) / DRIFT_JSON)
    return markdown_table(DRIFT_HEADERS, [format_drift_row(row) for row in data["rows"]])


@block("adjoint-drift")
def adjoint_drift_block(out: Path) -> str:
    return drift_table(out / "adjoint-drift")


@block("edict-vs-ddim")
def edict_vs_ddim_block(out: Path) -> str:
    text = (out / "edict-vs-ddim" / "edict-vs-ddim.md").read_text()
    table = text[text.index("| chain") :]
    return table.split("\n\n")[0].strip()  # the table; its finding is in BENCHMARKS.md's prose
