"""Issue 26, Deliver 1, 6 and 9 (the CLI half): sdo deletes only what it created (the ``.sdo-run.json`` marker,
``--out`` and ``--save-pipeline`` checked before any model loads), one run per output folder, and no empty
``--out`` or ``config.json`` left behind by a refused or failed run."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import sdo
from sdo import zoo
from sdo.app.cli import main
from sdo.app.finetuning import FinetuneConfig, _save_fused_pipeline, finetune
from sdo.app.lora import save_for_diffusers
from sdo.app.results import _remove_stale_images
from sdo.app.runs import (
    LOCK_NAME,
    MARKER_NAME,
    SAVED_PIPELINE,
    check_owned,
    check_run,
    describe_run,
    read_marker,
    remove_unused_folders,
    replace_saved_folder,
    write_config,
    write_marker,
)
from sdo.errors import ConfigError, WriteFailedError

OPTIMIZE = ["optimize", "--steps", "2", "--iters", "1", "--views", "0", "--threads", "1"]
TUNE_SMALL = ["--steps", "1", "--sample-steps", "2", "--batch-size", "1", "--eval-every", "0"]
SMALL = dict(steps=1, sample_steps=2, batch_size=1, eval_every=0, checkpoint_every=1, lora_rank=2, lr=5e-2)
COMMANDS = {
    "optimize": OPTIMIZE,
    "demo": ["demo", "--steps", "2", "--iters", "1", "--batch", "1"],
    "finetune": ["finetune", *TUNE_SMALL, "--eval-per-class", "1"],
    "bench": ["bench", "--steps", "2", "--iters", "1", "--batch", "1"],
    "bench --plan": ["bench", "--plan", "--steps", "2", "--iters", "1", "--batch", "1"],
    "train-zoo": ["train-zoo", "--unet-steps", "1"],
}


def no_models(monkeypatch):
    """Make loading any zoo model, or training the zoo, fail: proof that a check runs before the work."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the check")

    for name in ("load_unet", "load_reward_classifier", "load_judge"):
        monkeypatch.setattr(zoo, name, refuse)
    monkeypatch.setattr("sdo.zoo.train.train_zoo", refuse)


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"sdo {argv[0]}: error: "), err
    return err


def snapshot(folder) -> dict:
    """Every path under ``folder`` (hidden ones included) with its bytes (None for a folder)."""
    return {
        str(path.relative_to(folder)): None if path.is_dir() else path.read_bytes()
        for path in sorted(folder.rglob("*"))
    }


def user_folder(path, name: str = "thesis.txt"):
    path.mkdir(parents=True, exist_ok=True)
    (path / name).write_text("years of work")
    return path


def fake_pipeline(folder):
    """A folder that looks like a pipeline to the path checks (they run before any model loads)."""
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "unet" / "weights.safetensors").write_bytes(b"base weights")
    return folder


def tune_argv(tmp_path, pipeline, *extra) -> list[str]:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    return ["finetune", *TUNE_SMALL, "--task", "clip", "--pipeline", str(pipeline), "--prompts", str(prompts), *extra]


# Deliver 1: an --out that is not sdo's, or that overlaps an input, is refused before any model loads.


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_folder_sdo_did_not_write_is_refused_by_every_command(command, tmp_path, capsys, monkeypatch):
    no_models(monkeypatch)
    out = user_folder(tmp_path / "mine")
    before = snapshot(out)
    err = one_line_error(capsys, [*COMMANDS[command], "--out", str(out)])
    assert f"--out {out} is not empty and was not written by sdo" in err and "'thesis.txt'" in err
    assert snapshot(out) == before  # no marker, lock or probe written into it


@pytest.mark.parametrize("name", ["config.json", ".notes.abcdefgh.tmp"])  # not sdo's: no "command"; a user's draft
def test_a_refused_run_keeps_a_users_files_with_sdos_record_names(name, tmp_path, capsys, monkeypatch):
    no_models(monkeypatch)
    out = tmp_path / "mine"
    out.mkdir()
    (out / name).write_text('{"mine": true}')
    before = snapshot(out)
    assert "was not written by sdo" in one_line_error(capsys, [*COMMANDS["optimize"], "--out", str(out)])
    assert snapshot(out) == before


