"""``--method auto`` (``sdo.app.auto``): the planner's memory against the measured one, the choice at tiny and huge
budgets for each job, the refusal when nothing fits, resume keeping the recorded choice, and the guide against the
stored comparisons."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from sdo.app import cli
from sdo.app.auto import (
    GIB,
    BudgetError,
    Choice,
    choose,
    choose_for_optimize,
    optimize_job,
    plan_activations,
    profile_job,
    with_row_options,
)
from sdo.app.guide import GUIDE, flag_fields, guide_settings
from sdo.app.report.guide import measured_guide
from sdo.app.tasks.latent import LatentTaskConfig, build_task, load_resources, task_problem
from sdo.errors import ConfigError
from sdo.memory import PeakMemory
from sdo.methods import METHODS

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "cpu"
GUIDE_FIRST = {  # the best row of each latent job whose latent replays (what sdo optimize may write)
    job: next(row for row in GUIDE[job] if METHODS[guide_settings(job, row)[0]].runner.replays)
    for job in ("noise", "edit")
}
SMALL = dict(steps=6, iters=1, batch=2, seed=0)


@pytest.fixture(scope="module")
def noise_job():
    config = LatentTaskConfig(**SMALL)
    resources = load_resources(config)
    task = build_task(config, resources)
    return config, task, optimize_job(config, task, resources)


def test_the_guide_is_the_ranking_measured_from_the_stored_comparisons():
    assert measured_guide(RESULTS) == GUIDE, "regenerate GUIDE with `python -m sdo.app.report.guide`"


@pytest.mark.parametrize("method", ["full", "sdo", "checkpointed", "adjoint"])
def test_planned_activations_are_what_autograd_saves_on_the_embedded_model(noise_job, method):
    config, task, job = noise_job
    network, reward = profile_job(job)
    options = config.method_options()
    planned = plan_activations(method, options, job, network, reward)
    with PeakMemory("cpu") as memory:
        x = task.latent.clone().requires_grad_(True)
        x0 = task.sampler.sample(x, grad=METHODS[method].mode(options))
        task.reward(x0, None).sum().backward()
    if method == "checkpointed":  # planned is the peak in backward; CPU measures what is saved in forward (n X + A_r)
        assert memory.peak_bytes < planned
    else:
        assert abs(planned - memory.peak_bytes) <= 0.01 * memory.peak_bytes, (planned, memory.peak_bytes)


def _planned(job, config, row: str) -> int:
    """The planned activations of the guide's ``row`` for ``job``."""
    method, options = guide_settings(job.protocol, row)
    network, reward = profile_job(job)
    return plan_activations(method, with_row_options(config.method_options(), options), job, network, reward)


def test_a_huge_budget_takes_the_guides_best_replaying_row_and_a_tight_one_the_best_that_fits(noise_job):
    config, _, job = noise_job
    replaying = [row for row in GUIDE["noise"] if METHODS[guide_settings("noise", row)[0]].runner.replays]
    huge = choose(job, 1000 * GIB, config.method_options())
    assert huge.row == replaying[0] and huge.parts.total <= 1000 * GIB
    full = next(r for r in replaying if guide_settings("noise", r)[0] == "full")
    budget = huge.parts.weights + huge.parts.optimizer + _planned(job, config, full) - 1  # full misses by one byte
    tight = choose(job, budget, config.method_options())
    assert tight.parts.total <= budget
    ranked = replaying.index(tight.row)
    assert all(planned > budget for key, planned in tight.planned.items() if planned is not None)
    assert ranked > replaying.index(full) and "would need" in tight.reason


def test_nothing_fits_names_the_smallest_budget_and_the_flags(noise_job):
    config, _, job = noise_job
    with pytest.raises(
        BudgetError, match=r"raise --memory-budget to [0-9.]+ or lower the memory with --checkpoint-kept"
    ):
        choose(job, 1, config.method_options(), hints=("--checkpoint-kept", "a smaller --batch"))


