"""The fine-tuning comparison (``sdo.app.finetune_comparison``): update counts from the calibration, evaluations
at 50% and 100% of the budget, the lr chosen by the held-out reward on the tuning seed, exact resumes."""

from __future__ import annotations

import math

import pytest

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
    comparison.run_all(tmp_path, settings, seeds=[0])
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