def test_the_library_refuses_a_folder_sdo_did_not_write(tmp_path):
    out = user_folder(tmp_path / "mine")
    with pytest.raises(ConfigError, match="is not empty and was not written by sdo"):
        finetune(FinetuneConfig(**SMALL, task="bold", out=str(out)), progress=False)
    assert snapshot(out) == {"thesis.txt": b"years of work"}


def test_an_empty_folder_is_taken_and_marked_and_an_old_sdo_folder_is_still_sdos(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / LOCK_NAME).write_text("")  # a killed run's lock file alone: still empty
    assert main([*OPTIMIZE, "--batch", "1", "--out", str(empty)]) == 0
    marker = json.loads((empty / MARKER_NAME).read_text())
    assert marker["sdo_run"] == 1 and marker["version"] == sdo.__version__
    assert {k: marker[k] for k in ("command", "kind", "task")} == {
        "command": "optimize",
        "kind": "latent",
        "task": "class",
    }
    old = tmp_path / "old"  # written before the marker existed: its config.json says it is sdo's, and which run
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"command": "optimize", "config": {"task": "class"}}))
    (old / "grid.png").write_bytes(b"old grid")
    check_owned(old)
    check_run(old, describe_run("optimize", {"task": "class"}))
    with pytest.raises(ConfigError, match="holds a `sdo optimize` latent-optimization run of task 'class'"):
        check_run(old, describe_run("optimize", {"task": "class", "conditions": 2}))
    (old / "config.json").write_text(json.dumps({"config": {"task": "class"}}))  # no "command": not sdo's
    with pytest.raises(ConfigError, match=r"it holds 'config\.json' and 1 more"):
        check_owned(old)


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_out_may_not_overlap_the_pipeline_or_an_input_folder(where, tmp_path, capsys):
    pipe = fake_pipeline(tmp_path / "base")
    out = {"same": pipe, "inside": pipe / "runs" / "o", "around": tmp_path}[where]
    before = snapshot(pipe)
    err = one_line_error(capsys, [*tune_argv(tmp_path, pipe, "--lora-rank", "0"), "--out", str(out)])
    relation = {"same": "is", "inside": "lies inside", "around": "contains"}[where]
    assert f"--out {out} {relation} the --pipeline folder {pipe}" in err
    assert snapshot(pipe) == before and not (pipe / "runs").exists()  # the base model's unet/ is untouched
    clip = fake_pipeline(tmp_path / "clip")
    prompt = ["--pipeline", str(pipe), "--prompt", "a cat", "--clip-path", str(clip)]
    err = one_line_error(capsys, [*OPTIMIZE, *prompt, "--out", str(clip / "o")])
    assert f"lies inside the --clip-path folder {clip}" in err
    images = tmp_path / "photos"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.png")
    err = one_line_error(capsys, [*OPTIMIZE, *prompt[:4], "--images", str(images), "--out", str(images / "e")])
    assert f"--out {images / 'e'} lies inside the --images folder {images}" in err
    assert not (clip / "o").exists() and sorted(p.name for p in images.iterdir()) == ["a.png"]


def test_the_library_refuses_an_out_that_is_its_loaded_pipelines_folder(tmp_path):
    pipe = fake_pipeline(tmp_path / "base")
    loaded = type("Pipe", (), {"name_or_path": str(pipe)})()
    config = FinetuneConfig(**{**SMALL, "lora_rank": 0}, out=str(pipe))
    with pytest.raises(ConfigError, match=r"--out .* is the `pipeline` \(its name_or_path\) folder"):
        finetune(config, reward=lambda images, prompts: images.mean((1, 2, 3)), pipeline=loaded, prompts=["a"])
    assert (pipe / "unet" / "weights.safetensors").read_bytes() == b"base weights"


# Deliver 1: --save-pipeline writes only where sdo may, checked before training.


