"""The equal-time comparison's report (``sdo.app.report.equal_time``) on a synthetic results folder: R_v(f) from
known t_k, mean +- sd over seeds, the goal's verdict and its memory rules, the tuning and authors' tables, and the
"no results yet" rendering. No model runs."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import pytest
import torch

from sdo.app.report import equal_time as report
from sdo.app.report.document import render
from sdo.io import load_json, save_json, save_tensors

SETTINGS = {"steps": 50, "full_iters": 4, "batch": 2, "late_step": 40, "authors_late_step": 45}
PAIRS = [(t, p) for t in ("class", "style", "adversarial") for p in ("noise", "edit")]
FULL_FINALS = (-1.0, -2.0, -3.0)  # mean -2, sample sd 1: a pair is met at mean R_v(1) >= -3
SPREAD = (-0.5, 0.0, 0.5)


def _store(folder: Path, task, protocol, seed, variant, times, rewards, peak=100 * 2**20, lr=0.05, tensors=None):
    """One variant's record (iterates at ``times`` with ``rewards``; best-so-far the running max)."""
    best, iterates = -float("inf"), []
    for k, (t, r) in enumerate(zip(times, rewards, strict=True)):
        best = max(best, r)
        iterates.append({"k": k, "t": t, "reward": r, "best_so_far": best, "judge_success": 0.5})
    record = {
        "variant": variant,
        "method": variant.split("-")[0],
        "options": {"lr": lr, "lr_schedule": "cosine" if "cosine" in variant else "constant"},
        "iterations": len(times) - 1,
        "iterates": iterates,
        "step_seconds": [b - a for a, b in itertools.pairwise(times)],
        "peak_mem_bytes": peak,
        "settings": SETTINGS,
        "case": {"task": task, "protocol": protocol, "seed": seed},
    }
    case = folder / "cases" / f"{task}-{protocol}-s{seed}"
    if tensors:
        save_tensors(tensors, case / f"{variant}.safetensors")
    save_json(record, case / f"{variant}.json")


def _pair(folder, task, protocol, sdo_final=-2.5, sdo_quarter=-4.0, cosine_peak=2.0, noise_over_edit=1.0):
    """A (task, protocol) on seeds 0-2: ``full`` (t 0..4, T_full 4; R(0.25) -5; finals -1, -2, -3) and ``sdo``
    (t every 0.5 s to 4.5: R(1) is iterate 8, ``sdo_final`` + (-0.5, 0, 0.5) by seed; its last iterate, past
    T_full, is -100), ``sdo-cosine`` like ``sdo`` with ``cosine_peak`` x its memory."""
    for seed, (final, offset) in enumerate(zip(FULL_FINALS, SPREAD, strict=True)):
        _store(folder, task, protocol, seed, "full", [0, 1, 2, 3, 4], [-10, -5, -4, -3, final], peak=400 * 2**20)
        sdo = [-10, -6, sdo_quarter, -3.9, -3.5, -3.2, -3.1, -3.0, sdo_final + offset, -100]
        times = [0.5 * k for k in range(10)]
        sdo_peak = 100 * 2**20 * (noise_over_edit if protocol == "noise" else 1.0)
        _store(folder, task, protocol, seed, "sdo", times, sdo, peak=100 * 2**20)
        _store(folder, task, protocol, seed, "sdo-cosine", times, sdo, peak=int(cosine_peak * sdo_peak))


def _all_pairs(folder, **changes):
    for task, protocol in PAIRS:
        _pair(folder, task, protocol, **changes.get(f"{task}/{protocol}", {}))


def _table(folder):
    return report.summaries(report.load_cases(folder / "equal-time"), quality=False)


