"""The fine-tuning comparison (``sdo.app.finetune_comparison``): update counts from the calibration, evaluations
at 50% and 100% of the budget, the lr chosen by the held-out reward on the tuning seed, exact resumes."""

from __future__ import annotations

import math

import pytest
import torch

from sdo.app import finetune_comparison as comparison
from sdo.app.finetune_comparison import FinetuneComparisonSettings
from sdo.app.report.finetune_comparison import comparison_tables, kl_table, method_rows, tuning_table
from sdo.errors import ResumeMismatchError
from sdo.io import load_json


def test_tuning_then_every_setting_at_its_calibrated_updates_and_a_rerun_is_exact(tmp_path, monkeypatch):
    monkeypatch.setattr(comparison, "METHODS", ("sdo", "full"))
    monkeypatch.setattr(comparison, "SETTINGS", ("confidence", "bold-kl"))
    monkeypatch.setattr(comparison, "LRS", (1e-3, 3e-3))
    monkeypatch.setattr(comparison, "KL_WEIGHTS", (0.0, 10.0))
    monkeypatch.setattr(comparison, "WIDENINGS", 0)
    settings = FinetuneComparisonSettings(
        sample_steps=2, batch_size=2, budget_updates=3, calibration_updates=2, eval_per_class=1
    )
    comparison.run_all(tmp_path, settings, seeds=[0], jobs=2)  # the untimed stages in two worker processes
    calibration = load_json(tmp_path / "calibration" / "confidence.json")
    seconds, updates = calibration["seconds_per_update"], calibration["updates"]
    budget = 3 * seconds["sdo"]
    assert updates == {m: max(2, math.floor(budget / s * (1 + 1e-9))) for m, s in seconds.items()}
    for method in ("sdo", "full"):
        tuned = load_json(tmp_path / "tuning" / f"{method}.json")
        finals = {float(lr): -math.inf if r is None else r for lr, r in tuned["finals"].items()}
        assert tuned["chosen"] == max(finals, key=finals.__getitem__)  # the best held-out reward on seed 100
        record = load_json(tmp_path / "runs" / "confidence" / f"{method}-s0.json")
        n = updates[method]
        assert [r["step"] for r in record["metrics"]] == list(range(1, n + 1))
        evaluated = [r["step"] for r in record["metrics"] if "eval_reward" in r]
        assert evaluated == sorted({math.ceil(n / 2), n})  # 50% and 100% of the budget
        assert record["config"]["lr"] == tuned["chosen"] and record["config"]["kl_weight"] == 0
        kl_run = load_json(tmp_path / "runs" / "bold-kl" / f"{method}-s0.json")
        assert kl_run["config"]["kl_weight"] == load_json(tmp_path / "tuning" / "kl.json")["chosen"]
    tables = comparison_tables(tmp_path)
    assert tables.count("| 1 | ") == 2 and "**bold**: no runs yet." in tables  # ranked confidence and bold-kl
    rows = {row["method"]: row for row in method_rows(tmp_path, "confidence")}
    assert rows["full"]["s_per_update"] == seconds["full"]  # the calibration's: the runs shared the machine
    assert load_json(tmp_path / "runs" / "confidence" / "sdo-s0.json")["machine"]["threads"] == max(
        1, torch.get_num_threads() // 2
    )
    assert rows["sdo"]["eval_reward_100"] == [
        [r for r in load_json(tmp_path / "runs" / "confidence" / "sdo-s0.json")["metrics"] if "eval_reward" in r][-1][
            "eval_reward"
        ]
    ]
    assert "Chosen: `--kl-weight" in kl_table(tmp_path) and "sdo" in tuning_table(tmp_path)
    stamps = {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*.json")}
    comparison.run_all(tmp_path, settings, seeds=[0])
    assert {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*.json")} == stamps
    with pytest.raises(ResumeMismatchError, match=r"confidence\.json was made with settings"):
        comparison.calibrate(tmp_path, "confidence", FinetuneComparisonSettings(sample_steps=3, batch_size=2))


def test_the_kl_grid_goes_on_until_a_weight_keeps_the_judge(tmp_path, monkeypatch):
    """A weight keeps the judge from 50 on (made-up runs): 0-30 hack, so 40 and 50 are run and 50 is chosen, and a
    stored choice with no weight holding is widened further by a rerun that allows more."""
    weights = []

    def fake_run(out, setting, method, seed, lr, settings, kl):
        weights.append(kl)
        evaluation = {"eval_reward": 1.0 - kl / 100, "judge_accuracy": 0.9 if kl >= 50 else 0.5}
        return {"metrics": [{"step": 1, **evaluation}]}

    monkeypatch.setattr(comparison, "run_method", fake_run)
    monkeypatch.setattr(comparison, "tune_lr", lambda out, method, settings: 1e-3)
    monkeypatch.setattr(comparison, "KL_WIDENINGS", 1)
    assert comparison.tune_kl(tmp_path, FinetuneComparisonSettings()) == 40.0  # none holds: the largest run
    assert weights == [0.0, 10.0, 20.0, 30.0, 40.0] and load_json(tmp_path / "tuning" / "kl.json")["held"] == []
    monkeypatch.setattr(comparison, "KL_WIDENINGS", 3)
    assert comparison.tune_kl(tmp_path, FinetuneComparisonSettings()) == 50.0
    assert weights[5:] == [0.0, 10.0, 20.0, 30.0, 40.0, 50.0]  # stored runs load again; 50 holds, so 60 is not run
    assert load_json(tmp_path / "tuning" / "kl.json")["held"] == [50.0]


def _store_comparison(folder, rewards: dict[str, float], judges: dict[str, float]) -> None:
    """A finished comparison with made-up figures: method m's held-out reward is rewards[m] + seed / 100 at both
    evaluations, its judge accuracy judges[m] on ``bold`` (1.0 elsewhere), 0.5 s per update (calibrated)."""
    from sdo.app.finetune_comparison import METHODS, REPORTED_SEEDS, SETTINGS
    from sdo.io import save_json

    for setting in SETTINGS:
        for method in METHODS:
            for seed in REPORTED_SEEDS:
                judge = judges[method] if setting == "bold" else 1.0
                reward = rewards[method] + seed / 100
                evaluation = {"eval_reward": reward, "judge_accuracy": judge, "frechet_judge": 1.0}
                metrics = [{"step": 1, "seconds": 0.5, **evaluation}, {"step": 2, "seconds": 0.5, **evaluation}]
                record = {"config": {"lr": 1e-3}, "metrics": metrics}
                save_json(record, folder / "runs" / setting / f"{method}-s{seed}.json")
    save_json({"chosen": 20.0, "lr": 1e-3, "held": [20.0], "finals": {}}, folder / "tuning" / "kl.json")
    for setting in SETTINGS:
        seconds = {method: 0.5 for method in METHODS}
        save_json({"budget_seconds": 118.4, "seconds_per_update": seconds}, folder / "calibration" / f"{setting}.json")


def test_the_readme_findings_say_how_far_the_run_is_then_rank_every_setting(tmp_path):
    from sdo.app.finetune_comparison import METHODS
    from sdo.app.report.finetune_comparison import FOLDER, complete, stored_runs
    from sdo.app.report.finetune_findings import finetune_findings, which_method_weights

    folder = tmp_path / FOLDER
    assert "is running: 0 of 54 reported runs stored" in finetune_findings(folder)
    rewards = {m: -float(i) for i, m in enumerate(METHODS)}  # sdo best, then full, ...
    judges = {m: 0.9 if m in ("full", "draft-1") else 0.1 for m in METHODS}  # only full and draft-1 keep the judge
    _store_comparison(folder, rewards, judges)
    assert complete(folder) and stored_runs(folder) == 54
    text = " ".join(finetune_findings(folder).split())
    assert "the held-out reward at the end of the budget: sdo 0.010 ± 0.010; full -0.990 ± 0.010" in text
    assert "On `bold` without the regularizer, full -0.990 ± 0.010; draft-1 -1.990 ± 0.010 (reward at its last" in text
    assert "the others hack the reward (judge accuracy at the end: sdo 10% ± 0%" in text
    assert "On `bold` with `--kl-weight 20`" in text and "118 s of training per run" in text
    row = which_method_weights(tmp_path).splitlines()[-1]
    # confidence and bold-kl: sdo 1st, full 2nd; bold: full 1st, draft-1 2nd, the four that hacked share places
    # 3-6 (4.5 each). Mean ranks: sdo (1 + 4.5 + 1) / 3 = 2.17, full (2 + 1 + 2) / 3 = 1.67
    assert row.startswith(
        "| fine-tune weights on a reward | `--method full --lr 0.001`, with `--kl-weight 20` where the reward can be "
        "hacked (tuned on `bold`) |"
    )
    assert "(confidence: place 2 of 6, -0.990 ± 0.010; bold: place 1 of 6, -0.990 ± 0.010; bold-kl: place 2" in row
    assert row.endswith("| bold: full, draft-1 ahead |")
    tables = comparison_tables(folder).split("**")
    bold = tables[tables.index("bold") + 1]
    assert (
        "| 1 | full |" in bold and "| 2 | draft-1 |" in bold and "| - | sdo |" in bold and "| - | alignprop |" in bold
    )
    assert "No place (-): judge accuracy below 80% at every evaluation of every seed" in bold
    assert "| 1 | sdo |" in tables[tables.index("bold-kl") + 1]
    hacked = tmp_path / "every-method-hacked"
    _store_comparison(hacked, rewards, dict.fromkeys(METHODS, 0.1))
    text = " ".join(finetune_findings(hacked).split())
    assert (
        "On `bold` without the regularizer, no method kept the judge at 80% or more on every seed: the reward" in text
    )


def test_methods_that_tie_share_their_places_in_the_mean_rank():
    """a wins the first group; both hacked the second (equal scores): b must not win on the registry's order."""
    from sdo.app.report.guide import by_mean_rank

    assert by_mean_rank({"one": {"a": 1.0, "b": 0.0}, "two": {"a": -math.inf, "b": -math.inf}}, ["b", "a"]) == (
        "a",
        "b",
    )
    assert by_mean_rank({"one": {"a": 0.0, "b": 0.0, "c": 1.0}}, ["b", "a", "c"]) == ("c", "b", "a")
