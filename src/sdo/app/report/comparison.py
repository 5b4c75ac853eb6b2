"""The fair comparison's tables and plot (``benchmarks/compare_report.py``) and BENCHMARKS.md's blocks of it, from
the stored cases of ``benchmarks/compare_estimators.py`` (``sdo.app.fair_comparison``).

Per task, protocol and variant, over the seeds that finished:

- reward of the final iterate (mean and standard deviation over seeds);
- reward at 25%, 50% and 100% of full backpropagation's total training time on the same case: the reward of the
  variant's last iterate k with t_k <= the budget (iterate k credited at t_k, the training time through update k);
- judge success of the final iterate, and the Frechet distance (Heusel et al. 2017) between the final samples,
  pooled over seeds, and real digits of the class the judge should see, in the judge's feature space;
- median seconds per iteration, extra memory (CPU: saved activations alive at once), and the cosine of the first
  latent gradient with the exact one (``checkpointed``'s, on the same case);
- "within noise": whether the variant's final reward interval (mean +- std) overlaps the best variant's.
"""

from __future__ import annotations

import math
import statistics
from functools import cache
from pathlib import Path

import torch

from sdo import zoo
from sdo.app import comparison as engine
from sdo.app.fair_comparison import PROTOCOLS, TASKS, VARIANTS, chosen_value, sweep_path, sweep_result
from sdo.app.quality import frechet_distance
from sdo.app.report import markdown_table, mebibytes
from sdo.app.report.blocks import block, load
from sdo.io import atomic_path, load_json, load_tensors

__all__ = [
    "comparison_table",
    "load_cases",
    "mark_noise",
    "save_plot",
    "summaries",
    "summarize",
    "sweep_table",
]

FRACTIONS = (0.25, 0.5, 1.0)
REFERENCE = "full"
EXACT = ("checkpointed", "full")


def load_cases(out: Path) -> dict[tuple[str, str], dict[int, dict[str, dict]]]:
    """``{(task, protocol): {seed: {variant: record}}}`` with each record's tensors under ``"tensors"``."""
    cases: dict = {}
    for path in sorted((out / "cases").glob("*/*.json")):
        record = load_json(path)
        record["tensors"] = load_tensors(path.with_suffix(".safetensors"))
        case = record["case"]
        cases.setdefault((case["task"], case["protocol"]), {}).setdefault(case["seed"], {})[record["variant"]] = record
    return cases


def reward_at(record: dict, budget: float) -> float:
    """The reward of the last iterate of ``record`` credited within ``budget`` seconds (iterate 0 is at 0 s;
    ``sdo.app.comparison.reward_at``)."""
    return engine.reward_at([(it["t"], it["reward"]) for it in record["iterates"]], budget)


def total_time(record: dict) -> float:
    return record["iterates"][-1]["t"]


def cosine(record: dict, seeds_case: dict[str, dict]) -> float | None:
    exact = next((seeds_case[n] for n in EXACT if n in seeds_case), None)
    if exact is None or "first_gradient" not in record["tensors"]:
        return None
    a, b = record["tensors"]["first_gradient"], exact["tensors"]["first_gradient"]
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


@cache
def _real_features(digit: int) -> torch.Tensor:
    images, labels = zoo.load_digits("cpu")
    with torch.no_grad():
        return _judge().embed(images[labels == digit])


@cache
def _judge():
    return zoo.load_judge("cpu")


def frechet(samples: list[torch.Tensor], task: str) -> float:
    """Frechet distance of the pooled final samples to real digits of the class the judge should see."""
    digit = 8 if task == "class" else 3
    with torch.no_grad():
        features = _judge().embed(torch.cat(samples).clamp(-1, 1))
    return frechet_distance(features, _real_features(digit))


