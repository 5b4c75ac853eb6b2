"""Issue 19: run folders that cannot be taken over by the environment, numeric flags bounded in one place, one
prompt-file reader, item and checkpoint files checked before they are trusted, refused runs that change nothing,
and disk-full and interrupt exits without a traceback."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from sdo.app.cli import main
from sdo.app.runs import LOCK_NAME, RunLock, is_secondary_process, write_marker
from sdo.errors import ConfigError, OutputLockedError

OPTIMIZE = ["optimize", "--steps", "2", "--iters", "1", "--batch", "1", "--views", "0"]


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"sdo {argv[0]}: error: "), err
    return err


# Deliver 3: the lock cannot be bypassed by the environment.


@pytest.mark.parametrize("variables", [{"RANK": "1"}, {"RANK": "abc"}, {"RANK": "3", "LOCAL_RANK": "1"}])
def test_rank_variables_do_not_skip_the_lock(variables, tmp_path, capsys, monkeypatch):
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert not is_secondary_process()
    out = tmp_path / "busy"
    with RunLock(out, "optimize"):
        err = one_line_error(capsys, [*OPTIMIZE, "--out", str(out)])
    assert f"is in use by `sdo optimize` process {os.getpid()}" in err
    assert not (out / "config.json").exists()


def test_launcher_variables_without_a_launcher_are_one_line(tmp_path, capsys, monkeypatch):
    from accelerate import PartialState

    PartialState._reset_state()
    before = dict(os.environ)  # a failed process-group start leaves variables behind
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    try:
        err = one_line_error(capsys, [*OPTIMIZE, "--conditions", "2", "--out", str(tmp_path / "o")])
    finally:
        PartialState._reset_state()
        os.environ.clear()
        os.environ.update(before)
    assert "could not join the process group" in err and "WORLD_SIZE=2" in err
    assert not (tmp_path / "o" / "items").exists()


def test_lock_file_that_is_a_folder_is_one_line(tmp_path, capsys):
    out = tmp_path / "o"
    (out / LOCK_NAME).mkdir(parents=True)
    with pytest.raises(OutputLockedError, match="cannot be opened"):
        RunLock(out, "optimize").acquire()
    err = one_line_error(capsys, [*OPTIMIZE, "--out", str(out)])
    assert f"the lock file {out / LOCK_NAME} cannot be opened" in err


@pytest.mark.parametrize("content", [b"\xff\xfe garbage", b"[1, 2]", b'{"pid": "x", "host": null}', b""])
def test_garbage_lock_file_is_taken_over(content, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / LOCK_NAME).write_bytes(content)
    with RunLock(out, "optimize"):
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (out / LOCK_NAME).exists()


def test_stale_lock_message_does_not_call_a_live_pid_gone(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    live = os.getppid()  # a live process unrelated to the lock
    (out / LOCK_NAME).write_text(json.dumps({"pid": live, "host": socket.gethostname(), "command": "optimize"}))
    with RunLock(out, "bench"):
        pass
    err = capsys.readouterr().err
    assert f"cleared a stale lock on {out} left by `sdo optimize` process {live}" in err
    assert "no longer running" not in err and "that run has ended" in err


# Deliver 4: every numeric flag bounded in one place.


def numeric_flags() -> list[tuple[str, str, type]]:
    """(command, flag, type) for every int or float flag of every ``sdo`` command."""
    from sdo.app.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    found = []
    for command, parser in commands.items():
        for action in parser._actions:
            if action.type in (int, float) and action.option_strings:
                found.append((command, action.option_strings[0], action.type))
    return found


NUMERIC_FLAGS = numeric_flags()


def test_every_command_has_numeric_flags():
    commands = {command for command, _, _ in NUMERIC_FLAGS}
    assert commands == {"demo", "optimize", "finetune", "bench", "train-zoo"}
    assert ("finetune", "--kl-weight", float) in NUMERIC_FLAGS and ("bench", "--resolution", int) in NUMERIC_FLAGS


@pytest.mark.parametrize(("command", "flag", "kind"), NUMERIC_FLAGS, ids=[f"{c}{f}" for c, f, _ in NUMERIC_FLAGS])
def test_every_numeric_flag_takes_hostile_values_without_a_traceback(command, flag, kind, tmp_path, capsys):
    """nan, inf, -1, 0 and a huge value, through parsing and the config only (no run): accepted, or refused with
    one ConfigError naming the field, or an argparse error (exit 2). Non-finite floats and 2**63 are refused."""
    from sdo.app.cli import build_parser
    from sdo.errors import ConfigError

    huge = "1e30" if kind is float else str(2**63)
    field = flag[2:].replace("-", "_")
    pending = command == "train-zoo"  # the zoo keeps its own checks (the zoo may not import the apps)
    for value in ("nan", "inf", "-1", "0", huge):
        try:
            args = build_parser().parse_args([command, flag, value, "--out", str(tmp_path / "o")])
        except SystemExit as stop:
            assert stop.code == 2 and kind is int, (flag, value)  # "nan" is not an integer
            continue
        try:
            args.config(args)
        except ConfigError as error:
            assert f"`{field}`" in str(error) or "steps" in str(error), (flag, value, error)
            continue
        must_refuse = value in ("nan", "inf") or (kind is int and value == huge)
        assert pending or not must_refuse, f"{command} {flag} {value} was accepted"
    capsys.readouterr()


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["finetune", "--kl-weight", "nan"], r"--kl-weight must be a finite number >= 0, got nan\.$"),
        (["optimize", "--doodl-lr", "inf"], r"--doodl-lr must be a finite number > 0, got inf"),
        (["optimize", "--iters", "0"], r"--iters must be an integer in \[1, 1000000\]"),
        (["optimize", "--views", "-1"], r"--views must be an integer in \[0, 64\]"),
        (["optimize", "--adjoint-iters", "100000000"], r"--adjoint-iters must be an integer in \[0, 100\]"),
        (
            ["optimize", "--adjoint-checkpoint-every", "-1"],
            r"--adjoint-checkpoint-every must be an integer in \[0, 1000\]",
        ),
        (["optimize", "--conditions", "20000000"], r"--conditions must be an integer in \[0, 10000000\]"),
        (["bench", "--plan", "--model", "sd15", "--width", "0"], r"--width must be a finite number >= 0.1"),
        (["bench", "--plan", "--model", "sd15", "--width", "-1"], r"--width must be a finite number >= 0.1"),
        (["bench", "--plan", "--resolution", "7"], r"--resolution must be an integer in \[64, 4096\], a multiple"),
        (["bench", "--plan", "--resolution", "-8"], r"--resolution must be an integer in \[64, 4096\]"),
        (["bench", "--plan", "--resolution", "100"], r"a multiple of 8, got 100"),
        (["bench", "--steps", "5000"], r"--steps must be comma-separated integers in \[1, 1000\]"),
    ],
)
def test_reported_values_are_one_line(argv, match, tmp_path, capsys):
    import re

    err = one_line_error(capsys, [*argv, "--out", str(tmp_path / "o")])
    assert re.search(match, err), err
    assert not (tmp_path / "o").exists()  # refused before the folder is made


def test_accepted_edge_values_run_end_to_end(tmp_path, capsys):
    edges = ["--iters", "1", "--batch", "1", "--steps", "2", "--start-step", "1", "--views", "0"]
    edges += [
        "--adjoint-iters",
        "0",
        "--adjoint-checkpoint-every",
        "1",
        "--prior-weight",
        "0",
        "--threads",
        "1",
        "--source",
        "-1",
        "--target",
        "0",
    ]
    assert main(["optimize", *edges, "--method", "adjoint", "--out", str(tmp_path / "a")]) == 0
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert len(metrics["history"]) == 2 and metrics["config"]["adjoint_iters"] == 0
    assert metrics["config"]["adjoint_checkpoint_every"] == 1
    plan = ["bench", "--plan", "--model", "sd15", "--width", "0.1", "--resolution", "64", "--batch", "1"]
    assert main([*plan, "--steps", "1", "--out", str(tmp_path / "p")]) == 0
    assert json.loads((tmp_path / "p" / "plan.json").read_text())
    tune = ["finetune", "--steps", "1", "--sample-steps", "2", "--batch-size", "1", "--eval-every", "0"]
    tune += ["--eval-per-class", "1", "--max-grad-norm", "0", "--kl-weight", "0", "--task", "bold"]
    assert main([*tune, "--out", str(tmp_path / "f")]) == 0
    assert (tmp_path / "f" / "sdo" / "adapter.safetensors").is_file()
    capsys.readouterr()


# Deliver 5: one prompt-file reader.


def test_prompt_file_format(tmp_path):
    from sdo.app.prompts import read_prompts

    path = tmp_path / "p.txt"
    path.write_bytes("\ufeff# header\n a cat \n\n   # indented comment\nun café\r\n\t\nlast".encode())
    assert read_prompts(path) == ["a cat", "un café", "last"]
    path.write_bytes(b"ok\nfine\n\xff\xfe bad\n")
    with pytest.raises(ConfigError, match=rf"--prompts {path}, line 3: not UTF-8 text"):
        read_prompts(path)
    for empty in ("", "\n\n", "# only\n  # comments\n"):
        path.write_text(empty)
        with pytest.raises(ConfigError, match=rf"--prompts {path}: no prompts"):
            read_prompts(path)
    with pytest.raises(ConfigError, match="no such file"):
        read_prompts(tmp_path)  # a folder


@pytest.mark.parametrize("content", [b"# comment\n\n", b"a cat\n\xc3\x28\n"])
def test_both_commands_refuse_the_same_prompt_files_in_one_line(content, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_bytes(content)
    pipeline = ["--pipeline", str(tmp_path / "no-such-pipeline"), "--prompts", str(prompts)]
    expected = "no prompts" if content.startswith(b"#") else "line 2: not UTF-8"
    err = one_line_error(capsys, ["optimize", *pipeline, "--out", str(tmp_path / "o")])
    assert f"--prompts {prompts}" in err and expected in err
    err = one_line_error(capsys, ["finetune", "--task", "clip", *pipeline, "--out", str(tmp_path / "f")])
    assert f"--prompts {prompts}" in err and expected in err


# Deliver 1 and 9: an item is done only when all its files are whole; linear bookkeeping.

TINY = ["--steps", "3", "--iters", "2", "--batch", "2", "--views", "0", "--threads", "1"]


def tiny_items(out, conditions: int = 4, **changes):
    from sdo.app.tasks.latent import LatentTaskConfig

    fields = dict(steps=3, iters=2, batch=2, views=0, threads=1, conditions=conditions, out=str(out))
    return LatentTaskConfig(**{**fields, **changes})


def latent_of(out, index: int):
    from sdo.io import load_tensors

    return load_tensors(out / "items" / str(index) / "latent.safetensors")["latent"].clone()


def test_damaged_item_files_are_redone_and_the_summary_follows_the_check(tmp_path, capsys):
    import torch

    from sdo.app.sharded import run_items

    out = tmp_path / "run"
    run_items(tiny_items(out), progress=False)
    reference = [latent_of(out, i) for i in range(4)]
    items = out / "items"
    assert set(json.loads((items / "0" / "metrics.json").read_text())["files"]) == {
        "latent.safetensors",
        "samples.safetensors",
        "image.png",
        *(f"images/{stem}-{index}.png" for stem in ("before", "after") for index in range(2)),
    }
    (items / "0" / "latent.safetensors").unlink()
    samples = items / "1" / "samples.safetensors"
    samples.write_bytes(samples.read_bytes()[: samples.stat().st_size // 2])
    (items / "2" / "image.png").unlink()
    (items / "3" / "metrics.json").write_text("[]")
    leftover = items / "3" / ".latent.safetensors.ab12cd34.tmp"
    leftover.write_bytes(b"half")
    summary = run_items(tiny_items(out), progress=False)
    assert summary["skipped_as_finished"] == 0 and summary["finished"] == 4
    assert not leftover.exists()
    err = capsys.readouterr().err
    assert "item 0 is redone" in err and "item 1 is redone" in err and "item 2 is redone" in err
    for index in range(4):
        torch.testing.assert_close(latent_of(out, index), reference[index], rtol=0, atol=0)
    assert run_items(tiny_items(out), progress=False)["skipped_as_finished"] == 4


def test_verify_also_checks_the_hashes(tmp_path, capsys):
    from sdo.app.sharded import run_items

    out = tmp_path / "run"
    run_items(tiny_items(out, conditions=2), progress=False)
    image = out / "items" / "1" / "image.png"
    data = bytearray(image.read_bytes())
    data[-20] ^= 0xFF  # same size: only the hash tells
    image.write_bytes(bytes(data))
    assert run_items(tiny_items(out, conditions=2), progress=False)["skipped_as_finished"] == 2
    summary = run_items(tiny_items(out, conditions=2), progress=False, verify=True)
    assert summary["skipped_as_finished"] == 1
    assert "item 1 is redone" in capsys.readouterr().err and image.read_bytes() != bytes(data)
    assert main(["optimize", "--conditions", "2", *TINY, "--verify", "--out", str(out)]) == 0
    assert "2 of 2 items finished" in capsys.readouterr().out


def test_truncated_samples_are_redone_before_the_summary_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["optimize", "--conditions", "2", *TINY, "--out", str(out)]
    assert main(argv) == 0
    samples = out / "items" / "0" / "samples.safetensors"
    samples.write_bytes(samples.read_bytes()[:4000] if samples.stat().st_size > 4000 else samples.read_bytes()[:-8])
    assert main(argv) == 0
    assert "item 0 is redone" in capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["skipped_as_finished"] == 1


class _FirstItem(Exception):
    pass


def test_a_huge_run_starts_its_first_item_quickly(tmp_path, monkeypatch):
    import time

    from sdo.app import sharded

    def first_item(config, item, *args):
        assert item.index == 0 and item.seed == sharded.item_seed(0, 0)
        raise _FirstItem

    monkeypatch.setattr(sharded, "_run_item", first_item)
    monkeypatch.setattr(sharded, "load_resources", lambda config: None)
    started = time.perf_counter()
    with pytest.raises(_FirstItem):
        sharded.run_items(tiny_items(tmp_path / "huge", conditions=200_000), progress=False)
    assert time.perf_counter() - started < 15


def test_checkpoint_with_an_altered_file_is_skipped(tmp_path):
    import torch

    from sdo.app.checkpoints import latest_checkpoint, save_checkpoint

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.Adam([weight])
    weight.grad = torch.ones(3)
    optimizer.step()
    save_checkpoint(tmp_path, 1, {"w": weight.detach()}, optimizer, {})
    save_checkpoint(tmp_path, 2, {"w": weight.detach() * 2}, optimizer, {})
    state = json.loads((tmp_path / "step-000002" / "state.json").read_text())
    assert set(state["files"]) == {"weights.safetensors", "optimizer.safetensors"}
    weights = tmp_path / "step-000002" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # a flipped bit in the last tensor: loads fine, the hash tells
    weights.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="does not match its recorded SHA-256"):
        assert latest_checkpoint(tmp_path).step == 1


# Deliver 2: a refused run changes nothing on disk.


def snapshot(folder) -> dict:
    """Every path under ``folder`` with its bytes (None for a folder)."""
    return {
        str(path.relative_to(folder)): None if path.is_dir() else path.read_bytes()
        for path in sorted(folder.rglob("*"))
    }


def refuse_unchanged(capsys, argv, folder) -> str:
    before = snapshot(folder)
    capsys.readouterr()
    err = one_line_error(capsys, argv)
    assert snapshot(folder) == before, err
    return err


def test_refused_reruns_change_nothing(tmp_path, capsys):
    items = tmp_path / "items"
    assert main(["optimize", "--conditions", "2", *TINY, "--out", str(items)]) == 0
    err = refuse_unchanged(capsys, ["optimize", "--conditions", "2", *TINY, "--lr", "0.3", "--out", str(items)], items)
    assert "other settings" in err
    assert json.loads((items / "config.json").read_text())["config"]["lr"] == 0.05
    missing = ["--pipeline", str(tmp_path / "nowhere"), "--prompt", "a cat"]
    single = tmp_path / "single"
    assert main([*OPTIMIZE, "--out", str(single)]) == 0
    err = refuse_unchanged(capsys, [*OPTIMIZE, *missing, "--out", str(single)], single)
    assert "holds a `sdo optimize` latent-optimization run of task 'class', not a" in err  # a folder holds one run
    tune = ["finetune", "--steps", "1", "--sample-steps", "2", "--batch-size", "1", "--eval-every", "0"]
    tune += ["--eval-per-class", "1", "--task", "bold"]
    tuned = tmp_path / "tuned"
    assert main([*tune, "--out", str(tuned)]) == 0
    assert "--seed 0 -> 3" in refuse_unchanged(capsys, [*tune, "--seed", "3", "--out", str(tuned)], tuned)
    bench = tmp_path / "bench"
    bench_argv = ["bench", "--methods", "sdo", "--steps", "2", "--iters", "1", "--batch", "1", "--out", str(bench)]
    assert main(bench_argv) == 0
    with RunLock(bench, "bench"):
        assert "is in use by" in refuse_unchanged(capsys, bench_argv, bench)
        assert "is in use by" in refuse_unchanged(capsys, [*OPTIMIZE, "--out", str(bench)], bench)
    err = refuse_unchanged(capsys, [*OPTIMIZE, "--out", str(tuned)], tuned)
    assert "holds a `sdo finetune` run" in err


def test_a_folder_made_by_a_refused_run_is_removed(tmp_path, capsys):
    missing = ["--pipeline", str(tmp_path / "nowhere"), "--prompt", "a cat"]
    fresh = tmp_path / "new" / "deeper"
    one_line_error(capsys, [*OPTIMIZE, *missing, "--out", str(fresh)])
    assert not (tmp_path / "new").exists()
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    tune = ["finetune", "--task", "clip", "--pipeline", str(tmp_path / "nowhere"), "--prompts", str(prompts)]
    one_line_error(capsys, [*tune, "--out", str(fresh)])
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    one_line_error(capsys, [*OPTIMIZE, *missing, "--out", str(kept)])
    assert kept.is_dir() and snapshot(kept) == {}  # a folder that was there stays


# Deliver 7: disk full and signals.


def disk_full_after(monkeypatch, writes: int, match: str = "") -> list[str]:
    """Make the safetensors writer fail with ENOSPC after ``writes`` writes (of files whose path contains
    ``match``); returns the paths it was asked to write."""
    import errno

    import sdo.io

    real, seen = sdo.io.save_file, []

    def save_file(tensors, path, metadata=None):
        if match in path:
            seen.append(path)
            if len(seen) > writes:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(sdo.io, "save_file", save_file)
    return seen


def test_a_failed_write_names_the_file_and_the_free_space(tmp_path, monkeypatch):
    import errno

    import torch

    import sdo
    from sdo.errors import SdoError, WriteFailedError
    from sdo.io import save_json, save_tensors

    assert sdo.WriteFailedError is WriteFailedError and issubclass(WriteFailedError, OSError)
    disk_full_after(monkeypatch, 0)
    target = tmp_path / "t.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(WriteFailedError, match=rf"could not write {target}: No space left on device \(.* MiB free"):
        save_tensors({"x": torch.ones(2)}, target)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", no_space)
    with pytest.raises(SdoError, match=r"could not write .*j\.json: No space left on device"):
        save_json({"a": 1}, tmp_path / "j.json")
    assert not (tmp_path / "j.json").exists()


def test_disk_full_during_a_checkpoint_keeps_the_last_one_and_resumes(tmp_path, monkeypatch, capsys):
    from sdo.io import load_tensors

    tune = ["finetune", "--steps", "2", "--sample-steps", "2", "--batch-size", "1", "--eval-every", "0"]
    tune += ["--eval-per-class", "1", "--task", "bold", "--checkpoint-every", "1", "--lora-rank", "2"]
    assert main([*tune, "--out", str(tmp_path / "whole")]) == 0
    out = tmp_path / "full"
    disk_full_after(monkeypatch, 1, match="weights.safetensors")  # step 1's checkpoint is written, step 2's is not
    capsys.readouterr()
    assert main([*tune, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert err.startswith("sdo finetune: error: could not write") and "No space left on device" in err
    assert "MiB free on its disk" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001"]
    assert not (out / LOCK_NAME).exists()
    monkeypatch.undo()
    assert main([*tune, "--out", str(out)]) == 0
    assert "Resuming from" in capsys.readouterr().out
    resumed, whole = (
        load_tensors(out / "sdo" / "adapter.safetensors"),
        load_tensors(tmp_path / "whole" / "sdo" / "adapter.safetensors"),
    )
    assert resumed.keys() == whole.keys() and all(resumed[k].equal(whole[k]) for k in whole)


@pytest.mark.slow
def test_ctrl_c_exits_like_sigterm_and_the_run_resumes(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "sdo", "optimize", "--conditions", "40", *TINY, "--out", str(out)]
    # SIGINT's default disposition in the child: a shell starts background jobs (this suite under `... &`) with
    # SIGINT ignored, which Python then never turns into KeyboardInterrupt
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    run = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=default_sigint
    )
    deadline = time.time() + 120
    while not (out / "items" / "0" / "metrics.json").exists() and time.time() < deadline:
        time.sleep(0.1)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "sdo optimize: interrupted; rerun the same command to resume.\n" in err
    assert not (out / LOCK_NAME).exists()
    done = subprocess.run([*argv[:5], "3", *argv[6:]], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and "3 of 3 items finished" in done.stdout, done.stderr[-2000:]


# The remaining tracebacks of issue item 9, and the small points under "Also seen".


@pytest.mark.parametrize("index", ["[]", "null", '{"_class_name": ["StableDiffusionPipeline"]}', '"text"'])
def test_a_malformed_model_index_is_one_line(index, tmp_path, capsys):
    folder = tmp_path / "pipe"
    folder.mkdir()
    (folder / "model_index.json").write_text(index)
    err = one_line_error(
        capsys, ["optimize", "--pipeline", str(folder), "--prompt", "a cat", "--out", str(tmp_path / "o")]
    )
    assert "model_index.json: expected a JSON object" in err or "is not supported" in err


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["optimize", "--reward", "bogus"], "unknown reward 'bogus'"),
        (["optimize", "--reward", "aesthetic"], "scores a --pipeline's images; add --pipeline"),
        (["optimize", "--pipeline", "p", "--prompt", "x", "--reward", "clip=0"], "weighs every term 0"),
        (["optimize", "--pipeline", "p", "--prompt", "x", "--reward", "clip=0,aesthetic=0"], "weighs every term 0"),
        (["finetune", "--pipeline", "p", "--prompts", "x", "--reward", "clip=0"], "weighs every term 0"),
    ],
)
def test_rewards_that_would_be_ignored_or_optimize_nothing_are_refused(argv, match, tmp_path, capsys):
    assert match in one_line_error(capsys, [*argv, "--out", str(tmp_path / "o")])


def test_an_items_metrics_that_is_not_an_object_is_redone(tmp_path, monkeypatch):
    from sdo.app import sharded

    out = tmp_path / "run"
    (out / "items" / "0").mkdir(parents=True)
    (out / "items" / "0" / "metrics.json").write_text("[]")
    write_marker(out, {"command": "optimize", "kind": "items", "task": "class"})  # an sdo run's folder
    ran = []
    monkeypatch.setattr(sharded, "load_resources", lambda config: None)
    monkeypatch.setattr(sharded, "_run_item", lambda config, item, *args: ran.append(item.index) or {"reward_best": 0})
    monkeypatch.setattr(sharded, "write_summary", lambda *args, **kwargs: {"ran": ran})
    assert sharded.run_items(tiny_items(out, conditions=2), progress=False) == {"ran": [0, 1]}


def test_workers_stop_when_their_launcher_is_gone(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from sdo.app import sharded
    from sdo.errors import SdoError

    state = SimpleNamespace(process_index=0, num_processes=2, is_main_process=True, wait_for_everyone=lambda: None)
    monkeypatch.setattr(sharded, "process_state", lambda device: state)
    monkeypatch.setattr(sharded, "load_resources", lambda config: None)
    ran, parents = [], iter([100, 100, 1])  # the launcher dies after the first item
    monkeypatch.setattr(os, "getppid", lambda: next(parents))
    monkeypatch.setattr(sharded, "_run_item", lambda config, item, *args: ran.append(item.index) or {"reward_best": 0})
    with pytest.raises(SdoError, match="the launcher of this run has ended"):
        sharded.run_items(tiny_items(tmp_path / "run", conditions=6), progress=False)
    assert ran == [0]
