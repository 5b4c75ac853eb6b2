"""The equal-time comparison's tables, goal verdict and plot (``benchmarks/equal_time_report.py``) and BENCHMARKS.md's
blocks of it, from the stored outputs of ``benchmarks/compare_equal_time.py`` (``sdo.app.equal_time``; its folder
layout is described there).

Per (task, protocol), over the reported seeds where a variant and ``full`` both finished:

- R_v(f): the reward of variant v's last iterate with t_k <= f x T_full, T_full being ``full``'s last iterate's t on
  the same seed's case (as ``sdo.app.comparison.reward_at``), at f = 25%, 50% and 100%; mean +- sample standard
  deviation over seeds; best-so-far likewise at 100%;
- judge success of the final iterate and the Frechet distance of the final samples pooled over seeds (where they
  are stored, at least two of them);
- n_v and the calibrated seconds per iteration (``calibration.json``), extra memory (the untimed memory pass), and
  the cosine of the first latent gradient with ``full``'s on the same case.

The goal (issue 28, item 4) is ``goal_verdict``'s. A missing folder or (task, protocol) renders as "no results yet":
the run spans sessions and the blocks may stand in BENCHMARKS.md before it ends.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import torch

from sdo.app.equal_time import (
    PATIENCE,
    PROTOCOLS,
    REPORTED_SEEDS,
    TASKS,
    TUNING_SEED,
    VARIANTS,
    options_of,
    phase_seconds,
)
from sdo.app.report import markdown_table
from sdo.app.report.blocks import block, fill
from sdo.app.report.comparison import frechet
from sdo.io import atomic_path, load_json, load_tensors
from sdo.methods import MethodOptions

__all__ = [
    "AUTHORS_PROTOCOLS",
    "FOLDER",
    "FRACTIONS",
    "MEMORY_FLAT",
    "MEMORY_OF_SDO",
    "ahead_early",
    "authors_table",
    "equal_time_tables",
    "goal_text",
    "goal_verdict",
    "load_cases",
    "meets",
    "save_plot",
    "summaries",
    "summarize",
    "tuning_table",
]

FOLDER = "equal-time"
"""The equal-time outputs' folder inside the results folder."""
FRACTIONS = (0.25, 0.5, 1.0)
REFERENCE = "full"
AUTHORS_PROTOCOLS = ("authors-noise", "authors-edit")
MEMORY_OF_SDO = 2.0
"""The goal's memory rule: a variant's extra memory at most this multiple of ``sdo``'s on every pair."""
MEMORY_FLAT = 1.5
"""The goal's flatness rule: a variant's noise-protocol peak at most this multiple of its edit-protocol peak."""
NOT_CANDIDATES = ("full", "checkpointed")
DEFAULT_BETAS = MethodOptions().betas
"""sdo's Adam betas; a row with others names them."""
NO_RESULTS = "No results yet: run `python benchmarks/compare_equal_time.py` (it stores into `{folder}/`)."

Cases = dict[tuple[str, str], dict[int, dict[str, dict]]]


def load_cases(folder: Path) -> Cases:
    """``{(task, protocol): {seed: {variant: record}}}`` of the reported cases (the tuning seed's calibration is
    skipped), each record with its tensors under ``"tensors"`` (empty when none are stored) and its case's
    calibration under ``"calibration"``."""
    cases: Cases = {}
    for path in sorted((folder / "cases").glob("*/*.json")):
        if path.name == "calibration.json":
            continue
        record = load_json(path)
        case = record["case"]
        if case["seed"] == TUNING_SEED:
            continue
        tensors = path.with_suffix(".safetensors")
        record["tensors"] = load_tensors(tensors) if tensors.exists() else {}
        calibration = path.parent / "calibration.json"
        record["calibration"] = load_json(calibration) if calibration.exists() else None
        record["iterates"] = on_calibrated_clock(record)
        cases.setdefault((case["task"], case["protocol"]), {}).setdefault(case["seed"], {})[record["variant"]] = record
    return cases