@pytest.mark.parametrize("probe", ["user", "out", "around-out", "inside-out", "cwd", "pipeline", "file", "clip"])
def test_save_pipeline_refusals_before_training(probe, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sdo.app.finetuning._train", lambda *a, **k: pytest.fail("trained before the check"))
    pipe, out, work = fake_pipeline(tmp_path / "base"), tmp_path / "p" / "out", tmp_path / "work"
    clip = fake_pipeline(tmp_path / "clip")
    work.mkdir()
    (tmp_path / "file").write_text("a file")
    monkeypatch.chdir(work)
    user_folder(tmp_path / "U")
    target = {
        "user": tmp_path / "U",
        "out": out,
        "around-out": tmp_path / "p",
        "inside-out": out / "fused",
        "cwd": work,
        "pipeline": pipe,
        "file": tmp_path / "file",
        "clip": clip / "sub",
    }[probe]
    before = {path: snapshot(path) for path in (tmp_path / "U", pipe, work, clip)}
    clip_flag = ["--clip-path", str(clip)] if probe == "clip" else []
    argv = [*tune_argv(tmp_path, pipe, *clip_flag), "--out", str(out), "--save-pipeline", str(target)]
    if probe == "cwd":
        argv[-1] = "."
    err = one_line_error(capsys, argv)
    expected = {
        "user": "is not empty and is not a pipeline sdo saved for --out",
        "out": "is the --out folder",
        "around-out": "contains the --out folder",
        "inside-out": "lies inside the --out folder",
        "cwd": f"is or contains the current directory ({work})",
        "pipeline": "is the --pipeline folder",
        "file": "is a file, not a folder",
        "clip": "lies inside the --clip-path folder",
    }[probe]
    assert err.startswith("sdo finetune: error: --save-pipeline ") and expected in err, err
    assert {path: snapshot(path) for path in before} == before  # thesis.txt, the base model and cwd intact
    assert not (tmp_path / "p").exists()  # the refused run left no --out behind
    assert (tmp_path / "file").read_text() == "a file"


def test_save_pipeline_needs_room_for_the_model(tmp_path, capsys, monkeypatch):
    import shutil

    pipe = fake_pipeline(tmp_path / "base")
    (pipe / "unet" / "more.safetensors").write_bytes(bytes(2**20))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=5))
    argv = [*tune_argv(tmp_path, pipe), "--out", str(tmp_path / "o"), "--save-pipeline", str(tmp_path / "fused")]
    err = one_line_error(capsys, argv)
    assert err.startswith("sdo finetune: error: --save-pipeline ")
    assert "the pipeline needs about 1.0 MiB and its disk has 0.0 MiB free" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "fused").exists()


class SavingPipe:
    """A pipeline whose ``save_pretrained`` writes one file, or fails as a full disk does."""

    def __init__(self, failure: Exception | None = None) -> None:
        self.failure = failure

    def save_pretrained(self, folder: str, safe_serialization: bool = True) -> None:
        if self.failure is not None:
            raise self.failure
        with open(f"{folder}/model_index.json", "w") as handle:
            handle.write("{}")


def test_a_save_replaces_only_its_own_earlier_save_and_fails_in_one_line(tmp_path):
    from safetensors import SafetensorError

    out, folder = tmp_path / "o", tmp_path / "fused"
    out.mkdir()
    _save_fused_pipeline(SavingPipe(), torch.nn.Linear(2, 2), folder, out)
    marker = read_marker(folder)
    assert marker["kind"] == SAVED_PIPELINE and marker["out"] == str(out.resolve())
    (folder / "stale.txt").write_text("from the first save")
    _save_fused_pipeline(SavingPipe(), torch.nn.Linear(2, 2), folder, out)  # its own earlier save: replaced
    assert sorted(p.name for p in folder.iterdir()) == [MARKER_NAME, "model_index.json"]
    with pytest.raises(WriteFailedError, match="now holds files sdo did not save for --out"):
        _save_fused_pipeline(SavingPipe(), torch.nn.Linear(2, 2), folder, tmp_path / "another")
    full = SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
    with pytest.raises(WriteFailedError, match=r"--save-pipeline .*fresh: could not write the pipeline"):
        _save_fused_pipeline(SavingPipe(full), torch.nn.Linear(2, 2), tmp_path / "fresh", out)
    (tmp_path / "late").write_text("a file made after the checks")
    with pytest.raises(WriteFailedError, match="could not write the pipeline"):
        _save_fused_pipeline(SavingPipe(), torch.nn.Linear(2, 2), tmp_path / "late", out)
    assert (tmp_path / "late").read_text() == "a file made after the checks"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused", "late", "o"]  # no temporary folder left
    user = user_folder(tmp_path / "U")
    building = tmp_path / "building"
    building.mkdir()
    with pytest.raises(WriteFailedError):
        replace_saved_folder(building, user, out)
    assert snapshot(user) == {"thesis.txt": b"years of work"}


