"""Issue 26, Deliver 2 and 10: a resume sees every input it depends on (files, folders, Hub revisions, a loaded
pipeline's weights, a Python reward function), and a Python fine-tuning run records what it trained."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from pathlib import Path

import matplotlib.image
import pytest
import torch

from sdo.app.cli import main
from sdo.app.finetuning import FinetuneConfig, finetune, ink_reward
from sdo.app.fingerprints import callable_fingerprint, fingerprint_path, input_changes, pipeline_fingerprint
from sdo.errors import ConfigError, ResumeMismatchError
from sdo.io import load_json, save_json, save_tensors
from tiny_pipelines import PROMPT, REVISION, prompt_items_config, write_png

transformers = pytest.importorskip("transformers")

ZOO = dict(steps=1, sample_steps=2, batch_size=2, eval_every=0, eval_per_class=1, checkpoint_every=1, lr=5e-3)
TINY_PIPELINE = ["--steps", "1", "--sample-steps", "2", "--batch-size", "2", "--eval-every", "0", "--lora-rank", "2"]


def make_reward(scale: float):
    """A zoo reward whose closure carries ``scale``."""

    def reward(x0, labels):
        return scale * ink_reward(x0, labels)

    return reward


def scaled_ink(x0, labels, scale=1.0):
    """A zoo reward with a scale argument (bound by ``functools.partial``)."""
    return scale * ink_reward(x0, labels)


def brightness(images, prompts):
    """An image reward: the mean of each image."""
    return images.mean(dim=(1, 2, 3))


class Scaled:
    """A callable reward object with a number in its attributes."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __call__(self, x0, labels):
        return self.scale * ink_reward(x0, labels)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# Files and folders: content hashes, reused only for an unchanged path, size and modification time.


def test_a_file_is_hashed_and_its_hash_reused_only_while_size_and_mtime_hold(tmp_path):
    path = tmp_path / "head.safetensors"
    save_tensors({"weight": torch.ones(1, 4)}, path)
    record = fingerprint_path(path)
    assert record["sha256"] == sha256(path) and record["bytes"] == path.stat().st_size
    assert record["mtime_ns"] == path.stat().st_mtime_ns and len(record["header_sha256"]) == 64
    stale = {**record, "sha256": "0" * 64}  # an earlier record with the same size and time: its hash is taken
    assert fingerprint_path(path, stale)["sha256"] == "0" * 64
    assert fingerprint_path(path, stale, verify=True)["sha256"] == sha256(path)  # --verify rehashes
    os.utime(path, ns=(record["mtime_ns"] + 10**9, record["mtime_ns"] + 10**9))
    assert fingerprint_path(path, stale)["sha256"] == sha256(path)  # a new mtime rehashes
    save_tensors({"weight": torch.zeros(1, 4)}, path)  # same size and header, other values
    os.utime(path, ns=(record["mtime_ns"], record["mtime_ns"]))  # and the old mtime: only --verify sees it
    assert fingerprint_path(path, record)["sha256"] == record["sha256"]
    changed = fingerprint_path(path, record, verify=True)
    [line] = input_changes({"aesthetic_head": record}, {"aesthetic_head": changed})
    assert line.startswith(f"--aesthetic-head {path.resolve()} changed since the folder's run (sha256 ")
    assert f"{record['sha256'][:12]} -> {changed['sha256'][:12]}" in line


def test_a_folder_names_the_file_that_changed_and_a_fresh_copy_matches(tmp_path):
    folder = tmp_path / "clip"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "sub" / "model.safetensors").write_bytes(b"weights")
    (folder / "pytorch_model.bin").write_bytes(b"never read")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x").write_text("hidden")
    record = fingerprint_path(folder)
    assert sorted(record["files"]) == ["config.json", "sub/model.safetensors"]
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy, copy_function=shutil.copyfile)  # new modification times, same content
    assert input_changes({"clip_path": record}, {"clip_path": fingerprint_path(copy)}) == []
    (copy / "sub" / "model.safetensors").write_bytes(b"other weights")
    [line] = input_changes({"clip_path": record}, {"clip_path": fingerprint_path(copy)})
    assert line.startswith(f"--clip-path {copy.resolve()} changed since the folder's run (sub/model.safetensors: ")


def test_a_hub_id_records_the_revision_of_its_cached_snapshot(offline_cache):
    record = fingerprint_path("org/tiny-sd")
    assert record == {"kind": "hub", "id": "org/tiny-sd", "revision": REVISION}
    ref = offline_cache / "models--org--tiny-sd" / "refs" / "main"
    ref.write_text("f" * 40)
    [line] = input_changes({"pipeline": record}, {"pipeline": fingerprint_path("org/tiny-sd")})
    assert line == f"--pipeline org/tiny-sd changed since the folder's run (revision {REVISION[:12]} -> ffffffffffff)"


