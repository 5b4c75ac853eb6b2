"""Every error ``sdo`` raises on purpose is an ``SdoError``, and the command prints it as one line (exit 2)."""

from __future__ import annotations

import sys

import pytest

import sdo
from sdo.app import cli
from sdo.clip_rewards import ClipImageEncoder


def one_line_error(capsys, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sdo {argv[0]}: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


def test_the_family_derives_from_the_builtin_exceptions_callers_catch():
    assert issubclass(sdo.ConfigError, ValueError) and issubclass(sdo.CorruptFileError, ValueError)
    assert issubclass(sdo.MissingWeightsError, FileNotFoundError)
    assert issubclass(sdo.MissingExtraError, ImportError)
    for error in (sdo.ConfigError, sdo.CorruptFileError, sdo.MissingWeightsError, sdo.MissingExtraError):
        assert issubclass(error, sdo.SdoError)
    assert issubclass(sdo.NonFiniteRewardError, sdo.SdoError)


def test_bad_flag_value(capsys):
    assert "`start_step` must be in [0, 49]" in one_line_error(capsys, ["optimize", "--start-step", "60"])


def test_unknown_method_in_bench(capsys):
    line = one_line_error(capsys, ["bench", "--methods", "sdo,magic"])
    assert "unknown method 'magic'" in line and "--list-methods" in line


def test_missing_pipeline_weights(capsys, tmp_path):
    line = one_line_error(capsys, ["optimize", "--pipeline", str(tmp_path / "nowhere"), "--prompt", "a cat"])
    assert "is not a diffusers pipeline folder" in line and "save_pretrained" in line


def test_missing_clip_weights(monkeypatch):
    monkeypatch.delenv("SDO_CLIP_PATH", raising=False)
    with pytest.raises(
        sdo.MissingWeightsError, match=r"No CLIP model folder given: pass its path \(`clip_path`\), or set"
    ):
        ClipImageEncoder(None)


def test_missing_extra_names_the_extra(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    line = one_line_error(capsys, ["train-zoo", "--out", str(tmp_path / "zoo")])
    assert "pip install 'shortcut-diffusion[train]'" in line


def test_missing_clip_extra_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(sdo.MissingExtraError, match=r"shortcut-diffusion\[clip\]"):
        ClipImageEncoder("anything")


def test_corrupt_zoo_file(capsys, monkeypatch, tmp_path):
    (tmp_path / "unet.safetensors").write_bytes(b"\x00" * 12)
    monkeypatch.setenv("SDO_ZOO_DIR", str(tmp_path))
    line = one_line_error(capsys, ["optimize", "--iters", "1", "--steps", "2", "--out", str(tmp_path / "out")])
    assert "unet.safetensors: not a valid safetensors file" in line


def test_non_finite_reward_is_one_line(capsys, monkeypatch, tmp_path):
    def diverge(args):
        raise sdo.NonFiniteRewardError("The reward is not finite at iteration 3 ([nan]); stopped.")

    monkeypatch.setattr(cli, "_optimize", diverge)
    assert "not finite at iteration 3" in one_line_error(capsys, ["optimize", "--out", str(tmp_path)])


def test_a_real_bug_keeps_its_traceback(monkeypatch, tmp_path):
    def bug(args):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "_optimize", bug)
    with pytest.raises(KeyError):
        cli.main(["optimize", "--out", str(tmp_path)])


def test_list_methods_prints_one_line_per_registered_method(capsys):
    assert cli.main(["bench", "--list-methods"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(sdo.methods.METHODS)
    assert all(len(line.split(maxsplit=1)) == 2 for line in lines)