def summarize(by_seed: dict[int, dict[str, dict]], name: str, task: str) -> dict | None:
    """One variant's row over the seeds where it and the reference both finished."""
    seeds = [s for s, variants in sorted(by_seed.items()) if name in variants and REFERENCE in variants]
    if not seeds:
        return None
    records = [by_seed[s][name] for s in seeds]
    finals = [r["iterates"][-1]["reward"] for r in records]
    row = {
        "variant": name,
        "seeds": seeds,
        "options": records[0]["options"],
        "reward_initial": statistics.mean(r["iterates"][0]["reward"] for r in records),
        "reward_final": statistics.mean(finals),
        "reward_final_std": statistics.stdev(finals) if len(finals) > 1 else None,
        "judge_final": statistics.mean(r["iterates"][-1].get("judge_success", math.nan) for r in records),
        "frechet": frechet([r["tensors"]["final_sample"] for r in records], task),
        "s_per_iter": statistics.median(statistics.median(r["step_seconds"]) for r in records),
        "total_s": statistics.mean(total_time(r) for r in records),
        "peak_mem_bytes": max(r["peak_mem_bytes"] for r in records),
        "original_chain": records[0]["original_chain"],
    }
    for fraction in FRACTIONS:
        budgets = [fraction * total_time(by_seed[s][REFERENCE]) for s in seeds]
        rewards = [reward_at(r, b) for r, b in zip(records, budgets, strict=True)]
        row[f"reward_at_{fraction:g}"] = statistics.mean(rewards)
    cosines = [c for s in seeds if (c := cosine(by_seed[s][name], by_seed[s])) is not None]
    row["grad_cosine"] = statistics.mean(cosines) if cosines else None
    return row


def mark_noise(rows: list[dict]) -> None:
    """``within_noise_of_best``: the final reward's mean +- std interval overlaps the best variant's."""
    best = max(rows, key=lambda r: r["reward_final"])
    spread = best["reward_final_std"]
    for row in rows:
        if spread is None or row["reward_final_std"] is None:
            row["within_noise_of_best"] = None
        else:
            top = row["reward_final"] + row["reward_final_std"]
            row["within_noise_of_best"] = top >= best["reward_final"] - spread
    best["best"] = True


def summaries(cases: dict) -> dict[str, list[dict]]:
    """``{"task/protocol": [row per variant]}`` in the variants' order."""
    out = {}
    for task in TASKS:
        for protocol in PROTOCOLS:
            by_seed = cases.get((task, protocol))
            if not by_seed:
                continue
            rows = [row for name in VARIANTS if (row := summarize(by_seed, name, task)) is not None]
            if rows:
                mark_noise(rows)
                out[f"{task}/{protocol}"] = rows
    return out


def _knob(row: dict) -> str:
    variant = VARIANTS[row["variant"]]
    return f"{variant.knob} {row['options'][variant.knob]:g}"


def _mean_std(mean: float, std: float | None) -> str:
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def _noise(row: dict) -> str:
    if row.get("best"):
        return "best"
    return {None: "1 seed", True: "yes", False: "no"}[row["within_noise_of_best"]]


HEADERS = (
    "task / protocol",
    "variant",
    "tuned",
    "seeds",
    "reward start -> final (mean ± std)",
    "at 25% / 50% / 100% of full's time",
    "within noise of best",
    "judge final",
    "Fréchet",
    "s / iter",
    "extra memory (CPU: saved activations)",
    "grad cosine",
)


def comparison_table(table: dict[str, list[dict]]) -> str:
    """The main table: one row per task, protocol and variant."""
    lines = []
    for key, rows in table.items():
        for r in rows:
            at = " / ".join(f"{r[f'reward_at_{f:g}']:.3f}" for f in FRACTIONS)
            lines.append(
                [
                    key,
                    r["variant"],
                    _knob(r),
                    len(r["seeds"]),
                    f"{r['reward_initial']:.3f} -> {_mean_std(r['reward_final'], r['reward_final_std'])}",
                    at,
                    _noise(r),
                    f"{r['judge_final']:.0%}",
                    f"{r['frechet']:.1f}",
                    f"{r['s_per_iter']:.2f}",
                    mebibytes(r["peak_mem_bytes"], 0),
                    "" if r["grad_cosine"] is None else f"{r['grad_cosine']:.3f}",
                ]
            )
    return markdown_table(HEADERS, lines)


