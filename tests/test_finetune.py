"""Reward fine-tuning: single and 2-process (Accelerate, gloo) runs, resume, damaged checkpoints, NaN rewards."""

from __future__ import annotations

import json
import os
import subprocess
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch

import sdo
from sdo import zoo
from sdo.app.checkpoints import latest_checkpoint
from sdo.app.finetuning import FinetuneConfig, Trainer, finetune, ink_reward, load_adapter
from sdo.io import load_tensors
from tiny_pipelines import two_cpu_processes_launch

SMALL = dict(steps=4, sample_steps=4, batch_size=4, eval_every=0, eval_per_class=1, checkpoint_every=2, lr=5e-3)


def small_config(tmp_path, name="run", **changes) -> FinetuneConfig:
    return FinetuneConfig(**{**SMALL, "out": str(tmp_path / name), **changes})


def read_metrics(config):
    return [json.loads(line) for line in open(os.path.join(config.out, "metrics.jsonl"))]


def adapter(config):
    return load_tensors(os.path.join(config.out, "sdo", "adapter.safetensors"))


class Interrupt(Exception):
    pass


@contextmanager
def interrupted_at(update: int):
    """Fine-tuning in this block stops with ``Interrupt`` at optimizer update ``update`` (as a kill would, after the
    checkpoint before it), the reward unchanged: a rerun resumes only with the same reward function."""
    original = Trainer.update

    def update_or_stop(self, iteration: int) -> dict:
        if iteration == update:
            raise Interrupt
        return original(self, step=iteration)  # the old keyword of Trainer.update keeps working

    Trainer.update = update_or_stop
    try:
        yield
    finally:
        Trainer.update = original


def test_single_process_run_writes_everything(tmp_path):
    config = small_config(tmp_path, task="bold", eval_every=2)
    last = finetune(config, progress=False)
    records = read_metrics(config)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all({"reward", "seconds"} <= set(r) for r in records)
    assert {"judge_accuracy", "frechet_judge"} <= set(records[1]) and "judge_accuracy" not in records[0]
    assert 0 < records[1]["eval_reward"] < 1 and "eval_reward" not in records[0]  # bold: mean ink on held-out samples
    assert last == records[-1]
    assert (tmp_path / "run" / "reward_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert len(adapter(config)) > 0 and all("lora" in name for name in adapter(config))
    samples = sorted(path.name for path in (tmp_path / "run" / "samples").iterdir())
    assert samples == ["step-000002.png", "step-000004.png"]  # each evaluation, the last one at the end
    from PIL import Image

    grid = Image.open(tmp_path / "run" / "samples" / "step-000004.png")
    assert grid.size == (4 * 32, 3 * 32)  # 10 held-out digits (1 per class) in a 4-column grid, full resolution
    assert not (tmp_path / "run" / "pytorch_lora_weights.safetensors").exists()  # the zoo keeps sdo's file only


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path):
    straight = small_config(tmp_path, "straight", method="draft-1")
    finetune(straight, reward=ink_reward, progress=False)
    resumed = small_config(tmp_path, "resumed", method="draft-1")
    with pytest.raises(Interrupt), interrupted_at(3):
        finetune(resumed, reward=ink_reward, progress=False)  # killed during update 3; checkpoint at 2
    assert latest_checkpoint(tmp_path / "resumed" / "checkpoints").step == 2
    finetune(resumed, reward=ink_reward, progress=False)
    assert [r["step"] for r in read_metrics(resumed)] == [1, 2, 3, 4]
    for name, value in adapter(straight).items():
        torch.testing.assert_close(adapter(resumed)[name], value, rtol=0, atol=0)


def test_checkpoint_kept_recomputes_the_graphed_steps_trains_the_same_weights_and_may_change_on_resume(tmp_path):
    plain = small_config(tmp_path, "plain", method="draft-k", draft_k=2)
    kept = small_config(tmp_path, "kept", method="draft-k", draft_k=2, checkpoint_kept=True)
    assert kept.mode(torch.Generator()).checkpoint and not plain.mode(torch.Generator()).checkpoint
    finetune(plain, reward=ink_reward, progress=False)
    with pytest.raises(Interrupt), interrupted_at(3):
        finetune(replace(kept, checkpoint_kept=False), reward=ink_reward, progress=False)
    finetune(kept, reward=ink_reward, progress=False)  # resumes at step 2, now recomputing the graphed steps
    assert [r["step"] for r in read_metrics(kept)] == [1, 2, 3, 4]
    for name, value in adapter(plain).items():
        torch.testing.assert_close(adapter(kept)[name], value, rtol=0, atol=0)


