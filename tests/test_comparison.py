"""The comparison engine (``sdo.app.comparison``) that ``sdo bench`` and the scripts in ``benchmarks/`` share, and
the scripts' thinness."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdo.app.comparison import credited_iterates, interleave, reward_at, save_result, stored_record
from sdo.errors import ResumeMismatchError
from sdo.io import load_json
from sdo.methods import METHODS

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


class _Run:
    def __init__(self, name: str, rounds: int, log: list[str]) -> None:
        self.name, self.rounds, self.log = name, rounds, log

    def iterate(self) -> None:
        self.log.append(self.name)


def test_runs_take_turns_and_a_shorter_run_sits_out_the_rounds_it_does_not_take():
    log: list[str] = []
    interleave([_Run("a", 3, log), _Run("freedom", 1, log), _Run("b", 2, log)], "test", progress=False)
    assert log == ["a", "freedom", "b", "a", "b", "a"]


def test_iterate_k_is_credited_at_the_training_time_through_update_k():
    iterates = credited_iterates([0.5, 0.25, 1.0], [0.1, 0.2, 0.3, 0.4])
    assert iterates == [(0.0, 0.1), (0.5, 0.2), (0.75, 0.3), (1.75, 0.4)]
    assert reward_at(iterates, 0.75) == 0.3 and reward_at(iterates, 0.74) == 0.2 and reward_at(iterates, -1) is None
    with pytest.raises(ValueError):  # one reward per iterate: n updates give n + 1 iterates
        credited_iterates([0.5], [0.1])


def test_a_stored_result_is_skipped_and_one_made_with_other_settings_refused(tmp_path):
    path = tmp_path / "cases" / "class-noise-s0" / "sdo.json"
    assert stored_record(path, {"settings": {"iters": 20}}) is None
    save_result({"settings": {"iters": 20}, "final": 0.5}, path)
    assert stored_record(path, {"settings": {"iters": 20}})["final"] == 0.5
    with pytest.raises(ResumeMismatchError, match=r"sdo\.json was made with settings=\{'iters': 20\}.*'iters': 10"):
        stored_record(path, {"settings": {"iters": 10}})
    assert load_json(path)["final"] == 0.5  # the stored result is left as it is
    save_result({"options": {"betas": (0.9, 0.9)}}, path)
    assert stored_record(path, {"options": {"betas": (0.9, 0.9)}}) is not None  # JSON keeps a tuple as a list


def test_only_freedom_runs_are_one_pass():
    assert [name for name, method in METHODS.items() if method.runner.one_pass] == ["freedom"]


@pytest.mark.parametrize("script", sorted(BENCHMARKS.glob("*.py")), ids=lambda path: path.name)
def test_benchmark_scripts_are_thin_and_import_the_package(script):
    text = script.read_text()
    assert "sys.path" not in text, f"{script.name} edits sys.path; import sdo (what scripts share lives there)"
    assert len(text.splitlines()) < 250, f"{script.name}: move what is not the script's own into sdo.app"