def test_an_edit_from_a_later_step_follows_the_editing_guide(noise_job):
    config = LatentTaskConfig(**{**SMALL, "start_step": 3})
    resources = load_resources(config)
    job = optimize_job(config, build_task(config, resources), resources)
    assert job.protocol == "edit" and "editing from step 3" in job.words()
    choice = choose(job, 1000 * GIB, config.method_options())
    assert choice.row == GUIDE_FIRST["edit"]


def test_the_optimize_command_records_its_choice_and_the_latent_replays(tmp_path, capsys):
    out = tmp_path / "auto"
    flags = ["optimize", "--method", "auto", "--memory-budget", "0.05", "--steps", "6", "--iters", "1"]
    assert cli.main([*flags, "--batch", "2", "--out", str(out)]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    record = json.loads((out / "config.json").read_text())["config"]
    choice = Choice.from_record(record["auto"])
    assert record["method"] == "auto" and line == choice.line()
    assert choice.parts.total <= 0.05 * GIB and METHODS[choice.method].runner.replays
    assert json.loads((out / "metrics.json").read_text())["config"]["method"] == choice.method


def test_a_budget_nothing_fits_is_one_line_and_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "none"
    assert (
        cli.main(["optimize", "--method", "auto", "--memory-budget", "0.0001", "--steps", "6", "--out", str(out)]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--memory-budget" in err[0] and "--checkpoint-kept" in err[0]
    assert not out.exists()


def test_a_memory_budget_without_auto_and_auto_over_many_items_are_refused():
    with pytest.raises(ConfigError, match="memory_budget"):
        LatentTaskConfig(method="sdo", memory_budget=4.0)
    with pytest.raises(ConfigError, match="single run"):
        LatentTaskConfig(method="auto", conditions=4)


def test_finetune_auto_records_its_choice_and_a_resume_keeps_it(tmp_path, capsys):
    out = str(tmp_path / "tune")
    flags = [
        "finetune",
        "--method",
        "auto",
        "--batch-size",
        "2",
        "--sample-steps",
        "4",
        "--eval-every",
        "0",
        "--eval-per-class",
        "1",
    ]
    assert cli.main([*flags, "--steps", "1", "--memory-budget", "100", "--out", out]) == 0
    first = json.loads((Path(out) / "config.json").read_text())["config"]["auto"]
    assert first["method"] == GUIDE["weights"][0] or first["row"] == GUIDE["weights"][0]
    capsys.readouterr()
    # a budget nothing fits: a fresh choice would be refused; the resume takes the recorded one
    assert cli.main([*flags, "--steps", "2", "--memory-budget", "0.0001", "--out", out]) == 0
    assert "(recorded: resuming)" in capsys.readouterr().out
    assert json.loads((Path(out) / "config.json").read_text())["config"]["auto"] == first
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]


def test_finetune_auto_refuses_a_budget_nothing_fits(tmp_path, capsys):
    out = tmp_path / "none"
    flags = ["finetune", "--method", "auto", "--memory-budget", "0.0001", "--steps", "1", "--batch-size", "2"]
    assert cli.main([*flags, "--sample-steps", "4", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "nothing fits" in err and "--lora-rank" in err


def _pipeline_config(folder, clip_dir) -> LatentTaskConfig:
    return LatentTaskConfig(
        pipeline=str(folder), clip_path=str(clip_dir / "clip"), prompt="a cat", steps=3, iters=1, batch=1
    )


@pytest.mark.parametrize("family", ["pipeline_dir", "sdxl_dir", "sd3_dir", "flux_dir"])
def test_every_pipeline_family_is_planned_as_autograd_saves_it(family, clip_dir, request):
    config = _pipeline_config(request.getfixturevalue(family), clip_dir)
    resources = load_resources(config)
    task = build_task(config, resources)
    job = optimize_job(config, task, resources)
    network, reward = profile_job(job)
    problem = task_problem(config, task)
    for method in ("full", "sdo"):
        mode = METHODS[method].mode(config.method_options())
        with PeakMemory("cpu") as memory:
            x = problem.latent.clone().requires_grad_(True)
            problem.reward(problem.sampler.sample(x, grad=mode), None).sum().backward()
        planned = plan_activations(method, config.method_options(), job, network, reward)
        assert abs(planned - memory.peak_bytes) <= 0.01 * memory.peak_bytes, (family, method, planned)


def test_on_a_tiny_pipeline_the_weights_count_and_a_budget_below_full_takes_the_next_row(pipeline_dir, clip_dir):
    config = _pipeline_config(pipeline_dir, clip_dir)
    _, choice, built = choose_for_optimize(replace(config, method="auto", memory_budget=1000.0))
    assert choice.parts.weights > 0 and choice.row == GUIDE_FIRST["noise"]
    job = optimize_job(config, built["task"], built["resources"])
    network, reward = profile_job(job)
    planned = plan_activations("full", config.method_options(), job, network, reward)
    tight = choose(job, choice.parts.weights + choice.parts.optimizer + planned - 1, config.method_options())
    assert tight.method != "full" and tight.parts.total < choice.parts.total


def test_the_readmes_auto_guide_block_is_what_the_plan_chooses_today():
    from sdo.app.report.document import check

    assert check(RESULTS.parents[2] / "README.md", RESULTS) == 0


def test_bench_plan_names_the_method_auto_would_choose_under_the_budget(tmp_path):
    from sdo.app.bench import BenchConfig
    from sdo.app.plan import plan_bench

    rows = {}
    for budget in (0.2, 100.0):
        config = BenchConfig(methods="auto,full", memory_budget=budget, steps="10", out=str(tmp_path))
        rows[budget] = {row["method"]: row for row in plan_bench(config)["rows"]}
    assert rows[100.0]["auto (full)"]["peak_activation_bytes"] == rows[100.0]["full"]["peak_activation_bytes"]
    assert "auto (full)" not in rows[0.2] and rows[0.2]["full"]["peak_activation_bytes"] > 0.2 * GIB


def test_finetune_auto_on_a_tiny_pipeline_plans_its_lora_and_records_the_choice(pipeline_dir, clip_dir, tmp_path):
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    out = tmp_path / "tune"
    folders = ["--pipeline", str(pipeline_dir), "--prompts", str(tmp_path / "prompts.txt")]
    flags = ["finetune", "--method", "auto", *folders, "--clip-path", str(clip_dir / "clip"), "--steps", "1"]
    assert cli.main([*flags, "--batch-size", "2", "--sample-steps", "3", "--eval-every", "0", "--out", str(out)]) == 0
    choice = Choice.from_record(json.loads((out / "config.json").read_text())["config"]["auto"])
    assert choice.row == GUIDE["weights"][0] and 0 < choice.parts.optimizer < choice.parts.weights
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_flag_fields_express_a_variants_options_as_flags_or_say_they_cannot():
    assert flag_fields({"betas": (0.9, 0.999)}) == {"adam_beta2": 0.999}
    assert flag_fields({"adjoint_iters": 0, "adjoint_checkpoint_every": None}) == {
        "adjoint_iters": 0,
        "adjoint_checkpoint_every": 0,
    }
    assert flag_fields({"betas": (0.8, 0.999)}) is None  # --adam-beta2 keeps the first decay at 0.9
    assert flag_fields({"project_to_shell": False}) is None  # the authors' setting: no flag row


@pytest.mark.parametrize("job", ["noise", "edit"])
def test_every_latent_guide_row_as_flags_gives_the_options_the_comparison_ran(job):
    """A row's flags, put on a config as ``--method auto`` puts them, and read back as the run reads them
    (``MethodFlags.method_options``; the planner's ``with_row_options``), are the variant's fixed options."""
    from sdo.app.equal_time import VARIANTS

    for row in GUIDE[job]:
        method, options = guide_settings(job, row)
        config = replace(LatentTaskConfig(method=method, out="unused", iters=4), **options)
        ran = config.method_options()
        planned = with_row_options(LatentTaskConfig(out="unused").method_options(), options)
        for key, value in VARIANTS[row].fixed.items():
            assert getattr(ran, key) == getattr(planned, key) == value, (row, key)
