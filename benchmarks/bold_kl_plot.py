"""The figure of BENCHMARKS.md's regularizer section: reward per update and held-out judge accuracy / Frechet
distance, for each ``OUT/klW`` run of ``benchmarks/bold_kl.sh``, starting at update 0 from the base model's evaluation
stored in ``OUT/base.json`` (``benchmarks/bold_kl_base.py``).

Usage: python benchmarks/bold_kl_plot.py OUT PNG
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main(out: Path, png: Path) -> None:
    base = json.loads((out / "base.json").read_text())
    runs = sorted(out.glob("kl*/metrics.jsonl"), key=lambda p: float(p.parent.name[2:]))
    figure, axes = plt.subplots(1, 3, figsize=(15, 3.6))
    for path in runs:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        label = f"--kl-weight {path.parent.name[2:]}"
        axes[0].plot([r["step"] for r in records], [r["reward"] for r in records], marker=".", label=label)
        evaluated = [r for r in records if "judge_accuracy" in r]
        for axis, key in zip(axes[1:], ("judge_accuracy", "frechet_judge"), strict=True):
            steps, values = [0] + [r["step"] for r in evaluated], [base[key]] + [r[key] for r in evaluated]
            axis.plot(steps, values, "o-", label=label)
    titles = ("reward (training batch)", "held-out judge accuracy", "Frechet distance (judge features)")
    for axis, title in zip(axes, titles, strict=True):
        axis.set(xlabel="update", title=title)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle("SDO fine-tuning on `bold`, lr 3e-4, 20 DDIM steps, batch 8")
    figure.savefig(png, dpi=110, bbox_inches="tight")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
