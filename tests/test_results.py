"""What `sdo optimize` leaves on disk (issue 18, Deliver 4-6; issue 19.8): latents that replay with their recorded
settings, images before/after at full resolution, no latent file for a result that is not one, one set of defaults,
and a replaced scheduler said out loud."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import sdo
from sdo import zoo
from sdo.app.cli import build_parser, main
from sdo.app.images import to_uint8
from sdo.app.runs import describe_run, write_marker
from sdo.app.tasks.latent import LatentTaskConfig, build_task
from sdo.io import load_json
from sdo.pipelines import DEFAULT_GUIDANCE
from tiny_pipelines import PROMPT, prompt_items_config

pytest.importorskip("transformers")


README = Path(__file__).resolve().parents[1] / "README.md"


def png(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def latent_settings(path) -> tuple[torch.Tensor, dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as file:
        return file.get_tensor("latent"), file.metadata()


def readme_replay_snippet() -> str:
    """The README's replay snippet: the python block that reads ``OUT/latent.safetensors``."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (snippet,) = [block for block in blocks if "OUT/latent.safetensors" in block and "safe_open" in block]
    return snippet


def optimize_pipeline(pipeline, clip, out, *extra) -> list[str]:
    args = ["optimize", "--pipeline", str(pipeline), "--prompt", PROMPT, "--clip-path", str(clip / "clip")]
    return [*args, "--steps", "3", "--iters", "2", "--out", str(out), *extra]


def test_readme_replay_snippet_reproduces_the_cli_after_images(pipeline_dir, clip_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(optimize_pipeline(pipeline_dir, clip_dir, out, "--batch", "2")) == 0
    printed = capsys.readouterr().out
    latent, settings = latent_settings(out / "latent.safetensors")
    assert latent.shape == (2, 4, 8, 8)
    assert settings["prompt"] == PROMPT and settings["scheduler"] == "DDIMScheduler"
    assert float(settings["guidance_scale"]) == DEFAULT_GUIDANCE["sd"] == 7.5  # the family's own default
    size = (int(settings["num_inference_steps"]), int(settings["height"]), int(settings["width"]))
    assert size == (3, 16, 16)  # 3 steps; 8x8 latents and the tiny VAE's factor 2
    assert settings["start_step"] == "0"

    namespace = {}
    exec(readme_replay_snippet().replace("OUT/", f"{out}/"), namespace)  # the snippet as written, on CLI output
    replayed = [np.asarray(image.convert("RGB")).astype(np.int16) for image in namespace["images"]]
    assert len(replayed) == 2
    for i, image in enumerate(replayed):
        after, before = png(out / "images" / f"after-{i}.png"), png(out / "images" / f"before-{i}.png")
        assert after.shape == (16, 16, 3)  # full resolution
        assert np.abs(image - after).max() <= 2
        assert np.abs(after - before).max() > 2  # the optimization changed the image: the check can fail

    metrics = load_json(out / "metrics.json")
    assert metrics["replay"].startswith("latent.safetensors replays in the plain pipeline")
    assert metrics["images"] == [f"images/{stem}-{i}.png" for stem in ("before", "after") for i in range(2)]
    assert not {"task", "source", "target"} & set(metrics["config"])  # no digit-model fields on a pipeline run
    assert "scheduler_replaced" not in metrics
    assert "judge" not in printed and "| sdo |" in printed  # no empty judge column


def test_readme_image_reward_snippet_runs_on_a_pipeline(pipeline_dir):
    """The README's own-reward snippet, as written but with fewer steps: ``fn`` sees images in [0, 1] and the
    prompts, and the optimization raises its reward."""
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if "redness" in b]
    code = (
        block.replace('"DIR"', repr(str(pipeline_dir)))
        .replace("sampler(50)", "sampler(3)")
        .replace("iters=20", "iters=3")
    )
    namespace = {}
    exec(code, namespace)
    images, result = namespace["images"], namespace["result"]
    assert images.shape[:2] == (2, 3) and images.min() >= 0 and images.max() <= 1
    assert result.history[-1]["reward"] > result.history[0]["reward"]


def test_guidance_given_is_recorded_and_used(pipeline_dir, clip_dir, tmp_path):
    out = tmp_path / "run"
    assert main(optimize_pipeline(pipeline_dir, clip_dir, out, "--batch", "1", "--guidance", "2.5")) == 0
    latent, settings = latent_settings(out / "latent.safetensors")
    assert float(settings["guidance_scale"]) == 2.5
    parts = sdo.from_pipeline(pipeline_dir, PROMPT, guidance_scale=2.5)
    image = parts.decode(parts.sampler(3).sample(latent, grad=sdo.NoGrad()))
    after = png(out / "images" / "after-0.png")
    assert np.abs(to_uint8(image)[0].numpy().astype(np.int16) - after).max() <= 1


def test_freedom_writes_images_and_no_latent_that_pretends(tmp_path):
    out = tmp_path / "freedom"
    write_marker(out, describe_run("optimize", {"task": "class"}))  # an earlier sdo run's folder
    (out / "latent.safetensors").write_bytes(b"an earlier run's latent")
    args = ["optimize", "--method", "freedom", "--steps", "3", "--batch", "2", "--out", str(out)]
    assert main(args) == 0
    assert not (out / "latent.safetensors").exists()
    metrics = load_json(out / "metrics.json")
    assert metrics["replay"].startswith("not a latent: FreeDoM")
    before, after = png(out / "images" / "before-0.png"), png(out / "images" / "after-0.png")
    assert after.shape == (32, 32, 3) and np.abs(after - before).max() > 0
    with torch.no_grad():  # before-<i>.png is the unguided sample of the initial noise, as the note says
        task = build_task(LatentTaskConfig(steps=3, batch=2))
        unguided = to_uint8(zoo.to_images(task.original)).numpy().astype(np.int16)
    assert np.array_equal(unguided[0], before)