def on_calibrated_clock(record: dict) -> list[dict]:
    """``record``'s iterates with t_k the calibrated seconds of its first k iterations (its case's
    ``calibration.json``, which puts every variant on one clock, extensions included) and the run's own wall-clock
    kept as ``t_measured``: a variant run in a later session, on a machine faster or slower than the one the case's
    other variants ran on, is read at the same budget. Iteration i costs s_v; a ``then_exact`` variant's iterations
    after ``switched_at`` cost s_checkpointed, a ``coarse_to_fine`` variant's s of its second phase (``late_key``); a
    one-pass method's single pass costs s_v. Without a calibration entry for the variant, the measured t_k stay."""
    calibration = record.get("calibration")
    seconds = (calibration or {}).get("seconds_per_iteration", {})
    name, switched = record["variant"], record.get("switched_at")
    if name not in seconds:
        return record["iterates"]
    first, later = phase_seconds(name, seconds)
    t, iterates = 0.0, []
    for k, iterate in enumerate(record["iterates"]):
        if k:
            t += later if switched is not None and k > switched else first
        iterates.append({**iterate, "t": t, "t_measured": iterate.get("t_measured", iterate["t"])})
    return iterates


def _total_time(record: dict) -> float:
    return record["iterates"][-1]["t"]


def _within(record: dict, budget: float) -> dict:
    """The last iterate of ``record`` credited within ``budget`` seconds (iterate 0 is at 0 s)."""
    return [it for it in record["iterates"] if it["t"] <= budget * (1 + 1e-9)][-1]


def _cosine(record: dict, exact: dict) -> float | None:
    if "first_gradient" not in record["tensors"] or "first_gradient" not in exact["tensors"]:
        return None
    a, b = record["tensors"]["first_gradient"], exact["tensors"]["first_gradient"]
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def _seconds_per_iteration(record: dict) -> float:
    """The calibrated seconds per iteration (the case's calibration; the record's own without one)."""
    calibration = record.get("calibration")
    if calibration and record["variant"] in calibration["seconds_per_iteration"]:
        return calibration["seconds_per_iteration"][record["variant"]]
    return record.get("calibrated_seconds", statistics.median(record["step_seconds"]))


def summarize(by_seed: dict[int, dict[str, dict]], name: str, task: str, quality: bool = True) -> dict | None:
    """Variant ``name``'s row over the seeds where it and ``full`` both finished: per-seed lists ``reward_at_F``
    (R_v(F)), ``best_so_far`` (at 100%), ``iterations``; means of the rest (None where nothing is stored).
    ``quality=False`` skips the Frechet distance (it loads the judge)."""
    seeds = [s for s in sorted(by_seed) if name in by_seed[s] and REFERENCE in by_seed[s]]
    if not seeds:
        return None
    records = [by_seed[s][name] for s in seeds]
    budgets = [_total_time(by_seed[s][REFERENCE]) for s in seeds]
    row = {
        "variant": name,
        "seeds": seeds,
        "setting": _setting(name, records[0]["options"]),
        "options": records[0]["options"],
        "iterations": [r.get("iterations", len(r["iterates"]) - 1) for r in records],
        "s_per_iter": statistics.mean(_seconds_per_iteration(r) for r in records),
        "best_so_far": [_within(r, b)["best_so_far"] for r, b in zip(records, budgets, strict=True)],
        "peak_mem_bytes": max(r["peak_mem_bytes"] for r in records),
        "settings": records[0].get("settings"),
    }
    for fraction in FRACTIONS:
        within = [_within(r, fraction * b) for r, b in zip(records, budgets, strict=True)]
        row[f"reward_at_{fraction:g}"] = [it["reward"] for it in within]
    judged = [r["iterates"][-1]["judge_success"] for r in records if "judge_success" in r["iterates"][-1]]
    row["judge_final"] = statistics.mean(judged) if judged else None
    samples = [r["tensors"]["final_sample"] for r in records if "final_sample" in r["tensors"]]
    enough = len(samples) == len(records) and sum(len(s) for s in samples) >= 2
    row["frechet"] = frechet(samples, task) if quality and enough else None
    cosines = [c for s, r in zip(seeds, records, strict=True) if (c := _cosine(r, by_seed[s][REFERENCE])) is not None]
    row["grad_cosine"] = statistics.mean(cosines) if cosines else None
    return row