def test_damaged_checkpoint_is_reported_and_the_previous_one_used(tmp_path):
    config = small_config(tmp_path, steps=3, checkpoint_every=1, task="bold")
    finetune(config, progress=False)
    newest = tmp_path / "run" / "checkpoints" / "step-000003" / "weights.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.warns(
        UserWarning, match=r"Skipping damaged checkpoint .*step-000003.*has 100 bytes, not the \d+ recorded"
    ):
        assert latest_checkpoint(tmp_path / "run" / "checkpoints").step == 2


def test_nan_reward_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    calls = []

    def reward(x0, labels):
        calls.append(1)
        return ink_reward(x0, labels) * (float("nan") if len(calls) == 3 else 1.0)

    config = small_config(tmp_path)
    with pytest.raises(
        sdo.NonFiniteRewardError, match=r"not finite at step 3 .*Last good checkpoint: .*step-000002"
    ) as err:
        finetune(config, reward=reward, progress=False)
    assert err.value.result["step"] == 3 and err.value.result["last_checkpoint"].endswith("step-000002")
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").step == 2


def test_saved_adapter_loads_in_one_call_and_changes_the_samples(tmp_path):
    config = small_config(tmp_path, task="bold", lr=2e-2)
    finetune(config, progress=False)
    labels = torch.arange(4)
    base = zoo.sample_digits(zoo.load_unet(), labels, steps=5)
    tuned_unet = load_adapter(zoo.load_unet(), tmp_path / "run" / "sdo" / "adapter.safetensors")
    tuned = zoo.sample_digits(tuned_unet, labels, steps=5)
    assert (tuned - base).abs().max() > 1e-3
    assert ink_reward(tuned).mean() > ink_reward(base).mean()  # the bold task made the strokes heavier


def test_full_weights_and_every_method_run(tmp_path):
    for method in ("sdo", "draft-k", "alignprop", "random-truncation", "full"):
        rank = 0 if method == "full" else 2
        config = small_config(
            tmp_path, method, method=method, steps=1, sample_steps=3, batch_size=2, lora_rank=rank, truncation_high=3
        )
        record = finetune(config, progress=False)
        assert torch.isfinite(torch.tensor(record["reward"]))


def test_a_folder_trained_with_the_former_alignprop_is_not_resumed(tmp_path):
    """``alignprop`` now follows the official code; a folder its former meaning (one depth per trajectory, recorded
    with ``alignprop_high``) trained is refused in one line, and left as it is."""
    config = small_config(tmp_path, method="alignprop", steps=1, checkpoint_every=1)
    finetune(config, progress=False)
    folder = tmp_path / "run"
    for path in (folder / "config.json", latest_checkpoint(folder / "checkpoints").path / "state.json"):
        record = json.loads(path.read_text())
        settings = record.get("config", record)
        settings["alignprop_high"] = settings.pop("truncation_high")  # as written before the split
        path.write_text(json.dumps(record))
    before = {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}
    with pytest.raises(sdo.ResumeMismatchError, match=r"former alignprop .* now --method random-truncation"):
        finetune(replace(config, steps=2), progress=False)
    assert {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()} == before
    assert FinetuneConfig(method="random-truncation", truncation_high=3).truncation_high == 3


def test_a_draw_that_graphs_no_step_accumulates_no_gradient(toy):
    """AlignProp's thresholds may all fall above their steps (at 2 steps: u_0 >= 1 and u_1 = 2, probability 2/9);
    the update then has no gradient, and the weights get none instead of an error."""
    from diffusers import DDIMScheduler

    from sdo.app.finetuning import backward_reward

    model, cond, x = toy
    sampler = sdo.Sampler(lambda x_in, t: model(x_in, t, cond.detach()), DDIMScheduler(clip_sample=False), 2)
    reward = lambda x0, conditions: x0.flatten(1).mean(1)  # noqa: E731
    by_outcome = {}
    for seed in range(40):
        thresholds = torch.randint(0, 3, (2,), generator=torch.Generator().manual_seed(seed)).tolist()
        by_outcome.setdefault(any(i >= u for i, u in enumerate(thresholds)), seed)
    assert set(by_outcome) == {False, True}
    for any_graphed, seed in sorted(by_outcome.items()):
        model.zero_grad(set_to_none=True)
        mode = sdo.AlignProp(generator=torch.Generator().manual_seed(seed))
        logged = backward_reward(sampler, x.detach(), None, mode, reward)
        graphed = [p.grad is not None for p in model.parameters()]
        assert all(graphed) if any_graphed else not any(graphed), seed
        assert torch.isfinite(logged["reward"]).all()