# Python objects: a reward function by name, source and values; a loaded pipeline by its weights.


def test_a_reward_function_is_told_apart_by_its_closure_values_and_attributes():
    three, eight = callable_fingerprint(make_reward(3)), callable_fingerprint(make_reward(8))
    assert three["function"] == "test_fingerprints.make_reward.<locals>.reward"
    assert three["source_sha256"] is not None and three["source_sha256"] == eight["source_sha256"]
    assert three["values_sha256"] != eight["values_sha256"]
    assert callable_fingerprint(make_reward(3)) == three
    assert callable_fingerprint(Scaled(2))["function"] == "test_fingerprints.Scaled"
    assert callable_fingerprint(Scaled(2)) != callable_fingerprint(Scaled(2.5))
    three_partial = callable_fingerprint(functools.partial(scaled_ink, scale=3))
    assert three_partial["function"] == "test_fingerprints.scaled_ink"
    assert three_partial != callable_fingerprint(functools.partial(scaled_ink, scale=8))
    weights = [callable_fingerprint(make_reward(torch.tensor(v))) for v in (1.0, 1.0, 2.0)]
    assert weights[0] == weights[1] != weights[2]


def test_a_loaded_pipeline_is_fingerprinted_by_its_weights_not_its_name(pipeline_dir):
    from diffusers import DiffusionPipeline

    from sdo.app.lora import add_lora

    pipe = DiffusionPipeline.from_pretrained(str(pipeline_dir), local_files_only=True)
    base = pipeline_fingerprint(pipe)
    assert base["kind"] == "weights" and base["name"] == str(pipeline_dir)
    add_lora(pipe.unet, 2, "to_q,to_v")  # sdo's adapter from an earlier run: the base weights are what count
    assert pipeline_fingerprint(pipe) == base
    other = DiffusionPipeline.from_pretrained(str(pipeline_dir), local_files_only=True)
    with torch.no_grad():
        next(other.unet.parameters()).mul_(1.5)
    [line] = input_changes({"pipeline": base}, {"pipeline": pipeline_fingerprint(other)})
    assert line.startswith(f"`pipeline=` (a loaded pipeline, {pipeline_dir}) changed since the folder's run (sha256")


# sdo finetune: the CLI and the Python API.