def _setting(name: str, options: dict) -> str:
    """The tuned knob's value and the schedule: ``lr 0.05, cosine``, ``freedom_scale 1``, ``official schedule``;
    Adam's betas when not sdo's (0.9, 0.9), and ``sdo-then-exact``'s switch."""
    variant = VARIANTS.get(name)
    if variant is not None and not variant.grid:  # nothing tuned (freedom-official): its fixed schedule
        return f"{options.get('freedom_schedule', 'official')} schedule"
    if variant is not None and variant.knob != "lr":
        return f"{variant.knob} {options[variant.knob]:g}"
    label = f"lr {options['lr']:g}, {options['lr_schedule']}"
    if list(options.get("betas", DEFAULT_BETAS)) != list(DEFAULT_BETAS):
        label += f", betas ({', '.join(f'{b:g}' for b in options['betas'])})"
    if variant is not None and variant.then_exact:
        label += f", exact after {PATIENCE} without a new best"
    if variant is not None and variant.coarse_to_fine:
        label += ", half the budget from the noise, then from the late step"
    return label


def summaries(cases: Cases, quality: bool = True) -> dict[str, list[dict]]:
    """``{"task/protocol": [row per variant]}`` in ``TASKS`` x ``PROTOCOLS`` and the variants' order."""
    out = {}
    for task in TASKS:
        for protocol in PROTOCOLS:
            by_seed = cases.get((task, protocol), {})
            rows = [row for name in VARIANTS if (row := summarize(by_seed, name, task, quality)) is not None]
            if rows:
                out[f"{task}/{protocol}"] = rows
    return out


def _mean_sd(values: list[float], digits: int = 3) -> str:
    """``mean ± sample sd`` (only the mean for one value)."""
    if len(values) < 2:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _count(values: list[int]) -> str:
    return f"{min(values)}" if min(values) == max(values) else f"{min(values)}-{max(values)}"


def _optional(value: float | None, form: str) -> str:
    return "" if value is None else format(value, form)


TABLE_HEADERS = (
    "variant",
    "tuned setting",
    "n_v",
    "s / iter (calibrated)",
    "R at 25% of full's time",
    "R at 50%",
    "R at 100%",
    "best-so-far at 100%",
    "judge final",
    "Fréchet (final)",
    "extra memory (MiB)",
    "grad cosine with full's",
)


def equal_time_tables(table: dict[str, list[dict]]) -> str:
    """The main tables: one per (task, protocol), its seeds named above it (missing pairs said once)."""
    parts = []
    for task in TASKS:
        for protocol in PROTOCOLS:
            rows = table.get(f"{task}/{protocol}")
            if not rows:
                continue
            seeds = ", ".join(map(str, rows[0]["seeds"]))
            parts.append(f"**{task} / {protocol}** (seeds {seeds}; mean ± sd over seeds)\n")
            parts.append(markdown_table(TABLE_HEADERS, [_table_row(r) for r in rows]) + "\n")
    missing = _missing_pairs(table)
    if missing:
        parts.append(f"No results yet for {', '.join(missing)}.")
    return "\n".join(parts).strip()


def _table_row(row: dict) -> list[str]:
    return [
        row["variant"],
        row["setting"],
        _count(row["iterations"]),
        f"{row['s_per_iter']:.2f}",
        *(_mean_sd(row[f"reward_at_{f:g}"]) for f in FRACTIONS),
        _mean_sd(row["best_so_far"]),
        _optional(row["judge_final"], ".0%"),
        _optional(row["frechet"], ".1f"),
        f"{row['peak_mem_bytes'] / 2**20:.1f}",
        _optional(row["grad_cosine"], ".3f"),
    ]


def _missing_pairs(table: dict) -> list[str]:
    return [f"{t}/{p}" for t in TASKS for p in PROTOCOLS if f"{t}/{p}" not in table]