def test_rewards_at_fractions_of_full_time_and_their_spread_over_seeds(tmp_path):
    folder = tmp_path / "equal-time"
    _pair(folder, "class", "noise")
    grad = {"first_gradient": torch.tensor([1.0, 0.0])}
    _store(folder, "class", "noise", 0, "full", [0, 1, 2, 3, 4], [-10, -5, -4, -3, -1], 400 * 2**20, tensors=grad)
    _store(folder, "class", "noise", 0, "sdo", [0, 4], [-10, -2], tensors={"first_gradient": torch.tensor([1.0, 1.0])})
    sdo = report.summarize(report.load_cases(folder)[("class", "noise")], "sdo", "class", quality=False)
    assert sdo["reward_at_0.25"] == [-10.0, -4.0, -4.0]  # seed 0: only iterate 0 (t 0) is within 1 s
    assert sdo["reward_at_1"] == [-2.0, -2.5, -2.0]  # seeds 1, 2: iterate 8 (t 4), not iterate 9 (t 4.5, -100)
    assert sdo["grad_cosine"] == pytest.approx(2**-0.5)
    text = report.equal_time_tables(_table(tmp_path))
    assert "**class / noise** (seeds 0, 1, 2; mean ± sd over seeds)" in text
    full_row = next(line for line in text.splitlines() if line.startswith("| full |"))
    assert "| -5.000 ± 0.000 | -4.000 ± 0.000 | -2.000 ± 1.000 | -2.000 ± 1.000 | 50% |  | 400.0 | 1.000 |" in full_row
    assert "No results yet for class/edit, style/noise" in text


def test_the_goal_is_met_with_five_of_six_pairs_and_flips_with_a_sixth_below_full_minus_sd(tmp_path):
    # style/edit: sdo at -3.001 < -3 (not met); class/noise exactly at full's mean - sd (met: >=)
    _all_pairs(tmp_path / "equal-time", **{"style/edit": {"sdo_final": -3.001}, "class/noise": {"sdo_final": -3.0}})
    verdict = report.goal_verdict(_table(tmp_path))
    assert verdict["decided"] and verdict["met_by"] == ["sdo", "sdo-cosine"]
    assert verdict["candidates"]["sdo"]["met"] == [p for p in verdict["pairs"] if p != "style/edit"]
    assert report.equal_time_goal_block(tmp_path).endswith("Goal met by sdo, sdo-cosine.")

    _pair(tmp_path / "equal-time", "class", "noise", sdo_final=-3.001)
    text = report.equal_time_goal_block(tmp_path)
    assert "Goal met" not in text
    assert "not met: class/noise, style/edit" in text.replace("\n", " ") and "Goal not met (closest: sdo;" in text
    assert "| sdo | 4 of 6 (class/edit, style/noise, adversarial/noise, adversarial/edit) | 6 of 6" in text


def test_ahead_at_25_percent_is_strict_and_the_memory_rules_bind(tmp_path):
    _all_pairs(tmp_path / "equal-time", **{"adversarial/edit": {"sdo_quarter": -5.0, "cosine_peak": 2.01}})
    verdict = report.goal_verdict(_table(tmp_path))
    sdo, cosine = verdict["candidates"]["sdo"], verdict["candidates"]["sdo-cosine"]
    assert "adversarial/edit" not in sdo["ahead"] and len(sdo["ahead"]) == 5  # equal to full's -5: not ahead
    assert not cosine["memory_ok"] and cosine["memory_of_sdo"]["adversarial/edit"] == pytest.approx(2.01)
    assert verdict["met_by"] == []
    flat = {"cosine_peak": 1.0, "noise_over_edit": 1.6}  # sdo-cosine: 1.6x sdo's and 1.6x its edit peak on style
    _all_pairs(tmp_path / "equal-time", **{"style/noise": flat, "style/edit": {"cosine_peak": 1.0}})
    cosine = report.goal_verdict(_table(tmp_path))["candidates"]["sdo-cosine"]
    assert cosine["noise_over_edit"]["style"] == pytest.approx(1.6) and not cosine["memory_ok"]
    flat = {"cosine_peak": 1.0, "noise_over_edit": 1.5}
    _all_pairs(tmp_path / "equal-time", **{"style/noise": flat, "style/edit": {"cosine_peak": 1.0}})
    assert report.goal_verdict(_table(tmp_path))["met_by"] == ["sdo", "sdo-cosine"]
    text = report.equal_time_goal_block(tmp_path).replace("\n", " ")
    assert "at most 2x sdo's on every pair" in text
    assert "its noise-protocol peak, 50 steps, at most 1.5x its edit-protocol peak, 10 steps" in text


def test_the_goal_is_never_claimed_on_partial_data(tmp_path):
    for task, protocol in PAIRS[:4]:
        _pair(tmp_path / "equal-time", task, protocol)
    text = report.equal_time_goal_block(tmp_path).replace("\n", " ")
    assert "Goal met" not in text
    assert "Goal not decided yet: pairs without all reported seeds (0, 1, 2): adversarial/noise, adversarial/edit" in (
        text
    )
    _all_pairs(tmp_path / "equal-time")
    (tmp_path / "equal-time" / "cases" / "style-edit-s2" / "sdo.json").unlink()  # sdo lacks a seed on one pair
    verdict = report.goal_verdict(_table(tmp_path))
    assert verdict["decided"] and verdict["met_by"] == ["sdo-cosine"]
    assert verdict["candidates"]["sdo"]["partial"] == ["style/edit"]