def test_bad_configuration_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"`batch_size` \(6\) must be divisible by `grad_accum` \(4\)"):
        small_config(tmp_path, batch_size=6, grad_accum=4)
    with pytest.raises(ValueError, match=r"`draft_k` must be in \[1, 4\]"):
        small_config(tmp_path, method="draft-k", draft_k=9)


def test_report_to_names_accelerate_trackers_and_tensorboard_stays_an_alias(tmp_path, monkeypatch):
    from accelerate.utils import LoggerType

    from sdo.app.finetuning import TRACKERS

    assert set(TRACKERS) == {kind.value for kind in LoggerType} - {"all"}
    assert small_config(tmp_path, tensorboard=True).trackers() == ["tensorboard"]
    assert small_config(tmp_path, report_to="wandb, tensorboard", tensorboard=True).trackers() == [
        "wandb",
        "tensorboard",
    ]
    with pytest.raises(sdo.ConfigError, match=r"`report_to`: unknown tracker 'tensorbored'"):
        small_config(tmp_path, report_to="tensorbored")
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # no tracker package installed
    with pytest.raises(sdo.errors.MissingExtraError, match=r"--report-to wandb needs .*pip install wandb"):
        finetune(small_config(tmp_path, report_to="wandb"), progress=False)
    with pytest.raises(sdo.errors.MissingExtraError, match=r"pip install '\.\[tensorboard\]'"):
        finetune(small_config(tmp_path, tensorboard=True), progress=False)
    assert not (tmp_path / "run").exists()  # refused before the output folder was touched


def test_evaluation_samples_go_to_every_tracker(tmp_path):
    from sdo.app.finetuning import _evaluate

    class Tracker:
        def __init__(self, name):
            self.name, self.logged = name, []

        def log_images(self, values, step, **options):
            self.logged.append((values, step, options))

    class Accelerator:
        def __init__(self):
            self.trackers = [Tracker("tensorboard"), Tracker("wandb")]

    accelerator, images = Accelerator(), torch.rand(3, 1, 4, 4)
    measures = _evaluate(lambda network: ({"eval_reward": 0.5}, images), None, accelerator, tmp_path, 7)
    assert measures == {"eval_reward": 0.5} and (tmp_path / "samples" / "step-000007.png").is_file()
    (board_values, board_step, board_options), (wandb_values, wandb_step, _) = [
        tracker.logged[0] for tracker in accelerator.trackers
    ]
    assert board_step == wandb_step == 7 and board_options == {"dataformats": "NHWC"}
    assert board_values["samples"].shape == (3, 4, 4, 3) and len(wandb_values["samples"]) == 3
    expected = (images.expand(-1, 3, -1, -1).permute(0, 2, 3, 1) * 255).round().to(torch.uint8)
    assert (torch.from_numpy(board_values["samples"]) == expected).all()


def test_reward_curve_panels_say_where_each_measure_comes_from(tmp_path):
    from sdo.app.plots import save_finetune_curves
    from sdo.app.tasks.finetune import EVALUATION_MEASURES

    records = [
        {"step": 1, "reward": 0.1, "reward_clip": 0.2, "kl": 0.0, "seconds": 1.0},
        {"step": 2, "reward": 0.2, "reward_clip": 0.3, "kl": 0.1, "seconds": 1.0, "eval_reward": 0.4},
    ]
    held_out = [{**r, "eval_on_training_prompts": False} if "eval_reward" in r else r for r in records]
    titles = save_finetune_curves(held_out, tmp_path / "a.png", "t", EVALUATION_MEASURES)
    assert titles == ["held-out eval reward", "training batch: kl", "training batch: reward clip"]
    on_training = [{**r, "eval_on_training_prompts": True} if "eval_reward" in r else r for r in records]
    titles = save_finetune_curves(on_training, tmp_path / "b.png", "t", EVALUATION_MEASURES)
    assert titles[0] == "evaluation on the training prompts: eval reward"
    assert not any("held-out" in title for title in titles)