def test_zoo_latent_replays_with_its_recorded_steps_guidance_and_class(tmp_path):
    out = tmp_path / "zoo"
    args = ["optimize", "--steps", "4", "--iters", "2", "--batch", "2", "--start-step", "1", "--out", str(out)]
    assert main(args) == 0
    latent, settings = latent_settings(out / "latent.safetensors")
    assert settings["class"] == "3" and float(settings["guidance_scale"]) == 3.0 and settings["model"] == "sdo.zoo"
    sampler = zoo.ddim_sampler(
        zoo.load_unet(),
        torch.full((latent.shape[0],), int(settings["class"])),
        int(settings["num_inference_steps"]),
        float(settings["guidance_scale"]),
    )
    with torch.no_grad():
        images = zoo.to_images(sampler.sample(latent, sdo.NoGrad(), start_step=int(settings["start_step"])))
    for i, image in enumerate(to_uint8(images).numpy().astype(np.int16)):
        assert np.abs(image - png(out / "images" / f"after-{i}.png")).max() <= 1
    metrics = load_json(out / "metrics.json")
    assert "start_step" in metrics["replay"] and {"task", "source", "target"} <= set(metrics["config"])
    assert "pipeline" not in metrics["config"] and "prompt" not in metrics["config"]


def test_items_write_images_and_latents_that_replay(pipeline_dir, clip_dir, tmp_path):
    from sdo.app.sharded import run_items

    config = prompt_items_config(pipeline_dir, clip_dir, tmp_path, f"{PROMPT}\nlower\n")
    summary = run_items(config, progress=False)
    assert "judge" not in summary["table"] and "source" not in summary["config"]
    folder = tmp_path / "items" / "items" / "1"
    latent, settings = latent_settings(folder / "latent.safetensors")
    assert settings["prompt"] == settings["item_prompt"] == "lower" and settings["item_index"] == "1"
    parts = sdo.from_pipeline(
        settings["pipeline"], settings["prompt"], guidance_scale=float(settings["guidance_scale"])
    )
    image = parts.decode(parts.sampler(int(settings["num_inference_steps"])).sample(latent, grad=sdo.NoGrad()))
    after = png(folder / "images" / "after-0.png")
    assert after.shape == (16, 16, 3) and (folder / "images" / "before-0.png").is_file()
    assert np.abs(to_uint8(image)[0].numpy().astype(np.int16) - after).max() <= 1
    assert load_json(folder / "metrics.json")["replay"].startswith("latent.safetensors replays")


def test_optimize_help_says_what_it_runs():
    parser = build_parser()
    optimize = parser._subparsers._group_actions[0].choices["optimize"]
    text = " ".join(parser.format_help().split()) + " ".join(optimize.format_help().split())
    assert "latents of the embedded model" not in text
    steps = next(action for action in optimize._actions if action.dest == "steps")
    assert "DDIM" not in steps.help and "sampling steps" in steps.help
    guidance = next(action for action in optimize._actions if action.dest == "guidance")
    assert "7.5 SD" in guidance.help and "3.0 for the embedded model" in guidance.help


def test_a_replaced_scheduler_is_one_warning_line_and_in_metrics(pipeline_dir, clip_dir, tmp_path, caplog):
    from diffusers import DiffusionPipeline, EulerAncestralDiscreteScheduler

    pipe = DiffusionPipeline.from_pretrained(str(pipeline_dir), local_files_only=True)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path / "ancestral")
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="sdo.pipelines"):
        assert main(optimize_pipeline(tmp_path / "ancestral", clip_dir, out, "--batch", "1")) == 0
    lines = [record.getMessage() for record in caplog.records if record.name == "sdo.pipelines"]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "EulerAncestralDiscreteScheduler -> DDIMScheduler" in lines[0]
    metrics = load_json(out / "metrics.json")
    assert metrics["scheduler_replaced"] == "EulerAncestralDiscreteScheduler -> DDIMScheduler"
    assert latent_settings(out / "latent.safetensors")[1]["scheduler"] == "DDIMScheduler"
    assert json.loads(latent_settings(out / "latent.safetensors")[1]["scheduler_config"])["clip_sample"] is False


@pytest.mark.parametrize(("method", "chain"), [("sdo", "ddim"), ("doodl", "edict")])
def test_a_pipeline_before_is_sampled_on_the_chain_the_method_optimizes(pipeline_dir, clip_dir, method, chain):
    from sdo.doodl import edict_sampler

    config = LatentTaskConfig(
        pipeline=str(pipeline_dir), prompt=PROMPT, clip_path=str(clip_dir / "clip"), method=method, steps=3, batch=1
    )
    task = build_task(config)
    assert task.notes["original_chain"] == chain
    with torch.no_grad():
        ddim = task.sampler.sample(task.latent, sdo.NoGrad())
        edict = edict_sampler(task.sampler).sample(task.latent, sdo.NoGrad())
    assert torch.equal(task.original, edict if chain == "edict" else ddim) and not torch.allclose(ddim, edict)
