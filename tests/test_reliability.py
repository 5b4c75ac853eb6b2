"""Issue 13: results a user can trust. Resume checks its flags, best means best, adapters load whole, one writer
per folder, outputs validated before the work, and each bad input gets one clear line."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler

import sdo
from sdo import zoo
from sdo.app.checkpoints import latest_checkpoint, save_checkpoint
from sdo.app.cli import main
from sdo.app.finetuning import (
    FinetuneConfig,
    _step_generator,
    add_lora,
    finetune,
    ink_reward,
    load_adapter,
    trainable_state,
)
from sdo.app.runs import LOCK_NAME, RunLock
from sdo.app.tasks.latent import LatentTaskConfig
from sdo.errors import ConfigError, CorruptFileError, NonFiniteRewardError, OutputLockedError, ResumeMismatchError
from sdo.io import load_tensors, save_json, save_tensors
from sdo.latent import load_latent, optimize_latent, save_latent
from sdo.rewards import ClassifierReward

SMALL = dict(steps=2, sample_steps=3, batch_size=2, eval_every=0, eval_per_class=1, checkpoint_every=1, lr=5e-3)
SMALL_FLAGS = ["--sample-steps", "3", "--batch-size", "2", "--eval-every", "0", "--eval-per-class", "1"]
SMALL_FLAGS += ["--checkpoint-every", "1", "--lr", "0.005", "--task", "bold"]


def small(tmp_path, name="run", **changes) -> FinetuneConfig:
    return FinetuneConfig(**{**SMALL, "task": "bold", "out": str(tmp_path / name), **changes})


def steps_logged(config) -> list[int]:
    return [json.loads(line)["step"] for line in (Path(config.out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def unet():
    return zoo.load_unet()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-step fine-tuning run (copied by the tests that change it)."""
    config = small(tmp_path_factory.mktemp("finished"))
    finetune(config, progress=False)
    return config


def copy_run(config, tmp_path, name="copy"):
    import shutil

    shutil.copytree(config.out, tmp_path / name)
    return replace(config, out=str(tmp_path / name))