# --- tuning --------------------------------------------------------------------------------------------------------


def tuning_table(folder: Path) -> str:
    """Every stored tuning choice: per (task, protocol) and tuned variant, n_v, each value tried with its final
    reward, the chosen value, and the flags ``edge`` (still at an edge after widening) and ``within 1%`` (an
    outward neighbour's final reward within 1% of the chosen one's)."""
    rows, missing = [], []
    for task in TASKS:
        for protocol in PROTOCOLS:
            pair = folder / "tuning" / f"{task}-{protocol}"
            records = {n: load_json(pair / f"{n}.json") for n in VARIANTS if (pair / f"{n}.json").exists()}
            if not records:
                missing.append(f"{task}/{protocol}")
            for name, record in records.items():
                rows.append(_tuning_row(f"{task}/{protocol}", name, record))
    if not rows:
        return NO_RESULTS.format(folder=folder.name)
    headers = ("task / protocol", "variant", "knob, schedule", "n_v", "final reward per value", "chosen", "flags")
    text = markdown_table(headers, rows)
    note = "Tuned on seed {seed} (never reported), at the evaluation horizon n_v; the metric is the final reward."
    text += "\n\n" + fill(note.format(seed=TUNING_SEED))
    if missing:
        text += "\n" + fill(
            f"No tuning results yet for {', '.join(missing)} (the style and adversarial tasks tune "
            "only the per-pair variants; the others take the class task's choice)."
        )
    return text


def _tuning_row(pair: str, name: str, record: dict) -> list:
    schedule = options_of(name, schedule=record.get("schedule")).lr_schedule
    knob = VARIANTS[name].knob
    finals = sorted(record["finals"].items(), key=lambda item: float(item[0]))
    flags = [flag for flag, on in (("edge", record["edge"]), ("within 1%", record["close"])) if on]
    return [
        pair,
        name,
        knob if knob != "lr" else f"lr, {schedule}",
        record["iterations"],
        ", ".join(
            f"{value}: {'stopped (non-finite)' if reward is None else f'{reward:.3f}'}" for value, reward in finals
        ),
        f"{record['chosen']:g}",
        ", ".join(flags),
    ]


# --- the goal ------------------------------------------------------------------------------------------------------


def goal_verdict(table: dict[str, list[dict]]) -> dict:
    """Issue 28's goal, per candidate variant (every variant but ``full`` and ``checkpointed``).

    A pair (task, protocol) is met by v when mean R_v(1) >= mean R_full(1) - sd_full(1), and v is ahead at 25% when
    mean R_v(0.25) > mean R_full(0.25) (means over the seeds both finished; sd: sample standard deviation, 0 with
    one seed). Memory: v's extra memory at most ``MEMORY_OF_SDO`` x ``sdo``'s on every pair present, and flat:
    on every task with both protocols, v's noise-protocol peak at most ``MEMORY_FLAT`` x its edit-protocol peak.
    The goal: memory within both rules, >= 5 of the 6 pairs met, ahead at 25% on all 6. Claimed only when all 6
    pairs have all ``REPORTED_SEEDS`` for ``full`` and for the variant (``partial``: its pairs with fewer).
    """
    pairs = [f"{t}/{p}" for t in TASKS for p in PROTOCOLS]
    complete = [p for p in pairs if p in table and _row(table[p], REFERENCE)["seeds"] == list(REPORTED_SEEDS)]
    candidates = [n for n in VARIANTS if n not in NOT_CANDIDATES and any(_row(r, n) for r in table.values())]
    verdicts = {name: _candidate(table, name) for name in candidates}
    for verdict in verdicts.values():
        verdict["goal"] = verdict["memory_ok"] and len(verdict["met"]) >= 5 and len(verdict["ahead"]) == 6
    decided = len(complete) == len(pairs)
    winners = [name for name, v in verdicts.items() if v["goal"] and not v["partial"]] if decided else []
    return {"pairs": pairs, "complete": complete, "decided": decided, "candidates": verdicts, "met_by": winners}


