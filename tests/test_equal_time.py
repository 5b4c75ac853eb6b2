"""The equal-time comparison (``sdo.app.equal_time``): iteration counts from the calibration, the widening grid
search, ``checkpointed`` credited from ``full``'s run, exact resumes."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from sdo.app import equal_time
from sdo.app.equal_time import EqualTimeSettings, iteration_counts, widen
from sdo.app.fair_comparison import Case
from sdo.app.tasks.latent import load_resources
from sdo.errors import ResumeMismatchError
from sdo.io import load_json


def test_each_variant_gets_the_iterations_that_fit_full_backpropagations_budget():
    seconds = {"full": 2.0, "sdo": 0.9, "checkpointed": 3.0, "freedom": 5.0, "doodl-adam": 50.0}
    counts = iteration_counts(seconds, EqualTimeSettings(full_iters=20))
    # T = 20 x 2.0 = 40 s: floor(40 / 0.9) = 44, floor(40 / 3) = 13; a one-pass method and a slow one run once
    assert counts == {"full": 20, "sdo": 44, "checkpointed": 13, "freedom": 1, "doodl-adam": 1}


def _peaked_at(peak: float):
    calls: list[float] = []

    def final_reward(value: float) -> float:
        calls.append(value)
        return -abs(math.log(value / peak))

    return final_reward, calls


def test_a_choice_at_the_grids_edge_is_widened_until_the_next_value_out_is_worse():
    reward, calls = _peaked_at(0.4)
    search = widen((0.025, 0.05, 0.1), reward)
    assert calls == [0.025, 0.05, 0.1, 0.2, 0.4, 0.8]  # 0.4 is interior once 0.8 is seen to be worse
    assert search["chosen"] == pytest.approx(0.4) and not search["edge"] and not search["close"]
    reward, calls = _peaked_at(0.0001)
    search = widen((0.025, 0.05, 0.1), reward, widenings=3)
    assert calls == pytest.approx([0.025, 0.05, 0.1, 0.0125, 0.00625, 0.003125])
    assert search["edge"]  # three values past the edge and still best there: reported as such


def test_an_interior_choice_is_not_widened_and_a_near_tie_is_flagged():
    reward, calls = _peaked_at(0.05)
    assert widen((0.025, 0.05, 0.1), reward)["chosen"] == 0.05 and calls == [0.025, 0.05, 0.1]
    finals = {0.025: -1.0, 0.05: -0.5, 0.1: -0.504}
    search = widen((0.025, 0.05, 0.1), finals.__getitem__)
    assert search["chosen"] == 0.05 and search["close"]  # 0.1 is within 1% of the chosen value's final reward
    stopped = {0.025: -1.0, 0.05: -0.5, 0.1: -math.inf}  # 0.1's run was stopped by a non-finite reward
    assert widen((0.025, 0.05, 0.1), stopped.__getitem__)["chosen"] == 0.05
    assert equal_time.finite_or_none(-math.inf) is None  # stored as None: JSON has no -inf


def test_a_run_resumes_across_an_option_renamed_or_added_at_its_default(tmp_path):
    path = tmp_path / "sdo.json"
    options = equal_time.recorded_options(equal_time.options_of("sdo", 0.05))
    stored = {**options, "old_name": 10, "betas": [0.9, 0.9]}
    del stored["freedom_schedule"]  # added since, at its default
    equal_time.save_result({"options": stored}, path)
    assert equal_time.stored_record(path, {"options": options}) is not None
    changed = {**options, "lr": 0.1}
    with pytest.raises(ResumeMismatchError, match="was made with options"):
        equal_time.stored_record(path, {"options": changed})
    with pytest.raises(ResumeMismatchError):  # a new option away from its default changes the run
        equal_time.stored_record(path, {"options": {**options, "freedom_schedule": "official"}})
    equal_time.save_result({"options": {**options, "draft_k": 1}}, path)  # draft-k's depth: no variant reads it
    assert equal_time.stored_record(path, {"options": {**options, "draft_k": 2}}) is not None
    with pytest.raises(ResumeMismatchError):
        equal_time.stored_record(path, {"options": {**options, "draft_k": 2, "lr": 0.1}})


@pytest.fixture
def three_variants(monkeypatch):
    """sdo, full and checkpointed only, on a 2-value grid (the whole table would take minutes)."""
    table = {name: equal_time.VARIANTS[name] for name in ("sdo", "full", "checkpointed")}
    for name in ("sdo", "full"):
        table[name] = equal_time.Variant(name, grid=(0.05, 0.1), per_pair=True)
    monkeypatch.setattr(equal_time, "VARIANTS", table)
    monkeypatch.setattr(equal_time, "WIDENINGS", 0)


def test_the_tuning_grid_in_two_workers_gives_what_one_process_gives(tmp_path, three_variants, capsys):
    settings = EqualTimeSettings(steps=3, full_iters=2, batch=1, late_step=2, calibration_iters=1)
    resources = equal_time.shared_resources(settings)
    equal_time.tune_pair(tmp_path / "one", "class", "noise", settings, resources)
    shutil.copytree(tmp_path / "one" / "cases", tmp_path / "two" / "cases")  # the same calibration: same horizons
    capsys.readouterr()
    equal_time.tune_pair(tmp_path / "two", "class", "noise", settings, resources, jobs=2)
    assert "[4/4] done" in capsys.readouterr().out  # the four grid runs went to the workers
    for name in ("sdo", "full"):
        for value in (0.05, 0.1):
            one, two = (
                load_json(
                    equal_time._value_path(tmp_path / d, Case("class", "noise", equal_time.TUNING_SEED), name, value)
                )
                for d in ("one", "two")
            )
            assert [it["reward"] for it in two["iterates"]] == pytest.approx(
                [it["reward"] for it in one["iterates"]], rel=1e-4
            )
        chosen = [
            load_json(equal_time.tuning_path(tmp_path / d, "class", "noise", name))["chosen"] for d in ("one", "two")
        ]
        assert chosen[0] == chosen[1]


def test_checkpointed_is_full_credited_at_its_own_time_and_a_rerun_is_exact(tmp_path, three_variants):
    settings = EqualTimeSettings(steps=3, full_iters=2, batch=1, late_step=2, calibration_iters=1)
    resources = load_resources(settings.task_config(Case("class", "noise", 0), "sdo", 1))
    equal_time.tune_pair(tmp_path, "class", "noise", settings, resources)
    case = Case("class", "noise", 0)
    equal_time.run_case(tmp_path, case, settings, resources)
    folder = tmp_path / "cases" / case.key
    calibration = load_json(folder / "calibration.json")
    full, checkpointed = load_json(folder / "full.json"), load_json(folder / "checkpointed.json")
    seconds = calibration["seconds_per_iteration"]
    ratio = seconds["checkpointed"] / seconds["full"]
    budget = full["iterates"][-1]["t"]
    within = [it for it in full["iterates"] if it["t"] * ratio <= budget * (1 + 1e-9)]
    assert len(full["iterates"]) == 3 and len(checkpointed["iterates"]) == len(within) >= 1
    for mine, source in zip(checkpointed["iterates"], within, strict=True):
        assert mine["reward"] == source["reward"] and mine["t"] == pytest.approx(source["t"] * ratio)
    tuned = load_json(tmp_path / "tuning" / "class-noise" / "full.json")
    assert full["options"]["lr"] == checkpointed["options"]["lr"] == tuned["chosen"]
    assert full["peak_mem_bytes"] > 0  # from the separate, measured pass
    stamps = {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*.json")}
    equal_time.run_case(tmp_path, case, settings, resources)  # everything stored: nothing reruns
    assert {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*.json")} == stamps
    with pytest.raises(ResumeMismatchError, match=r"calibration\.json was made with settings"):
        equal_time.run_case(tmp_path, case, EqualTimeSettings(steps=3, full_iters=3, batch=1, late_step=2), resources)


def test_a_search_stored_at_its_edge_continues_when_more_widenings_are_allowed(monkeypatch):
    grid = (0.025, 0.05, 0.1)
    at_edge = {"edge": True, "finals": {"0.025": -3.0, "0.05": -2.0, "0.1": -1.0, "0.2": -0.5}}
    monkeypatch.setattr(equal_time, "WIDENINGS", 1)
    assert not equal_time._may_widen(at_edge, grid)  # one widening allowed, one done: reported at the edge
    monkeypatch.setattr(equal_time, "WIDENINGS", 2)
    assert equal_time._may_widen(at_edge, grid)
    assert not equal_time._may_widen({**at_edge, "edge": False}, grid)  # interior: nothing to continue


def test_a_stall_is_patience_iterations_without_a_new_best_so_far():
    history = [{"best_so_far": b} for b in (-3.0, -2.0, -2.0, -2.0)]
    assert not equal_time.stalled(history, 3)  # -2.0 is new at the second iteration: two without since
    assert equal_time.stalled([*history, {"best_so_far": -2.0}], 3)
    assert not equal_time.stalled([*history, {"best_so_far": -1.5}], 3)
    assert not equal_time.stalled(history[:3], 3)  # too short to tell


def test_sdo_then_exact_switches_to_the_exact_gradient_and_spends_the_budget_by_phase(monkeypatch):
    from sdo.gradients import Checkpointed, Shortcut

    settings = EqualTimeSettings(steps=3, full_iters=6, batch=1, late_step=2)
    case = Case("class", "noise", 0)
    resources = load_resources(settings.task_config(case, "sdo", 1))
    calibration = {"seconds_per_iteration": {"full": 1.0, "sdo-then-exact": 1.0, "checkpointed": 2.0}}
    calibration["iterations"] = {"sdo-then-exact": 6}
    options = equal_time.options_of("sdo-then-exact", 0.05)
    monkeypatch.setattr(equal_time, "PATIENCE", 0)  # a stall at once: the exact gradient from the second iteration
    run = equal_time._run("sdo-then-exact", options, case, 6, settings, resources, calibration=calibration)
    assert isinstance(run.stepper.grad, Shortcut)
    equal_time.take_rounds(run, "test")
    # budget 6 s: one SDO iteration (1 s), then exact ones (2 s each) while they fit: 1 + 2 + 2 = 5, a third is 7
    assert len(run.stepper.history) == 3 and run.switched_at == 1 and isinstance(run.stepper.grad, Checkpointed)
    record, _ = run.finish()
    assert record["switched_at"] == 1 and len(record["iterates"]) == 4
    monkeypatch.setattr(equal_time, "PATIENCE", 10**6)  # never stalls: SDO for the whole budget, 6 x 1 s
    run = equal_time._run("sdo-then-exact", options, case, 6, settings, resources, calibration=calibration)
    equal_time.take_rounds(run, "test")
    assert len(run.stepper.history) == 6 and run.switched_at is None


def test_coarse_to_fine_spends_half_the_budget_from_the_noise_then_goes_on_from_the_late_step():
    from sdo.gradients import NoGrad

    settings = EqualTimeSettings(steps=4, full_iters=6, batch=2, late_step=2)
    case = Case("class", "noise", 0)
    resources = load_resources(settings.task_config(case, "sdo", 1))
    name = "sdo-coarse-to-fine"
    seconds = {"full": 1.0, name: 1.0, equal_time.late_key(name): 0.5}
    # T = 6 s: 3 iterations from the noise (3 s), then 3 s / 0.5 s = 6 from step 2
    assert equal_time.coarse_to_fine_counts(name, seconds, settings) == (3, 6)
    assert equal_time.iteration_counts(seconds, settings)[name] == 9
    calibration = {"seconds_per_iteration": seconds, "iterations": {name: 9}}
    options = equal_time.options_of(name, 0.05)
    run = equal_time._run(name, options, case, 9, settings, resources, calibration=calibration)
    equal_time.take_rounds(run, "test")
    history = run.stepper.history
    assert run.switched_at == 3 and len(history) == 9
    # the second phase's first iterate evaluates the first phase's last latent, sampled to the end
    assert history[3]["reward"] != history[2]["reward"]
    best = [max(h["rewards"][b] for h in history[: k + 1]) for k in range(9) for b in range(2)]
    joined = [sum(best[2 * k : 2 * k + 2]) / 2 for k in range(9)]
    assert [h["best_so_far"] for h in history] == pytest.approx(joined)
    record, tensors = run.finish()
    assert record["switched_at"] == 3 and record["late_step"] == 2 and len(record["iterates"]) == 10
    # float32 batch means: each sample's best, averaged, is at least the best mean up to rounding
    best_mean = max(it["reward"] for it in record["iterates"])
    assert record["iterates"][-1]["best_so_far"] >= best_mean - 1e-6 * abs(best_mean)
    # the final latent lives at step 2: replayed from there it gives the stored final sample
    latent = run.stepper.current.latent.detach()
    replay = run.task.sampler.sample(latent, NoGrad(), start_step=2)
    torch.testing.assert_close(replay.float(), tensors["final_sample"])


def test_a_variant_added_later_is_calibrated_beside_full_on_the_stored_clock(tmp_path, three_variants, monkeypatch):
    settings = EqualTimeSettings(steps=3, full_iters=2, batch=1, late_step=2, calibration_iters=1)
    case = Case("class", "noise", 0)
    resources = load_resources(settings.task_config(case, "sdo", 1))
    first = equal_time.calibrate(tmp_path, case, settings, resources)
    table = {**equal_time.VARIANTS, "sdo-beta2": equal_time.Variant("sdo", fixed={"betas": (0.9, 0.999)})}
    monkeypatch.setattr(equal_time, "VARIANTS", table)
    extended = equal_time.calibrate(tmp_path, case, settings, resources)
    seconds = extended["seconds_per_iteration"]
    assert {n: seconds[n] for n in first["seconds_per_iteration"]} == first["seconds_per_iteration"]
    (extension,) = extended["extensions"]
    assert extension["variants"] == ["sdo-beta2"] and extension["full_seconds_ratio"] > 0
    assert extended["iterations"] == equal_time.iteration_counts(seconds, settings)
    assert load_json(tmp_path / "cases" / case.key / "calibration.json") == extended
    assert equal_time.calibrate(tmp_path, case, settings, resources) == extended  # complete: read, not rerun


def test_the_fallbacks_run_only_after_every_kept_variants_tuning_and_cases(monkeypatch, tmp_path):
    stages: list[tuple[str, str, tuple[str, ...]]] = []
    monkeypatch.setattr(
        equal_time, "tune_pair", lambda o, task, p, s, r, variants, jobs: stages.append(("tune", task, variants))
    )
    monkeypatch.setattr(
        equal_time, "run_case", lambda o, case, s, r, variants: stages.append(("case", case.task, variants))
    )
    monkeypatch.setattr(equal_time, "run_authors", lambda o, case, s, r: stages.append(("authors", case.task, ())))
    equal_time.run_all(tmp_path, EqualTimeSettings(), None, ["style", "class"], [0])
    fallback_stages = [i for i, (_, _, variants) in enumerate(stages) if variants == equal_time.FALLBACKS]
    kept_stages = [
        i for i, (stage, _, variants) in enumerate(stages) if stage != "authors" and variants != equal_time.FALLBACKS
    ]
    assert max(kept_stages) < min(fallback_stages) and len(fallback_stages) == len(kept_stages) == 2 * (2 + 2)
    assert not set(equal_time.FALLBACKS) & set(stages[0][2])  # the first pass keeps every variant but the fallbacks
    assert [s[1] for s in stages[:4]] == ["class"] * 4 and stages[4][0] == "authors"  # the class task first
    stages.clear()
    equal_time.run_all(tmp_path, EqualTimeSettings(), None, ["class"], [0], passes=["fallbacks"])
    assert {variants for _, _, variants in stages} == {equal_time.FALLBACKS}  # no authors' rows, no kept variant