def test_full_weights_replace_unet_only_in_an_sdo_folder(tmp_path):
    class Network(torch.nn.Module):
        def save_pretrained(self, folder, safe_serialization=True):
            folder.mkdir()
            (folder / "config.json").write_text("{}")

    pipe = type("Pipe", (), {"unet": Network(), "transformer": None})()
    mine = user_folder(tmp_path / "mine" / "unet", "weights.bin").parent
    with pytest.raises(ConfigError, match="is not an sdo run folder; sdo replaces only what it wrote"):
        save_for_diffusers(pipe, pipe.unet, mine, lora=False)
    assert snapshot(mine) == {"unet": None, "unet/weights.bin": b"years of work"}
    ours = user_folder(tmp_path / "ours" / "unet", "old.bin").parent
    write_marker(ours, describe_run("finetune", {}))
    save_for_diffusers(pipe, pipe.unet, ours, lora=False)
    assert sorted(p.name for p in ours.iterdir()) == [MARKER_NAME, "unet"]  # no temporary folder left
    assert sorted(p.name for p in (ours / "unet").iterdir()) == ["config.json"]


# Deliver 6: one run per output folder.


def test_describe_run_tells_the_kinds_apart():
    assert describe_run("optimize", {"pipeline": "D", "image": ["a.png"], "reward": "clip"})["kind"] == "edit"
    assert describe_run("optimize", {"pipeline": "D", "images": "photos", "reward": "clip"})["kind"] == "edit"
    assert describe_run("optimize", {"pipeline": "D", "prompts": "p.txt", "reward": "clip"})["kind"] == "items"
    assert describe_run("optimize", {"conditions": 3, "task": "style"}) == {
        "command": "optimize",
        "kind": "items",
        "task": "style",
    }
    assert describe_run("bench", {"plan": True})["kind"] == "plan"
    assert describe_run("finetune", {"task": "bold"}) == {"command": "finetune", "kind": "finetune", "task": None}