def meets(row: dict, full: dict) -> bool:
    """The goal's rule for a pair: mean R_v(100%) >= mean R_full(100%) - sd_full(100%) (sample sd, 0 with one seed)."""
    return statistics.mean(row["reward_at_1"]) >= statistics.mean(full["reward_at_1"]) - _sd(full["reward_at_1"])


def ahead_early(row: dict, full: dict) -> bool:
    """The goal's early rule: mean R_v(25%) > mean R_full(25%)."""
    return statistics.mean(row["reward_at_0.25"]) > statistics.mean(full["reward_at_0.25"])


def _row(rows: list[dict], name: str) -> dict | None:
    return next((r for r in rows if r["variant"] == name), None)


def _candidate(table: dict[str, list[dict]], name: str) -> dict:
    met, ahead, partial, of_sdo, flat = [], [], [], {}, {}
    for pair, rows in table.items():
        row, full, sdo = _row(rows, name), _row(rows, REFERENCE), _row(rows, "sdo")
        if row is None:
            continue
        if row["seeds"] != list(REPORTED_SEEDS):
            partial.append(pair)
        if meets(row, full):
            met.append(pair)
        if ahead_early(row, full):
            ahead.append(pair)
        if sdo is not None:
            of_sdo[pair] = _ratio(row["peak_mem_bytes"], sdo["peak_mem_bytes"])
    for task in TASKS:
        noise, edit = (_row(table.get(f"{task}/{p}", []), name) for p in PROTOCOLS)
        if noise is not None and edit is not None:
            flat[task] = _ratio(noise["peak_mem_bytes"], edit["peak_mem_bytes"])
    memory_ok = all(r <= MEMORY_OF_SDO for r in of_sdo.values()) and all(r <= MEMORY_FLAT for r in flat.values())
    return {
        "met": met,
        "ahead": ahead,
        "partial": partial,
        "memory_of_sdo": of_sdo,
        "noise_over_edit": flat,
        "memory_ok": memory_ok,
    }


def _ratio(a: float, b: float) -> float:
    return a / b if b else (1.0 if a == b else math.inf)


def goal_text(table: dict[str, list[dict]], folder: Path) -> str:
    """The goal block: the rule, one row per candidate, and the verdict sentence."""
    if not table:
        return NO_RESULTS.format(folder=folder.name)
    verdict = goal_verdict(table)
    steps = _steps(table)
    rule = (
        "A pair (task, protocol) is met by v when mean R_v(100%) >= mean R_full(100%) - sd_full(100%) (sample sd over "
        "the reported seeds); v is ahead at 25% when mean R_v(25%) > mean R_full(25%). The goal: one variant with "
        f"extra memory at most {MEMORY_OF_SDO:g}x sdo's on every pair and flat in the number of steps (on each task, "
        f"its noise-protocol peak, {steps[0]} steps, at most {MEMORY_FLAT:g}x its edit-protocol peak, {steps[1]} "
        "steps) that meets at least 5 of the 6 pairs and is ahead at 25% on all 6."
    )
    rows = [_goal_row(name, v) for name, v in verdict["candidates"].items()]
    headers = (
        "variant",
        "pairs met",
        "ahead at 25%",
        "memory / sdo's (worst pair)",
        "noise / edit peak (worst)",
        "memory rules",
    )
    return "\n\n".join([fill(rule), markdown_table(headers, rows), fill(_sentence(verdict))])


def _steps(table: dict) -> tuple[str, str]:
    """The noise and edit protocols' step counts, from a stored record's settings."""
    for rows in table.values():
        for row in rows:
            if row.get("settings"):
                settings = row["settings"]
                return str(settings["steps"]), str(settings["steps"] - settings["late_step"])
    return "50", "10"


def _goal_row(name: str, v: dict) -> list[str]:
    worst_sdo = max(v["memory_of_sdo"].values(), default=None)
    worst_flat = max(v["noise_over_edit"].values(), default=None)
    return [
        name,
        f"{len(v['met'])} of 6" + (f" ({', '.join(v['met'])})" if v["met"] else ""),
        f"{len(v['ahead'])} of 6" + (f" ({', '.join(v['ahead'])})" if v["ahead"] else ""),
        _optional(worst_sdo, ".2f") + ("x" if worst_sdo is not None else "n/a"),
        _optional(worst_flat, ".2f") + ("x" if worst_flat is not None else "n/a (one protocol)"),
        "within" if v["memory_ok"] else "exceeded",
    ]