def test_the_tuning_table_gives_values_choice_and_flags(tmp_path):
    pair = tmp_path / "equal-time" / "tuning" / "class-noise"
    base = {"iterations": 12, "schedule": None, "close": False, "edge": False}
    save_json({**base, "chosen": 0.05, "finals": {"0.1": -2.0, "0.025": -3.0, "0.05": -1.0}}, pair / "sdo.json")
    save_json({**base, "chosen": 0.2, "edge": True, "close": True, "finals": {"0.2": -1.0}}, pair / "full-cosine.json")
    text = report.equal_time_tuning_block(tmp_path)
    assert "| class/noise | sdo | lr, constant | 12 | 0.025: -3.000, 0.05: -1.000, 0.1: -2.000 | 0.05 |  |" in text
    assert "| class/noise | full-cosine | lr, cosine | 12 | 0.2: -1.000 | 0.2 | edge, within 1% |" in text
    assert "No tuning results yet for class/edit, style/noise" in text.replace("\n", " ")


def test_the_authors_rows_beside_the_tuned_ones(tmp_path):
    folder = tmp_path / "equal-time"
    _pair(folder, "class", "noise")
    for seed, final in ((0, -1.0), (1, -3.0)):
        _store(folder, "class", "authors-noise", seed, "sdo-authors", [0, 0.5, 1.0], [-9, 0.0, final], lr=0.01)
    text = report.equal_time_authors_block(tmp_path)
    row = next(line for line in text.splitlines() if "| sdo-authors |" in line)
    assert row == (
        "| step 0 | sdo-authors | 0, 1 | 2 | -2.000 ± 1.414 | 0.000 ± 0.000 | 0.50 | 1.0 | "
        "sdo (lr 0.05, constant, 2 seeds): -2.750 ± 0.354 |"
    )


def test_blocks_say_no_results_yet_without_outputs(tmp_path):
    for name in ("equal-time-tuning", "equal-time", "equal-time-goal", "equal-time-authors"):
        assert render(name, tmp_path).startswith("No results yet: run `python benchmarks/compare_equal_time.py`")


def test_the_script_writes_the_tables_the_verdict_and_the_plot(tmp_path):
    folder = tmp_path / "equal-time"
    _pair(folder, "class", "noise")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "equal_time_report.py"
    spec = importlib.util.spec_from_file_location("equal_time_report", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(folder)
    assert (folder / "equal-time.png").stat().st_size > 0
    text = (folder / "equal-time.md").read_text()
    assert "## At equal time\n\n**class / noise** (seeds 0, 1, 2;" in text and "Goal not decided yet" in text
    assert load_json(folder / "equal-time.json")["tables"]["class/noise"][1]["reward_at_1"] == [-3.0, -2.5, -2.0]


def test_iterates_are_read_on_the_cases_calibrated_clock_phase_by_phase():
    from sdo.app.report.equal_time import on_calibrated_clock

    seconds = {"full": 4.0, "sdo-then-exact": 1.0, "checkpointed": 3.0, "sdo-coarse-to-fine": 2.0}
    seconds["sdo-coarse-to-fine@late"] = 0.5
    calibration = {"seconds_per_iteration": seconds}
    measured = [{"k": k, "t": 10.0 * k, "reward": -k} for k in range(5)]  # a slower machine's wall-clock
    record = {"variant": "sdo-then-exact", "switched_at": 2, "iterates": measured, "calibration": calibration}
    assert [it["t"] for it in on_calibrated_clock(record)] == [0.0, 1.0, 2.0, 5.0, 8.0]
    assert [it["t_measured"] for it in on_calibrated_clock(record)] == [0.0, 10.0, 20.0, 30.0, 40.0]
    record.update(variant="sdo-coarse-to-fine", switched_at=3)
    assert [it["t"] for it in on_calibrated_clock(record)] == [0.0, 2.0, 4.0, 6.0, 6.5]
    record.update(variant="full", switched_at=None)
    assert [it["t"] for it in on_calibrated_clock(record)] == [0.0, 4.0, 8.0, 12.0, 16.0]
    assert on_calibrated_clock({**record, "variant": "sdo-beta2"}) == measured  # not calibrated: as measured