def sweep_table(out: Path) -> str:
    """The tuning sweep: each variant's knob values and the final reward they reached (class, noise, seed 0)."""
    lines = []
    for name, variant in VARIANTS.items():
        if variant.tuned_as:
            lines.append([name, variant.knob, f"as {variant.tuned_as}", ""])
            continue
        paths = [sweep_path(out, name, value) for value in variant.grid]
        if not all(p.exists() for p in paths):
            continue
        finals = {value: load_json(p)["final_reward"] for value, p in zip(variant.grid, paths, strict=True)}
        best = max(variant.grid, key=lambda v: finals[v])
        cells = ", ".join(f"{v:g}: {finals[v]:.3f}" for v in variant.grid)
        edge = " (edge of the grid)" if best in (variant.grid[0], variant.grid[-1]) else ""
        lines.append([name, variant.knob, cells, f"{best:g}{edge}"])
    return markdown_table(("variant", "knob", "final reward per value", "chosen"), lines)


def save_plot(cases: dict, path: Path) -> None:
    """Reward against iterations and against seconds, mean over seeds with a min-max band, per task/protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [(t, p) for t in TASKS for p in PROTOCOLS if (t, p) in cases]
    figure, axes = plt.subplots(len(keys), 2, figsize=(11, 3.2 * len(keys)), squeeze=False)
    palette = plt.cm.tab20.colors[::2] + plt.cm.tab20.colors[1::2]  # the 10 strong colours first
    colors = dict(zip(VARIANTS, palette, strict=False))
    for (task, protocol), (by_iter, by_time) in zip(keys, axes, strict=True):
        for name in VARIANTS:
            records = [v[name] for v in cases[(task, protocol)].values() if name in v]
            if not records:
                continue
            rewards = torch.tensor([[it["reward"] for it in r["iterates"]] for r in records])
            times = torch.tensor([[it["t"] for it in r["iterates"]] for r in records]).mean(0)
            mean, low, high = rewards.mean(0), rewards.min(0).values, rewards.max(0).values
            steps = [it["k"] for it in records[0]["iterates"]]
            style = {"marker": "*", "markersize": 9} if len(steps) == 2 else {}
            for axis, x in ((by_iter, steps), (by_time, times.tolist())):
                axis.plot(x, mean.tolist(), label=name, color=colors[name], **style)
                axis.fill_between(x, low.tolist(), high.tolist(), color=colors[name], alpha=0.15)
        by_iter.set_title(f"{task} / {protocol}: reward against iterations", fontsize=9)
        by_time.set_title(f"{task} / {protocol}: reward against training seconds", fontsize=9)
        by_iter.set_xlabel("iteration (FreeDoM: one guided pass)")
        by_time.set_xlabel("seconds (iterate k at t_k)")
        for axis in (by_iter, by_time):
            axis.set_ylabel("mean reward")
            axis.grid(alpha=0.3)
    axes[0][1].legend(fontsize=7, ncol=2)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format=path.suffix.lstrip("."), dpi=90)
    plt.close(figure)


# --- the blocks ----------------------------------------------------------------------------------------------------


def _comparison_folder(out: Path) -> Path:
    folder = out / "comparison"
    if not (folder / "cases").is_dir():
        raise FileNotFoundError(f"no stored cases in {folder}; run benchmarks/compare_estimators.py {folder}")
    return folder


@block("comparison-sweep")
def comparison_sweep_block(out: Path) -> str:
    return sweep_table(_comparison_folder(out))


@block("comparison")
def comparison_block(out: Path) -> str:
    return comparison_table(summaries(load_cases(_comparison_folder(out))))


REPRO_VARIANTS = ("sdo", "full")


@block("comparison-repro")
def comparison_repro_block(out: Path) -> str:
    """The stored cases against a rerun of ``sdo`` and ``full`` alone (``benchmarks/reproduce_comparison.sh``):
    the largest reward difference over all iterates, and SDO's median seconds per iteration over full's in each."""
    folder = out / "comparison-repro"
    stored, rerun = load_cases(_comparison_folder(out)), load_cases(folder)
    if not rerun:
        raise FileNotFoundError(f"no stored cases in {folder}; run benchmarks/reproduce_comparison.sh")
    headers = ("case", "seed", "largest reward difference, every iterate (sdo, full)", "sdo / full s per iter")
    rows = []
    for (task, protocol), seeds in sorted(rerun.items()):
        for seed, records in sorted(seeds.items()):
            before = stored[(task, protocol)][seed]
            differences = [_largest_reward_difference(before[v], records[v]) for v in REPRO_VARIANTS]
            ratios = [_time_ratio(cases) for cases in (before, records)]
            rows.append(
                [
                    f"{task}/{protocol}",
                    seed,
                    ", ".join(f"{d:.1e}" for d in differences),
                    f"stored {ratios[0]:.2f}, rerun {ratios[1]:.2f}",
                ]
            )
    return markdown_table(headers, rows)


def _largest_reward_difference(a: dict, b: dict) -> float:
    rewards = [[it["reward"] for it in record["iterates"]] for record in (a, b)]
    if len(rewards[0]) != len(rewards[1]):
        raise ValueError("the rerun and the stored case have different numbers of iterates")
    return max(abs(x - y) for x, y in zip(*rewards, strict=True))


def _time_ratio(records: dict[str, dict]) -> float:
    sdo, full = (statistics.median(records[v]["step_seconds"]) for v in REPRO_VARIANTS)
    return sdo / full


@block("comparison-beyond-grid")
def comparison_beyond_grid_block(out: Path) -> str:
    """``benchmarks/beyond_grid.py``'s runs against the stored sweep and cases: each edge-of-grid variant one value
    further, and ``full`` at that lr on the class task's editing protocol."""
    folder, comparison = out / "beyond-grid", _comparison_folder(out)
    edge = [load(path) for path in sorted((folder / "edge").glob("*.json"))]
    edit = [load(path) for path in sorted((folder / "edit").glob("*.json"))]
    if not edge or not edit:
        raise FileNotFoundError(f"no results in {folder}; run python benchmarks/beyond_grid.py {folder}")
    order = list(VARIANTS)
    rows = [_past_the_edge_row(comparison, r) for r in sorted(edge, key=lambda r: order.index(r["variant"]))]
    headers = ("variant", "knob", "chosen: final reward", "one step past the edge: final reward", "difference")
    return markdown_table(headers, rows) + "\n\n" + _edit_past_the_edge_table(comparison, edit)