def _sentence(verdict: dict) -> str:
    missing = [p for p in verdict["pairs"] if p not in verdict["complete"]]
    if verdict["met_by"]:
        return f"Goal met by {', '.join(verdict['met_by'])}."
    candidates = verdict["candidates"]
    if not candidates:
        return "Goal not decided: no candidate variant has results yet."
    closest = max(
        candidates, key=lambda n: (candidates[n]["memory_ok"], len(candidates[n]["met"]) + len(candidates[n]["ahead"]))
    )
    gaps = _gaps(verdict["pairs"], candidates[closest])
    if missing:
        return (
            f"Goal not decided yet: pairs without all reported seeds ({', '.join(map(str, REPORTED_SEEDS))}): "
            f"{', '.join(missing)}. Closest so far: {closest} ({gaps})."
        )
    return f"Goal not met (closest: {closest}; {gaps})."


def _gaps(pairs: list[str], v: dict) -> str:
    """What ``v`` lacks for the goal, in words."""
    gaps = []
    if len(v["met"]) < 5:
        not_met = ", ".join(p for p in pairs if p not in v["met"])
        gaps.append(f"meets {len(v['met'])} of 6 pairs, 5 needed (not met: {not_met})")
    if len(v["ahead"]) < 6:
        gaps.append(f"behind at 25% on {', '.join(p for p in pairs if p not in v['ahead'])}")
    if not v["memory_ok"]:
        gaps.append("memory over the rules")
    if v["partial"]:
        gaps.append(f"seeds missing on {', '.join(v['partial'])}")
    return "; ".join(gaps) or "nothing missing on the pairs present"


# --- the authors' setting ------------------------------------------------------------------------------------------


def authors_table(cases: Cases, folder: Path) -> str:
    """``sdo-authors`` and ``full-authors`` from the noise and from step ``authors_late_step``: final reward and
    best-so-far over seeds, seconds per iteration and total time; beside them, the tuned equal-time ``sdo`` /
    ``full`` R(100%) on the same seeds (class task; the equal-time edit protocol starts at ``late_step``)."""
    rows = []
    for protocol in AUTHORS_PROTOCOLS:
        by_seed = cases.get(("class", protocol), {})
        tuned_cases = cases.get(("class", protocol.removeprefix("authors-")), {})
        for name in ("sdo-authors", "full-authors"):
            seeds = [s for s in sorted(by_seed) if name in by_seed[s]]
            if seeds:
                rows.append(_authors_row(protocol, name, [by_seed[s][name] for s in seeds], seeds, tuned_cases))
    if not rows:
        return NO_RESULTS.format(folder=folder.name)
    headers = (
        "start",
        "variant",
        "seeds",
        "iterations",
        "final reward",
        "best-so-far (final)",
        "s / iter",
        "total s",
        "tuned equal-time row, same seeds: R at 100%",
    )
    return markdown_table(headers, rows)


def _authors_row(protocol: str, name: str, records: list[dict], seeds: list[int], tuned_cases: dict) -> list:
    start = records[0]["settings"]["authors_late_step"] if protocol == "authors-edit" else 0
    tuned_name = name.removesuffix("-authors")
    tuned = [tuned_cases[s] for s in seeds if {tuned_name, REFERENCE} <= set(tuned_cases.get(s, {}))]
    context = ""
    if tuned:
        finals = [_within(case[tuned_name], _total_time(case[REFERENCE]))["reward"] for case in tuned]
        setting = _setting(tuned_name, tuned[0][tuned_name]["options"])
        seeds_text = f"{len(tuned)} seed" + ("s" if len(tuned) > 1 else "")
        context = f"{tuned_name} ({setting}, {seeds_text}): {_mean_sd(finals)}"
    return [
        f"step {start}",
        name,
        ", ".join(map(str, seeds)),
        _count([len(r["iterates"]) - 1 for r in records]),
        _mean_sd([r["iterates"][-1]["reward"] for r in records]),
        _mean_sd([r["iterates"][-1]["best_so_far"] for r in records]),
        f"{statistics.mean(statistics.median(r['step_seconds']) for r in records):.2f}",
        f"{statistics.mean(_total_time(r) for r in records):.1f}",
        context,
    ]