def test_finetune_cli_refuses_changed_pipeline_weights_and_resumes_a_copy(pipeline_dir, clip_dir, tmp_path, capsys):
    pipe = tmp_path / "pipe"
    shutil.copytree(pipeline_dir, pipe)
    (tmp_path / "prompts.txt").write_text(f"{PROMPT}\n")
    out = str(tmp_path / "ft")
    flags = ["finetune", "--pipeline", str(pipe), "--prompts", str(tmp_path / "prompts.txt"), "--task", "clip"]
    flags += ["--clip-path", str(clip_dir / "clip"), "--out", out, *TINY_PIPELINE]
    assert main(flags) == 0
    recorded = load_json(Path(out) / "config.json")["config"]
    assert set(recorded["inputs"]) == {"pipeline", "clip_path"} and recorded["verify"] is False
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert recorded["inputs"]["pipeline"]["files"][weights]["sha256"] == sha256(pipe / weights)
    assert (
        load_json(Path(out) / "checkpoints" / "step-000001" / "state.json")["config"]["inputs"] == recorded["inputs"]
    )
    capsys.readouterr()

    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(pipe / "unet")
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.mul_(1.01)
    unet.save_pretrained(pipe / "unet")
    assert main([*flags, "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"--pipeline {pipe.resolve()} changed since the folder's run ({weights}: sha256" in err

    shutil.rmtree(pipe)
    shutil.copytree(pipeline_dir, pipe, copy_function=shutil.copyfile)  # the original weights, new mtimes
    assert main([*flags, "--steps", "2", "--verify"]) == 0
    assert [json.loads(line)["step"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_finetune_style_image_with_new_pixels_is_refused_and_an_old_folder_warns(
    pipeline_dir,
    clip_dir,
    tmp_path,
    capsys,
):
    style = write_png(tmp_path / "s.png")
    (tmp_path / "prompts.txt").write_text(f"{PROMPT}\n")
    out = tmp_path / "ft"
    flags = ["finetune", "--pipeline", str(pipeline_dir), "--prompts", str(tmp_path / "prompts.txt")]
    flags += ["--task", "style", "--style-image", str(style), "--clip-path", str(clip_dir / "clip")]
    flags += ["--out", str(out), *TINY_PIPELINE]
    assert main(flags) == 0
    old = sha256(style)
    matplotlib.image.imsave(style, torch.zeros(24, 24, 3).numpy())  # new pixels
    capsys.readouterr()
    assert main([*flags, "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert f"--style-image {style.resolve()} changed since the folder's run (sha256 {old[:12]} -> " in err

    for path in (out / "config.json", out / "checkpoints" / "step-000001" / "state.json"):  # before fingerprints
        record = load_json(path)
        config = record["config"]
        del config["inputs"]
        save_json(record, path)
    assert main([*flags, "--steps", "2"]) == 0
    err = capsys.readouterr().err
    assert "was recorded before sdo fingerprinted its inputs" in err
    assert len([line for line in err.splitlines() if "fingerprinted" in line]) == 1


def test_python_reward_is_recorded_titled_and_a_different_one_refused(tmp_path, monkeypatch):
    import sdo.app.plots

    titles = []
    monkeypatch.setattr(sdo.app.plots, "save_finetune_curves", lambda records, path, title, *a: titles.append(title))
    config = FinetuneConfig(**ZOO, out=str(tmp_path / "ft"))
    finetune(config, reward=make_reward(3), progress=False)
    recorded = load_json(tmp_path / "ft" / "config.json")["config"]
    assert recorded["reward_function"] == "test_fingerprints.make_reward.<locals>.reward"
    assert recorded["reward_source_sha256"] == callable_fingerprint(make_reward(3))["source_sha256"]
    assert recorded["task"] is None and recorded["reward"] is None and recorded["inputs"] == {}
    assert titles == ["sdo on test_fingerprints.make_reward.<locals>.reward"]

    longer = FinetuneConfig(**{**ZOO, "steps": 2}, out=str(tmp_path / "ft"))
    with pytest.raises(ResumeMismatchError, match=r"closure values.*\(sha256\)") as caught:
        finetune(longer, reward=make_reward(8), progress=False)
    assert "\n" not in str(caught.value)
    with pytest.raises(ResumeMismatchError, match=r'a different reward function \("test_fingerprints.Scaled"'):
        finetune(longer, reward=Scaled(3), progress=False)
    with pytest.raises(ResumeMismatchError, match=r'--task null -> "confidence"'):
        finetune(longer, progress=False)  # the task reward is not the function the folder trained
    finetune(longer, reward=make_reward(3), progress=False)
    lines = (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]  # resumed after step 1


def test_python_pipeline_with_other_weights_and_the_same_name_is_refused(pipeline_dir, tmp_path):
    from diffusers import DiffusionPipeline

    def load():
        return DiffusionPipeline.from_pretrained(str(pipeline_dir), local_files_only=True)

    small = dict(sample_steps=2, batch_size=1, eval_every=0, checkpoint_every=1, lora_rank=2)
    first = FinetuneConfig(**small, steps=1, out=str(tmp_path / "ft"))
    finetune(first, reward=brightness, pipeline=load(), prompts=[PROMPT], progress=False)
    other = load()
    with torch.no_grad():
        for parameter in other.vae.parameters():
            parameter.mul_(0.5)
    longer = FinetuneConfig(**small, steps=2, out=str(tmp_path / "ft"))
    with pytest.raises(ResumeMismatchError, match=r"`pipeline=` \(a loaded pipeline, .*\) changed since"):
        finetune(longer, reward=brightness, pipeline=other, prompts=[PROMPT], progress=False)


# sdo optimize, many items: an item is finished only while its inputs are unchanged.


def test_items_with_a_changed_style_image_are_refused_and_a_copy_resumes(pipeline_dir, clip_dir, tmp_path, capsys):
    from sdo.app.sharded import run_items

    style = write_png(tmp_path / "s.png")
    config = prompt_items_config(
        pipeline_dir, clip_dir, tmp_path, f"{PROMPT}\n", reward="style", style_image=str(style)
    )
    assert run_items(config, progress=False)["finished"] == 1
    spec = load_json(tmp_path / "items" / "items" / "0" / "metrics.json")["spec"]
    assert set(spec["inputs"]) == {"pipeline", "clip_path", "style_image"}
    assert spec["inputs"]["style_image"]["sha256"] == sha256(style)
    old = sha256(style)
    content = style.read_bytes()
    matplotlib.image.imsave(style, torch.zeros(24, 24, 3).numpy())
    with pytest.raises(ConfigError, match="holds results of other inputs") as caught:
        run_items(config, progress=False)
    message = str(caught.value)
    assert f"--style-image {style.resolve()} changed since the folder's run (sha256 {old[:12]} -> " in message
    assert "\n" not in message
    style.unlink()
    style.write_bytes(content)  # the same pixels, a new modification time
    assert run_items(config, progress=False)["skipped_as_finished"] == 1

    marker = tmp_path / "items" / "items" / "0" / "metrics.json"
    metrics = load_json(marker)
    del metrics["spec"]["inputs"]  # an item finished before inputs were fingerprinted
    save_json(metrics, marker)
    capsys.readouterr()
    assert run_items(config, progress=False)["skipped_as_finished"] == 1
    assert "1 finished items of" in capsys.readouterr().err
