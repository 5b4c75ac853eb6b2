"""``sdo optimize --conditions N``: items sharded over processes, per-item results independent of the sharding,
resumable after an interruption (including ``kill -9``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sdo.app.prompts import read_prompts
from sdo.app.sharded import item_seed, items_of, run_items
from sdo.app.tasks.latent import LatentTaskConfig
from sdo.errors import ConfigError
from sdo.io import load_json, load_tensors, save_json
from tiny_pipelines import two_cpu_processes_launch

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY = ["--steps", "3", "--iters", "2", "--batch", "2", "--views", "0", "--threads", "1"]


def tiny_config(out: Path, conditions: int = 3, **changes) -> LatentTaskConfig:
    fields = dict(steps=3, iters=2, batch=2, views=0, threads=1, conditions=conditions, out=str(out))
    return LatentTaskConfig(**{**fields, **changes})


def sdo_command(out: Path, conditions: int) -> list[str]:
    return ["-m", "sdo", "optimize", "--conditions", str(conditions), "--out", str(out), *TINY]


def environment() -> dict:
    path = os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def item_result(out: Path, index: int) -> tuple[torch.Tensor, dict]:
    folder = out / "items" / str(index)
    latent = load_tensors(folder / "latent.safetensors")["latent"].clone()  # a copy, not a map of the file
    return latent, load_json(folder / "metrics.json")


def test_items_depend_on_their_index_and_the_seed_only(tmp_path):
    items = items_of(tiny_config(tmp_path, conditions=90))
    assert {(item.source, item.target) for item in items} == {(s, t) for s in range(10) for t in range(10) if s != t}
    assert items_of(tiny_config(tmp_path, conditions=5)) == items[:5]  # more items never change the first ones
    assert [item.seed for item in items[:3]] == [item_seed(0, i) for i in range(3)]
    assert len({item.seed for item in items}) == 90
    other = items_of(tiny_config(tmp_path, conditions=5, seed=1))
    assert all(a.seed != b.seed and a.source == b.source for a, b in zip(items, other, strict=False))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\na cat\n\n  a dog  \n")
    assert read_prompts(prompts) == ["a cat", "a dog"]
    prompts.write_text("# nothing\n")
    with pytest.raises(ConfigError, match="no prompts"):
        read_prompts(prompts)
    with pytest.raises(ConfigError, match="--pipeline"):
        LatentTaskConfig(prompts=str(prompts))


@pytest.mark.slow
def test_two_gloo_processes_give_every_item_the_one_process_result(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    summary = run_items(tiny_config(one), progress=False)
    assert summary["finished"] == 3 and summary["processes"] == 1
    launch = two_cpu_processes_launch()
    done = subprocess.run(
        [*launch, *sdo_command(two, 3), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=600,
        env=environment(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "3 of 3 items finished (2 processes)" in done.stdout
    for index in range(3):
        latent_one, metrics_one = item_result(one, index)
        latent_two, metrics_two = item_result(two, index)
        torch.testing.assert_close(latent_two, latent_one, rtol=1e-5, atol=1e-5)
        assert metrics_two["item"] == metrics_one["item"]
        assert metrics_two["reward_final"] == pytest.approx(metrics_one["reward_final"], rel=1e-5, abs=1e-5)
    assert (two / "grid.png").read_bytes()[:4] == b"\x89PNG"
    assert load_json(two / "summary.json")["methods"]["sdo"]["items"] == 3


def test_rerun_skips_finished_items_and_redoes_unfinished_ones(tmp_path):
    out = tmp_path / "run"
    run_items(tiny_config(out, conditions=2), progress=False)
    latent_1, _ = item_result(out, 1)
    finished = out / "items" / "0" / "metrics.json"
    stamp = finished.stat().st_mtime_ns
    (out / "items" / "1" / "metrics.json").unlink()  # item 1 was in flight: its other files may be there
    (out / "items" / "1" / "latent.safetensors").unlink()
    (out / "items" / "1" / "latent.safetensors").write_bytes(b"truncated")
    summary = run_items(tiny_config(out, conditions=3), progress=False)
    assert summary["skipped_as_finished"] == 1 and summary["finished"] == 3
    assert finished.stat().st_mtime_ns == stamp
    torch.testing.assert_close(item_result(out, 1)[0], latent_1, rtol=0, atol=0)
    assert "sdo" in (out / "summary.md").read_text()
    with pytest.raises(ConfigError, match="other settings"):
        run_items(tiny_config(out, conditions=3, lr=0.1), progress=False)


@pytest.mark.slow
def test_kill_9_loses_only_the_items_in_flight(tmp_path):
    out, reference = tmp_path / "killed", tmp_path / "reference"
    conditions = 6
    process = subprocess.Popen([sys.executable, *sdo_command(out, conditions)], env=environment())
    try:
        deadline = time.monotonic() + 300
        while not (out / "items" / "0" / "metrics.json").exists():
            assert process.poll() is None and time.monotonic() < deadline, "the run ended before its first item"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    kept = {p.parent.name: p.stat().st_mtime_ns for p in (out / "items").glob("*/metrics.json")}
    assert 1 <= len(kept) < conditions, kept
    for metrics in (out / "items").glob("*/metrics.json"):
        load_json(metrics)  # every done marker is complete: written atomically
    summary = run_items(tiny_config(out, conditions=conditions), progress=False)
    assert summary["finished"] == conditions and summary["skipped_as_finished"] == len(kept)
    assert {
        p.parent.name: p.stat().st_mtime_ns for p in (out / "items").glob("*/metrics.json") if p.parent.name in kept
    } == kept
    run_items(replace(tiny_config(reference, conditions=conditions)), progress=False)
    for index in range(conditions):
        torch.testing.assert_close(item_result(out, index)[0], item_result(reference, index)[0], rtol=0, atol=0)


def test_items_recorded_before_a_flag_existed_resume_with_its_default(tmp_path):
    out = tmp_path / "run"
    run_items(tiny_config(out, conditions=1), progress=False)
    marker = out / "items" / "0" / "metrics.json"
    metrics = load_json(marker)
    assert metrics["spec"].pop("lr_schedule") == "constant"  # as a folder written before --lr-schedule existed
    assert metrics["spec"].pop("freedom_schedule") == "sdo"  # and before --freedom-schedule
    save_json(metrics, marker)
    stamp = marker.stat().st_mtime_ns
    assert run_items(tiny_config(out, conditions=1), progress=False)["skipped_as_finished"] == 1
    assert marker.stat().st_mtime_ns == stamp  # reused, not redone
    with pytest.raises(ConfigError, match=r"other settings \(item 0: lr_schedule='constant', now 'cosine'\)"):
        run_items(tiny_config(out, conditions=1, lr_schedule="cosine"), progress=False)