def _past_the_edge_row(comparison: Path, record: dict) -> list:
    chosen = chosen_value(comparison, record["variant"])
    reached = sweep_result(comparison, record["variant"], chosen)["final_reward"]
    past = f"{record['value']:g}: {record['final_reward']:.3f}"
    return [
        record["variant"],
        record["knob"],
        f"{chosen:g}: {reached:.3f}",
        past,
        f"{record['final_reward'] - reached:+.3f}",
    ]


def _edit_past_the_edge_table(comparison: Path, edit: list[dict]) -> str:
    """Per class/edit seed: the stored sdo and full finals beside full's at the lr past its grid."""
    rows, lrs = [], {}
    for record in sorted(edit, key=lambda r: r["case"]["seed"]):
        case = comparison / "cases" / f"class-edit-s{record['case']['seed']}"
        stored = {v: load(case / f"{v}.json") for v in ("sdo", "full")}
        lrs = {v: r["options"]["lr"] for v, r in stored.items()} | {"past": record["value"]}
        finals = [stored["sdo"], stored["full"], record]
        rows.append([record["case"]["seed"], *(f"{r['iterates'][-1]['reward']:.4f}" for r in finals)])
    headers = (
        "class/edit seed",
        f"sdo (lr {lrs['sdo']:g})",
        f"full (lr {lrs['full']:g}, chosen)",
        f"full (lr {lrs['past']:g})",
    )
    return markdown_table(headers, rows)