def no_models(monkeypatch):
    """Make loading any zoo model fail, to prove that a check runs before the work."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the check")

    for name in ("load_unet", "load_reward_classifier", "load_judge"):
        monkeypatch.setattr(zoo, name, refuse)


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"sdo {argv[0]}: error: "), err
    return err


# 1. A rerun checks its flags against the run the folder holds.


def test_run_folder_records_its_config(finished):
    recorded = json.loads((Path(finished.out) / "config.json").read_text())
    assert recorded["command"] == "finetune" and recorded["config"]["seed"] == 0
    assert recorded["config"]["steps"] == 2


def test_resume_with_changed_flags_stops_naming_them(finished, tmp_path, monkeypatch):
    config = copy_run(finished, tmp_path)
    before = (Path(config.out) / "metrics.jsonl").read_text()
    no_models(monkeypatch)
    with pytest.raises(ResumeMismatchError) as caught:
        finetune(replace(config, seed=7, lr=0.5, method="draft-1"), progress=False)
    message = str(caught.value)
    assert "--seed 0 -> 7" in message and "--lr 0.005 -> 0.5" in message and '--method "sdo" -> "draft-1"' in message
    assert "only --steps may grow" in message and "\n" not in message
    with pytest.raises(ResumeMismatchError, match=r"--lora-rank 4 -> 2"):
        finetune(replace(config, lora_rank=2), progress=False)
    with pytest.raises(ResumeMismatchError, match=r"--steps 1 is below the 2 updates already done"):
        finetune(replace(config, steps=1), progress=False)
    assert (Path(config.out) / "metrics.jsonl").read_text() == before


def test_resume_may_grow_steps_and_change_cadence_flags(finished, tmp_path):
    config = copy_run(finished, tmp_path)
    finetune(replace(config, steps=3, checkpoint_every=3, eval_every=5), progress=False)
    assert steps_logged(config) == [1, 2, 3]
    straight = small(tmp_path, "straight", steps=3)
    finetune(straight, progress=False)
    resumed, fresh = (
        load_tensors(tmp_path / "copy" / "sdo" / "adapter.safetensors"),
        load_tensors(tmp_path / "straight" / "sdo" / "adapter.safetensors"),
    )
    assert all(torch.equal(resumed[name], fresh[name]) for name in fresh)


def test_cli_resume_mismatch_is_one_line(finished, tmp_path, capsys):
    config = copy_run(finished, tmp_path)
    err = one_line_error(capsys, ["finetune", "--out", config.out, "--steps", "2", "--seed", "3", *SMALL_FLAGS])
    assert "--seed 0 -> 3" in err


def test_folder_of_another_command_is_refused(finished, tmp_path, capsys):
    config = copy_run(finished, tmp_path)
    err = one_line_error(capsys, ["optimize", "--out", config.out, "--steps", "2", "--iters", "1", "--batch", "1"])
    assert "holds a `sdo finetune` run" in err


# 2. best_latent is the latent of best_sample.


def test_best_latent_replays_to_best_sample_and_best_reward(unet):
    sampler = sdo.Sampler(zoo.denoiser(unet, torch.tensor([3, 5])), zoo.scheduler("ddim"), 3)
    reward = ClassifierReward(zoo.load_reward_classifier(), 8)
    z = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    result = optimize_latent(sampler, z, reward, iters=4, lr=0.3, progress=False)
    replay = sampler.sample(result.best_latent, grad=sdo.NoGrad(), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(replay, result.best_sample, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reward(result.best_sample), result.best_reward, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reward(replay), result.best_reward, rtol=1e-4, atol=1e-4)


# 3. A non-finite gradient stops before the Adam step; the result holds the last finite iterate.


def test_non_finite_gradient_keeps_the_last_finite_iterate(unet):
    sampler = sdo.Sampler(zoo.denoiser(unet, torch.tensor([1])), zoo.scheduler("ddim"), 3)
    calls, seen = [], []

    def reward(x0, cond):
        calls.append(1)
        if len(calls) == 3 and x0.requires_grad:
            x0.register_hook(lambda g: g * float("nan"))
        return x0.mean(dim=(1, 2, 3))

    z = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    original = sampler.sample

    def recording(x, *args, **kwargs):
        seen.append(x.detach().clone())
        return original(x, *args, **kwargs)

    sampler.sample = recording
    with pytest.raises(NonFiniteRewardError, match="gradient of the reward is not finite at iteration 2") as caught:
        optimize_latent(sampler, z, reward, iters=5, lr=0.1, progress=False)
    result = caught.value.result
    assert torch.isfinite(result.latent).all() and torch.isfinite(result.best_latent).all()
    assert torch.equal(result.latent, seen[2])  # the iterate whose gradient was NaN, not one moved by it
    assert torch.isfinite(result.sample).all() and len(result.history) == 2


# 4. Adapters load whole or not at all.


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("adapter") / "adapter.safetensors"
    lora_unet = add_lora(zoo.load_unet(), 2, "to_q,to_k,to_v,to_out.0")
    tensors = trainable_state(lora_unet, True)
    save_tensors(tensors, path, metadata={"lora_rank": "2", "lora_targets": "to_q,to_k,to_v,to_out.0"})
    return path, tensors


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda t, m: ({k: v for k, v in t.items() if "lora_B" not in k}, m), r"missing tensor '.*lora_B"),
        (lambda t, m: ({k: v for k, v in t.items() if "lora_A" not in k}, m), r"missing tensor '.*lora_A"),
        (lambda t, m: ({**t, "extra.weight": torch.zeros(1)}, m), r"unexpected tensor 'extra.weight'"),
        (lambda t, m: ({k: v[:1] for k, v in t.items()}, m), r"tensor '.*' has shape \(1, .*the model's is"),
        (lambda t, m: ({}, m), r"holds no tensors"),
        (lambda t, m: (t, {"lora_targets": m["lora_targets"]}), r"no 'lora_rank' metadata"),
        (lambda t, m: (t, {**m, "lora_rank": "two"}), r"metadata 'lora_rank' is 'two'"),
        (lambda t, m: (t, {**m, "lora_rank": "3"}), r"has shape"),
        (lambda t, m: (t, {**m, "lora_targets": "nowhere"}), r"metadata 'lora_targets'"),
    ],
)
def test_partial_or_mismatched_adapter_is_refused(adapter_file, tmp_path, change, match):
    _, tensors = adapter_file
    tensors, metadata = change(dict(tensors), {"lora_rank": "2", "lora_targets": "to_q,to_k,to_v,to_out.0"})
    path = tmp_path / "bad.safetensors"
    save_tensors(tensors, path, metadata=metadata)
    with pytest.raises(CorruptFileError, match=rf"bad\.safetensors: .*{match}"):
        load_adapter(zoo.load_unet(), path)


def test_whole_adapter_loads_identically_twice(adapter_file):
    path, tensors = adapter_file
    first = trainable_state(load_adapter(zoo.load_unet(), path), True)
    second = trainable_state(load_adapter(zoo.load_unet(), path), True)
    assert all(torch.equal(first[k], second[k]) and torch.equal(first[k], tensors[k]) for k in tensors)


def test_full_weight_file_with_a_missing_tensor_is_refused(tmp_path):
    weights = zoo.load_unet().state_dict()
    weights.pop(sorted(weights)[0])
    save_tensors(weights, tmp_path / "full.safetensors", metadata={"lora_rank": "0"})
    with pytest.raises(CorruptFileError, match=r"full\.safetensors: .*missing tensor"):
        load_adapter(zoo.load_unet(), tmp_path / "full.safetensors")


# 5. No silent broadcasting of the model output.


@pytest.mark.parametrize("output_shape", [(2, 3, 4, 4), (1, 1, 4, 4), (2, 1, 2, 2)])
def test_model_output_of_another_shape_is_refused(output_shape):
    sampler = sdo.Sampler(lambda x, t: torch.zeros(output_shape), DDIMScheduler(clip_sample=False), 3)
    with pytest.raises(ConfigError, match=r"`model_fn` returned \(.*\) for a latent of shape \(2, 1, 4, 4\)"):
        sampler.sample(torch.zeros(2, 1, 4, 4), grad=sdo.NoGrad())


# 6. --out is checked before any model loads, in every command.

COMMANDS = {
    "optimize": ["optimize", "--steps", "2", "--iters", "1", "--batch", "1"],
    "demo": ["demo", "--steps", "2", "--iters", "1", "--batch", "1"],
    "finetune": ["finetune", "--steps", "1", *SMALL_FLAGS],
    "bench": ["bench", "--steps", "2", "--iters", "1", "--batch", "1"],
    "train-zoo": ["train-zoo", "--unet-steps", "1"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_out_that_is_a_file_fails_before_any_work(command, tmp_path, capsys, monkeypatch):
    no_models(monkeypatch)
    monkeypatch.setattr("sdo.zoo.train.train_zoo", lambda *a, **k: pytest.fail("trained before the check"))
    (tmp_path / "f").write_text("")
    err = one_line_error(capsys, [*COMMANDS[command], "--out", str(tmp_path / "f")])
    assert "is a file, not a folder" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_fails_before_any_work(tmp_path, capsys, monkeypatch):
    no_models(monkeypatch)
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        err = one_line_error(capsys, [*COMMANDS["optimize"], "--out", str(folder)])
    finally:
        folder.chmod(0o755)
    assert "is not writable" in err


# 7. One writer per folder.


def test_second_writer_gets_one_line(tmp_path, capsys, monkeypatch):
    out = tmp_path / "busy"
    with RunLock(out, "finetune"):
        no_models(monkeypatch)
        err = one_line_error(capsys, [*COMMANDS["finetune"], "--out", str(out)])
        assert f"{out} is in use by `sdo finetune` process {os.getpid()}" in err
        with pytest.raises(OutputLockedError):
            finetune(small(tmp_path, "busy"), progress=False)
        err = one_line_error(capsys, [*COMMANDS["optimize"], "--out", str(out)])
        assert "is in use by" in err
    assert not (out / LOCK_NAME).exists()  # released


def test_lock_held_by_another_process(tmp_path, capsys):
    out = tmp_path / "other"
    script = "import sys, time; from sdo.app.runs import RunLock; RunLock(sys.argv[1], 'optimize').acquire(); "
    script += "print('locked', flush=True); time.sleep(60)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputLockedError, match=rf"in use by `sdo optimize` process {holder.pid}"):
            RunLock(out, "finetune").acquire()
    finally:
        holder.kill()
        holder.wait()
    with RunLock(out, "finetune"):  # killed: its lock file is left, reported and taken over
        pass
    assert f"cleared a stale lock on {out} left by `sdo optimize` process {holder.pid}" in capsys.readouterr().err


def test_lock_from_another_host_needs_break_lock(tmp_path):
    out = tmp_path / "shared"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "command": "finetune"}))
    with pytest.raises(OutputLockedError, match=r"process 1 on host elsewhere .*--break-lock"):
        RunLock(out, "finetune").acquire()
    with RunLock(out, "finetune", break_lock=True):
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()


# 8. Leftovers are cleaned on resume; outputs have explicit modes.


def test_resume_cleans_leftovers(finished, tmp_path):
    config = copy_run(finished, tmp_path)
    leftovers = [
        tmp_path / "copy" / "checkpoints" / ".step-000003.ab12cd34",
        tmp_path / "copy" / ".metrics.jsonl.ab_12cd3.tmp",
        tmp_path / "copy" / "checkpoints" / ".state.json.zz99yy88.tmp",
    ]
    leftovers[0].mkdir()
    (leftovers[0] / "weights.safetensors").write_bytes(b"partial")
    leftovers[1].write_text("partial")
    leftovers[2].write_text("partial")
    keep = tmp_path / "copy" / "notes.tmp"
    keep.write_text("mine")
    finetune(config, progress=False)
    assert not any(path.exists() for path in leftovers) and keep.exists()


def test_outputs_are_0644_and_folders_0755_whatever_the_umask(tmp_path):
    previous = os.umask(0o077)
    try:
        save_tensors({"x": torch.zeros(1)}, tmp_path / "new" / "a.safetensors")
        save_json({}, tmp_path / "new" / "b.json")
        optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)])
        save_checkpoint(tmp_path / "ck", 1, {"w": torch.zeros(1)}, optimizer, {})
    finally:
        os.umask(previous)

    def mode(path):
        return stat.S_IMODE(os.stat(path).st_mode)

    assert mode(tmp_path / "new") == 0o755 and mode(tmp_path / "ck") == 0o755
    assert mode(tmp_path / "new" / "a.safetensors") == 0o644 and mode(tmp_path / "new" / "b.json") == 0o644
    assert mode(tmp_path / "ck" / "step-000001") == 0o755
    assert mode(tmp_path / "ck" / "step-000001" / "weights.safetensors") == 0o644


# 9-11. Seeds, learning rates, norms, cadences and devices are checked up front.


@pytest.mark.parametrize("seed", ["-1", str(2**63), "100000000000000000000"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_seed_out_of_range_is_one_line_for_every_command(command, seed, tmp_path, capsys, monkeypatch):
    no_models(monkeypatch)
    err = one_line_error(capsys, [*COMMANDS[command], "--seed", seed, "--out", str(tmp_path / "o")])
    assert "--seed must be an integer in [0, 2**63 - 1]" in err
    assert not (tmp_path / "o").exists()


def test_largest_seed_works_at_every_step():
    assert _step_generator(2**63 - 1, 1).initial_seed() >= 0
    assert FinetuneConfig(seed=2**63 - 1).seed == 2**63 - 1


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (dict(lr=float("inf")), "`lr` must be a finite number > 0"),
        (dict(lr=float("nan")), "`lr` must be a finite number > 0"),
        (dict(max_grad_norm=-5.0), "`max_grad_norm` must be a finite number >= 0"),
        (dict(max_grad_norm=float("nan")), "`max_grad_norm` must be a finite number >= 0"),
        (dict(eval_every=-3), r"`eval_every` must be an integer in \[0, "),
        (dict(seed=-1), r"`seed` must be an integer in \[0, 2\*\*63 - 1\]"),
    ],
)
def test_bad_numbers_are_refused(changes, match):
    with pytest.raises(ConfigError, match=match):
        FinetuneConfig(**changes)


def test_bad_latent_task_lr_is_refused():
    with pytest.raises(ConfigError, match="`lr` must be a finite number > 0"):
        LatentTaskConfig(lr=float("nan"))
    with pytest.raises(ConfigError, match="`lr` must be a finite number > 0"):
        optimize_latent(None, torch.zeros(1, 1), lambda x, c: x.sum(1), lr=float("inf"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["optimize", "demo", "finetune", "bench"])
def test_cuda_without_cuda_is_one_line(command, tmp_path, capsys, monkeypatch):
    no_models(monkeypatch)
    err = one_line_error(capsys, [*COMMANDS[command], "--device", "cuda", "--out", str(tmp_path / "o")])
    assert "CUDA is not available on this machine" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_fp16_without_cuda_is_refused(tmp_path, monkeypatch):
    no_models(monkeypatch)
    with pytest.raises(ConfigError, match="`mixed_precision` fp16 needs a CUDA GPU"):
        finetune(small(tmp_path, mixed_precision="fp16"), progress=False)


def test_unknown_device_is_one_line(tmp_path, capsys, monkeypatch):
    no_models(monkeypatch)
    err = one_line_error(capsys, [*COMMANDS["optimize"], "--device", "gpu", "--out", str(tmp_path / "o")])
    assert "--device must be a torch device" in err


# 12. Missing and damaged inputs.


def test_missing_prompts_file(tmp_path, monkeypatch):
    no_models(monkeypatch)
    config = FinetuneConfig(pipeline=str(tmp_path / "sd"), prompts=str(tmp_path / "nope.txt"), task="aesthetic")
    with pytest.raises(ConfigError, match=r"--prompts .*nope\.txt: no such file"):
        finetune(replace(config, out=str(tmp_path / "o")), progress=False)


@pytest.mark.parametrize("state", [[1, 2], {"step": 2}, {"step": 2, "param_groups": "x"}, {"step": "2"}])
def test_damaged_state_json_falls_back_to_the_previous_checkpoint(finished, tmp_path, state):
    config = copy_run(finished, tmp_path)
    (tmp_path / "copy" / "checkpoints" / "step-000002" / "state.json").write_text(json.dumps(state))
    with pytest.warns(UserWarning, match=r"Skipping damaged checkpoint .*step-000002"):
        assert latest_checkpoint(tmp_path / "copy" / "checkpoints").step == 1
    if isinstance(state, list):  # one full rerun: it resumes from step 1
        with pytest.warns(UserWarning):
            finetune(config, progress=False)
        assert steps_logged(config) == [1, 2]


def test_garbage_metrics_line_names_file_and_line(finished, tmp_path):
    config = copy_run(finished, tmp_path)
    path = tmp_path / "copy" / "metrics.jsonl"
    path.write_text(path.read_text().splitlines()[0] + "\n{garbage\n")
    with pytest.raises(CorruptFileError, match=r"metrics\.jsonl, line 2: not valid JSON"):
        finetune(replace(config, steps=3), progress=False)


def test_latent_file_checked_at_load(tmp_path):
    save_latent(tmp_path / "z.safetensors", torch.zeros(2, 1, 16, 16))
    with pytest.raises(CorruptFileError, match=r"z\.safetensors: the latent has shape \(2, 1, 16, 16\), the model"):
        load_latent(tmp_path / "z.safetensors", shape=(-1, 1, 32, 32))
    assert load_latent(tmp_path / "z.safetensors", shape=(-1, 1, 16, 16)).shape == (2, 1, 16, 16)
    save_latent(tmp_path / "nan.safetensors", torch.full((1, 1, 4, 4), float("nan")))
    with pytest.raises(CorruptFileError, match="NaN or infinite"):
        load_latent(tmp_path / "nan.safetensors")


@pytest.fixture
def toy_sampler():
    return sdo.Sampler(lambda x, t: 0.1 * x, DDIMScheduler(clip_sample=False), 3)


@pytest.mark.parametrize(
    ("latent", "match"),
    [
        (torch.zeros(0, 1, 4, 4), "batch >= 1"),
        (torch.full((1, 1, 4, 4), float("nan")), "NaN or infinite"),
        (torch.full((1, 1, 4, 4), float("inf")), "NaN or infinite"),
    ],
)
def test_bad_latents_are_refused(toy_sampler, latent, match):
    with pytest.raises(ConfigError, match=match):
        toy_sampler.sample(latent, grad=sdo.NoGrad())


def test_nan_eta_is_refused():
    with pytest.raises(ConfigError, match="`eta` must be >= 0"):
        sdo.Sampler(lambda x, t: x, DDIMScheduler(), 3, eta=float("nan"))


def test_generator_must_be_a_torch_generator(toy_sampler):
    with pytest.raises(ConfigError, match=r"`generator` must be a torch\.Generator or None, got int"):
        toy_sampler.sample(torch.zeros(1, 1, 4, 4), grad=sdo.NoGrad(), generator=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_generator_on_another_device_is_refused(toy_sampler):
    with pytest.raises(ConfigError, match="`generator` is on cuda"):
        toy_sampler.sample(torch.zeros(1, 1, 4, 4), grad=sdo.NoGrad(), generator=torch.Generator(device="cuda"))


# 13. A reward without a gradient path to the sample says so.


@pytest.mark.parametrize("prior_weight", [0.0, 0.1])
def test_reward_without_gradient_path_says_so(unet, prior_weight):
    sampler = sdo.Sampler(zoo.denoiser(unet, torch.tensor([2])), zoo.scheduler("ddim"), 3)
    with pytest.raises(ConfigError, match="The reward has no gradient path to the sample") as caught:
        optimize_latent(
            sampler,
            torch.randn(1, 1, 32, 32),
            lambda x0, c: x0.detach().mean(dim=(1, 2, 3)),
            iters=1,
            prior_weight=prior_weight,
            progress=False,
        )
    assert "Shortcut" not in str(caught.value)


def test_finetuning_reward_without_gradient_path_says_so(tmp_path):
    with pytest.raises(ConfigError, match="The reward has no gradient path to the sample"):
        finetune(small(tmp_path), reward=lambda x0, labels: ink_reward(x0.detach(), labels), progress=False)


def test_kill_and_resume_still_logs_every_step_once(tmp_path):
    """The kill -9 guarantee, through the CLI in a subprocess killed while it runs."""
    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "sdo", "finetune", "--out", str(out), "--steps", "4", *SMALL_FLAGS]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoints" / "step-000001").exists():
        time.sleep(0.05)
    process.kill()
    process.wait()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert not (out / LOCK_NAME).exists()
