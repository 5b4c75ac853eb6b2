"""Issue 19: run folders that cannot be taken over by the environment, numeric flags bounded in one place, one
prompt-file reader, item and checkpoint files checked before they are trusted, refused runs that change nothing,
and disk-full and interrupt exits without a traceback."""

from __future__ import annotations

import json
import os
import socket

import pytest

from sdo.app.cli import main
from sdo.app.runs import LOCK_NAME, RunLock, is_secondary_process
from sdo.errors import OutputLockedError

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
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    try:
        err = one_line_error(capsys, [*OPTIMIZE, "--conditions", "2", "--out", str(tmp_path / "o")])
    finally:
        PartialState._reset_state()
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
