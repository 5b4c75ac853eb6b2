"""The base model's held-out evaluation for BENCHMARKS.md's regularizer section: the embedded model before any
fine-tuning, through the same evaluator ``sdo finetune`` runs at its evaluations (held-out labels, fixed noise,
judge accuracy and Frechet distance in the judge's feature space).

Usage: python benchmarks/bold_kl_base.py OUT [--sample-steps 20] [--eval-per-class 10] [--seed 0]
(writes OUT/base.json)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sdo.app.finetuning import FinetuneConfig
from sdo.app.tasks.finetune import ZooTarget


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--eval-per-class", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = FinetuneConfig(
        task="bold", sample_steps=args.sample_steps, eval_per_class=args.eval_per_class, seed=args.seed
    )
    target = ZooTarget(config, torch.device("cpu"))
    measures, _ = target.evaluator()(target.unet)
    record = {
        "sample_steps": args.sample_steps,
        "eval_per_class": args.eval_per_class,
        "seed": args.seed,
        **measures,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "base.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
