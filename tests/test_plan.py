"""``sdo bench --plan``: predictions made without running, checked against measured CPU figures."""

from __future__ import annotations

import time

import pytest
import torch

from sdo.app.bench import BenchConfig, run_bench
from sdo.app.cli import main
from sdo.app.plan import plan_bench, plan_dtype

FACTOR = 1.25  # stated accuracy of the memory prediction against the measured CPU figure (saved activations)
WORKLOADS = {
    "mnist": dict(model="mnist", batch=2),
    "sd15-tiny": dict(model="sd15", batch=1, width=0.1, resolution=64),  # SD-1.5's architecture, narrow and small
}


@pytest.mark.parametrize("workload", ["mnist", pytest.param("sd15-tiny", marks=pytest.mark.slow)])
def test_planned_memory_is_within_the_stated_factor_of_the_measured_cpu_figure(workload):
    config = BenchConfig(methods="sdo,full,checkpointed,nograd", steps="2,4", iters=1, **WORKLOADS[workload])
    started = time.perf_counter()
    plan = {(r["method"], r["steps"]): r for r in plan_bench(config)["rows"]}
    planning = time.perf_counter() - started
    measured = run_bench(config, progress=False)["rows"]
    for row in measured:
        predicted = plan[(row["method"], row["steps"])]["saved_bytes"]
        if row["method"] == "nograd":
            assert predicted == row["peak_mem_bytes"] == 0
            continue
        ratio = predicted / row["peak_mem_bytes"]
        assert 1 / FACTOR <= ratio <= FACTOR, (row["method"], row["steps"], predicted, row["peak_mem_bytes"])
    # The shape of the prediction: sdo flat in the steps, full linear, checkpointed peaks at one rematerialized step.
    assert plan[("sdo", 4)]["saved_bytes"] == plan[("sdo", 2)]["saved_bytes"]
    full_growth = plan[("full", 4)]["saved_bytes"] - plan[("full", 2)]["saved_bytes"]
    assert full_growth == 2 * (plan[("full", 2)]["saved_bytes"] - plan[("sdo", 2)]["saved_bytes"])
    one_step = plan[("sdo", 4)]["saved_bytes"] - plan[("checkpointed", 4)]["saved_bytes"]  # A: sdo saves A + A_r
    assert plan[("checkpointed", 4)]["peak_activation_bytes"] >= one_step  # the step rematerialized in backward
    assert plan[("nograd", 4)]["relative_time"] == 1.0
    assert 1.0 < plan[("sdo", 4)]["relative_time"] < plan[("full", 4)]["relative_time"]
    assert plan[("full", 4)]["relative_time"] < plan[("checkpointed", 4)]["relative_time"]
    assert planning < 60  # nothing runs: a meta-device trace of one call


def test_plan_cli_for_full_size_sd15_runs_nothing(tmp_path, capsys):
    """The full-size SD-1.5 plan (512x512, 50 steps) takes seconds on CPU: no real tensor is ever allocated."""
    args = ["bench", "--plan", "--model", "sd15", "--steps", "50", "--batch", "1", "--out", str(tmp_path)]
    assert main([*args, "--methods", "sdo,checkpointed,nograd", "--variable", "weights"]) == 0
    text = capsys.readouterr().out
    assert "predicted peak activations" in text and (tmp_path / "plan.json").is_file()


def test_plan_for_cuda_needs_no_cuda(tmp_path, capsys, monkeypatch):
    """A CUDA plan is traced on the meta device: it runs on a machine without CUDA, and its figures are those of
    the CPU-device plan in the same dtype (CUDA runs SD-1.5 in bfloat16)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = ["bench", "--plan", "--model", "sd15", "--device", "cuda", "--steps", "4", "--batch", "1"]
    assert main([*args, "--width", "0.1", "--resolution", "64", "--out", str(tmp_path)]) == 0
    assert "predicted peak activations" in capsys.readouterr().out
    tiny = dict(
        model="sd15",
        methods="sdo,alignprop",  # a graph-saving and a checkpointing method: the device changes only the dtype
        variable="weights",
        steps="4",
        batch=1,
    )
    tiny.update(width=0.1, resolution=64, truncation_high=3)
    cuda, cpu = BenchConfig(device="cuda", **tiny), BenchConfig(device="cpu", **tiny)
    assert plan_dtype(cuda) == torch.bfloat16 and plan_dtype(cpu) == torch.float32
    planned, reference = plan_bench(cuda), plan_bench(cpu, dtype=torch.bfloat16)
    assert planned["rows"] == reference["rows"] and planned["profiles"] == reference["profiles"]
    assert planned["rows"] != plan_bench(cpu)["rows"]  # the dtype is what the device changes