# --- the plot ------------------------------------------------------------------------------------------------------


def save_plot(cases: Cases, path: Path, points: int = 101) -> None:
    """One panel per (task, protocol): mean R_v(f) over seeds against f = t / T_full (0 to 1), one line per variant
    (the sdo variants' best-so-far dashed; a symmetric-log reward axis, linear within 0.1 of 0, so that the early
    collapses and the last hundredths near the optimum both show), one legend for all panels, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [(t, p) for t in TASKS for p in PROTOCOLS if (t, p) in cases]
    columns = min(2, max(1, len(keys)))
    figure, axes = plt.subplots(
        math.ceil(max(1, len(keys)) / columns),
        columns,
        figsize=(6 * columns, 3.6 * math.ceil(len(keys) / columns)),
        squeeze=False,
    )
    colors = dict(zip(VARIANTS, plt.cm.tab20.colors, strict=False))
    fractions = [i / (points - 1) for i in range(points)]
    for (task, protocol), axis in zip(keys, axes.flat, strict=False):
        by_seed = cases[(task, protocol)]
        for name in VARIANTS:
            seeds = [s for s in sorted(by_seed) if name in by_seed[s] and REFERENCE in by_seed[s]]
            if not seeds:
                continue
            curves = {"reward": "-"} | ({"best_so_far": "--"} if name.startswith("sdo") else {})
            budgets = {s: _total_time(by_seed[s][REFERENCE]) for s in seeds}
            for key, style in curves.items():
                records = [(by_seed[s][name], budgets[s]) for s in seeds]
                mean = [statistics.mean(_within(r, f * b)[key] for r, b in records) for f in fractions]
                label = name if key == "reward" else f"{name} (best so far)"
                axis.step(fractions, mean, where="post", linestyle=style, color=colors[name], label=label)
        axis.set_title(f"{task} / {protocol}: mean reward over seeds", fontsize=9)
        axis.set_xlabel("training time / full's (T_full)")
        axis.set_ylabel("reward (symlog)")
        axis.set_yscale("symlog", linthresh=0.1)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(keys) :]:
        axis.set_visible(False)
    labelled = {}
    for axis in axes.flat:
        for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
            labelled.setdefault(label, handle)
    if labelled:
        figure.legend(labelled.values(), labelled.keys(), loc="lower center", ncol=4, fontsize=7)
    figure.tight_layout(rect=(0, 0.03 + 0.018 * math.ceil(len(labelled) / 4), 1, 1))
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format=path.suffix.lstrip("."), dpi=90)
    plt.close(figure)


# --- the blocks ----------------------------------------------------------------------------------------------------


def _folder(out: Path) -> Path:
    return out / FOLDER


@block("equal-time-tuning")
def equal_time_tuning_block(out: Path) -> str:
    """Every tuning choice of the equal-time comparison (``tuning_table``)."""
    return tuning_table(_folder(out))


@block("equal-time")
def equal_time_block(out: Path) -> str:
    """The equal-time comparison's tables (``equal_time_tables``)."""
    table = summaries(load_cases(_folder(out)))
    return equal_time_tables(table) if table else NO_RESULTS.format(folder=FOLDER)


@block("equal-time-goal")
def equal_time_goal_block(out: Path) -> str:
    """Issue 28's goal for SDO, met or not (``goal_verdict``)."""
    return goal_text(summaries(load_cases(_folder(out)), quality=False), _folder(out))


@block("equal-time-authors")
def equal_time_authors_block(out: Path) -> str:
    """The authors' setting beside the tuned rows (``authors_table``)."""
    return authors_table(load_cases(_folder(out)), _folder(out))