def test_a_rerun_with_fewer_images_removes_the_others_and_another_kind_is_refused(tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    assert main([*OPTIMIZE, "--batch", "2", "--out", str(out)]) == 0
    assert (out / "images" / "after-1.png").is_file()
    (out / "images" / "notes.txt").write_text("mine")
    assert main([*OPTIMIZE, "--batch", "1", "--out", str(out)]) == 0
    names = sorted(path.name for path in (out / "images").iterdir())
    assert names == ["after-0.png", "before-0.png", "notes.txt"]
    assert json.loads((out / "metrics.json").read_text())["images"] == ["images/before-0.png", "images/after-0.png"]
    no_models(monkeypatch)
    before, _ = snapshot(out), capsys.readouterr()
    err = one_line_error(capsys, [*OPTIMIZE, "--batch", "1", "--conditions", "1", "--out", str(out)])
    assert "holds a `sdo optimize` latent-optimization run of task 'class', not a run of many items" in err
    err = one_line_error(capsys, [*OPTIMIZE, "--batch", "1", "--task", "style", "--out", str(out)])
    assert "not a latent-optimization run of task 'style'; a folder holds one run" in err
    err = one_line_error(capsys, [*COMMANDS["bench --plan"], "--out", str(out)])
    assert "holds a `sdo optimize` run, not a `sdo bench` one" in err
    assert snapshot(out) == before


def test_an_items_run_is_refused_in_a_finished_edit_folder(tmp_path, capsys, monkeypatch):
    from sdo.app.sharded import run_items
    from sdo.app.tasks.latent import LatentTaskConfig

    no_models(monkeypatch)
    out = tmp_path / "edit"
    out.mkdir()  # an edit's record (the CLI wrote it): the items run would rewrite grid.png and config.json
    edit = {"pipeline": str(tmp_path / "sd"), "prompt": "a cat", "image": ["a.png"], "reward": "clip"}
    write_config(out, "optimize", edit)
    (out / "metrics.json").write_text("{}")
    before = snapshot(out)
    err = one_line_error(capsys, [*OPTIMIZE, "--batch", "1", "--conditions", "1", "--out", str(out)])
    assert "holds a `sdo optimize` image-edit run (--image/--images) of task 'clip', not a run of many items" in err
    with pytest.raises(ConfigError, match="image-edit run"):
        run_items(LatentTaskConfig(steps=2, iters=1, batch=1, conditions=1, out=str(out)), progress=False)
    assert snapshot(out) == before


def test_stale_images_are_only_sdos_own_names(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    names = ["before-0.png", "after-0.png", "input-0.png", "input-1.png", "after-12.png", "after-1.jpg", "x-1.png"]
    for name in names:
        (images / name).write_bytes(b"png")
    removed = _remove_stale_images(images, [images / "before-0.png", images / "after-0.png"])
    assert sorted(path.name for path in removed) == ["after-12.png", "input-0.png", "input-1.png"]
    assert sorted(path.name for path in images.iterdir()) == ["after-0.png", "after-1.jpg", "before-0.png", "x-1.png"]


# Deliver 9 (CLI): a refused or failed run leaves no empty --out and no config.json it wrote.


@pytest.mark.parametrize("failure", [RuntimeError("a bug"), sdo.MissingWeightsError("no weights")])
def test_a_failed_finetune_leaves_no_folder_and_no_record(failure, tmp_path, capsys, monkeypatch):
    def fail(config, data, progress, accelerator, out, checkpoint, settings, target=None):
        assert (out / "config.json").is_file() and (out / MARKER_NAME).is_file()  # written before the models
        raise failure

    monkeypatch.setattr("sdo.app.finetuning._train", fail)
    argv = [*COMMANDS["finetune"], "--task", "bold"]
    fresh, empty, recorded = tmp_path / "new" / "deeper", tmp_path / "empty", tmp_path / "recorded"
    empty.mkdir()
    write_config(recorded, "finetune", {"task": "bold"})  # a folder that recorded a run before keeps its record
    for out in (fresh, empty, recorded):
        if isinstance(failure, RuntimeError):
            with pytest.raises(RuntimeError, match="a bug"):
                main([*argv, "--out", str(out)])
        else:
            assert "no weights" in one_line_error(capsys, [*argv, "--out", str(out)])
    assert not (tmp_path / "new").exists()
    assert snapshot(empty) == {}  # a folder that was there stays, as empty as it was
    assert sorted(path.name for path in recorded.iterdir()) == [MARKER_NAME, "config.json"]


def test_a_failed_items_run_leaves_no_record(tmp_path, monkeypatch):
    def fail(config):
        raise RuntimeError("out of memory")

    monkeypatch.setattr("sdo.app.sharded.load_resources", fail)
    out = tmp_path / "o"
    with pytest.raises(RuntimeError, match="out of memory"):
        main([*OPTIMIZE, "--batch", "1", "--conditions", "1", "--out", str(out)])
    assert not out.exists()


def test_unused_folders_in_use_by_another_run_are_kept(tmp_path):
    busy, unused = tmp_path / "busy", tmp_path / "unused"
    write_config(busy, "optimize", {})
    (busy / LOCK_NAME).write_text("{}")  # another run made the folder meanwhile and holds it
    write_config(unused, "optimize", {})
    (unused / "items").mkdir()
    remove_unused_folders([busy, unused])
    assert (busy / "config.json").is_file() and not unused.exists()