@pytest.mark.slow
def test_two_cpu_processes_match_one_process_with_the_same_global_batch(tmp_path):
    single = small_config(tmp_path, "single", steps=2, task="bold", grad_accum=2)
    finetune(single, progress=False)
    double = replace(single, out=str(tmp_path / "double"), grad_accum=1)
    args = [
        *two_cpu_processes_launch(),
        "-m",
        "sdo",
        "finetune",
        "--out",
        double.out,
        "--steps",
        "2",
        "--sample-steps",
        "4",
        "--batch-size",
        "4",
        "--eval-every",
        "0",
        "--eval-per-class",
        "1",
        "--checkpoint-every",
        "2",
        "--lr",
        "0.005",
        "--task",
        "bold",
    ]
    done = subprocess.run(
        args, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Weights identical on all 2 processes." in done.stdout
    assert done.stdout.count("Wrote ") == 1 and done.stdout.count('"step": 2') == 1  # only the main process reports
    for name, value in adapter(single).items():
        # Float32 sums in another order; Adam's per-element normalization can magnify that to ~1e-5 of a 5e-3 step.
        torch.testing.assert_close(adapter(double)[name], value, rtol=1e-3, atol=1e-4)
    assert sdo.__version__


# Issue 27, items 8 and 13: one --reward for pipeline rewards, a start line and a complete "Wrote" line.


def test_reward_defaults_per_model_and_task_is_its_older_name(tmp_path):
    assert (FinetuneConfig().task, FinetuneConfig().reward) == ("confidence", "")
    pipeline = dict(pipeline=str(tmp_path / "pipe"), prompts=str(tmp_path / "p.txt"))
    assert FinetuneConfig(**pipeline).reward_spec() == "clip"  # --pipeline alone has a reward that works
    by_task, by_reward = FinetuneConfig(**pipeline, task="aesthetic"), FinetuneConfig(**pipeline, reward="aesthetic")
    assert by_task == by_reward and by_task.reward_spec() == "aesthetic"  # one choice, recorded one way
    assert FinetuneConfig(**pipeline, task="clip", reward="clip").reward == "clip"
    with pytest.raises(sdo.ConfigError, match=r"`task` \('clip'\) and `reward` \('aesthetic'\) choose different"):
        FinetuneConfig(**pipeline, task="clip", reward="aesthetic")
    with pytest.raises(sdo.ConfigError, match=r"`task` must be one of .* with --pipeline, got 'bold'"):
        FinetuneConfig(**pipeline, task="bold")


def test_trackers_get_measures_not_the_step_or_flags():
    from sdo.app.finetuning import tracked_scalars

    record = {"step": 3, "reward": 0.5, "seconds": 1.0, "eval_reward": 0.25, "eval_on_training_prompts": True}
    assert tracked_scalars(record) == {"reward": 0.5, "seconds": 1.0, "eval_reward": 0.25}


def test_the_command_says_what_it_runs_and_everything_it_wrote(tmp_path, capsys, monkeypatch):
    import sdo.app.finetuning
    from sdo.app import cli

    out = tmp_path / "run"
    monkeypatch.setattr(sdo.app.finetuning, "finetune", lambda config, **options: {"step": 1})  # the lines only
    tiny = ["--steps", "1", "--sample-steps", "2", "--batch-size", "2", "--eval-per-class", "1", "--task", "bold"]
    assert cli.main(["finetune", *tiny, "--lora-rank", "2", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        f"sdo finetune: the embedded model, LoRA rank 2, sdo on the bold reward, 1 update of batch 2 (2 sampling "
        f"steps); writing to {out}"
    )
    assert lines[-1] == f"Wrote {out}/sdo/adapter.safetensors, metrics.jsonl, samples/, reward_curve.png, checkpoints/"
    config = FinetuneConfig(pipeline="P", prompts="p.txt", out="O", save_pipeline="S", report_to="tensorboard,wandb")
    written = ", ".join(cli._finetune_outputs(config))
    assert written.startswith("O/pytorch_lora_weights.safetensors, sdo/adapter.safetensors")
    assert "O/sdo-finetune/ (TensorBoard logs" in written and "the wandb run sdo-finetune" in written
    assert written.endswith("the fine-tuned pipeline (--save-pipeline) S")


def test_a_missing_prompt_file_is_the_only_line_before_any_start_line(tmp_path, capsys):
    from sdo.app import cli

    out = tmp_path / "run"
    missing = tmp_path / "none.txt"
    assert cli.main(["finetune", "--pipeline", "org/model", "--prompts", str(missing), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and not out.exists()
    assert (
        captured.err.strip()
        == f"sdo finetune: error: --prompts {missing}: no such file (a text file with one prompt per line)."
    )
