"""The shipped model's quality, the training script's determinism, and the command line end to end."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from safetensors import safe_open

import sdo
from sdo import zoo
from sdo.app.cli import main
from sdo.app.tasks.latent import LatentTaskConfig, build_task
from sdo.io import load_tensors
from sdo.zoo import train as zoo_train
from sdo.zoo.train import ZooTrainingConfig, train_zoo

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_shipped_model_draws_the_requested_digits():
    unet, judge = zoo.load_unet(), zoo.load_judge()
    classes = torch.arange(10).repeat(3)
    samples = zoo.sample_digits(unet, classes, steps=10, seed=1)  # 29 of 30 right at 10 steps, as at 20
    accuracy = (judge(samples).argmax(1) == classes).float().mean()
    assert accuracy >= 0.85  # the README's figure (50 steps, 100 samples) is measured by `sdo train-zoo`


def test_shipped_quality_figures_are_recorded():
    metrics = zoo.zoo_info()["metrics"]
    assert metrics["judge_accuracy_on_samples"] >= 0.9
    assert metrics["judge_held_out_accuracy"] >= 0.9 and metrics["reward_classifier_held_out_accuracy"] >= 0.9


def test_training_is_deterministic_given_its_seed(tmp_path, monkeypatch):
    (train_pixels, train_labels), (held_pixels, held_labels) = zoo_train.mnist_splits()
    subset = ((train_pixels[:1024], train_labels[:1024]), (held_pixels[:256], held_labels[:256]))
    monkeypatch.setattr(zoo_train, "mnist_splits", lambda: subset)  # every stage still runs, on fewer digits
    monkeypatch.setattr(zoo, "sample_digits", functools.partial(zoo.sample_digits, steps=5))  # and fewer steps
    config = ZooTrainingConfig(seed=3, unet_steps=2, batch_size=8, classifier_epochs=1, eval_per_class=1)
    first, second = train_zoo(tmp_path / "a", config), train_zoo(tmp_path / "b", config)
    first.pop("training_seconds"), second.pop("training_seconds")
    assert first == second
    for name in ("unet", "reward_classifier", "judge_classifier", "digits"):
        a, b = (
            load_tensors(tmp_path / "a" / f"{name}.safetensors"),
            load_tensors(tmp_path / "b" / f"{name}.safetensors"),
        )
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_demo_end_to_end_in_a_reduced_setting(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--steps", "3", "--iters", "2", "--batch", "2", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"sdo", "full"}
    for summary in metrics["methods"].values():
        assert {"reward_final", "s_per_iter", "peak_mem_bytes", "judge_success"} <= set(summary)
        assert summary["s_per_iter"] > 0 and summary["peak_mem_bytes"] > 0
    assert metrics["methods"]["sdo"]["peak_mem_bytes"] < metrics["methods"]["full"]["peak_mem_bytes"]
    for picture in ("grid.png", "curves.png"):
        assert (out / picture).read_bytes().startswith(PNG_SIGNATURE)
    printed = capsys.readouterr().out
    assert "| sdo |" in printed and "| full |" in printed


@pytest.mark.parametrize("task", ["style", "adversarial"])
def test_optimize_cli_writes_a_replayable_latent(tmp_path, task):
    out = tmp_path / task
    args = [
        "optimize",
        "--task",
        task,
        "--steps",
        "4",
        "--iters",
        "2",
        "--batch",
        "2",
        "--start-step",
        "1",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    latent = load_tensors(out / "latent.safetensors")["latent"]
    assert latent.shape == (2, 1, 32, 32)
    with safe_open(out / "latent.safetensors", "pt") as saved:
        metadata = saved.metadata()
    recorded = (metadata["num_inference_steps"], metadata["start_step"], metadata["class"], metadata["guidance_scale"])
    assert recorded == ("4", "1", "3", "3.0") and metadata["method"] == "sdo"
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert len(history) == 3 and all("judge_success" in record for record in history)
    # Replay: the saved latent, sampled from its recorded start step with the recorded settings, gives the sample
    # whose reward and judge verdict the run recorded last.
    built = build_task(LatentTaskConfig(task=task, steps=4, iters=2, batch=2, start_step=int(metadata["start_step"])))
    with torch.no_grad():
        replay = built.sampler.sample(latent, grad=sdo.NoGrad(), start_step=1)
        rewards = built.reward(replay, None)
    assert rewards.tolist() == pytest.approx(history[-1]["rewards"], abs=1e-4)
    assert float(built.judge_accepts(replay).float().mean()) == history[-1]["judge_success"]


def test_cli_bad_input_is_one_clear_line(capsys):
    assert main(["optimize", "--start-step", "60", "--steps", "50"]) == 2
    assert "--start-step must be in [0, 49], got 60" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["optimize", "--method", "magic"])


# --- the CLI's flow: one run-and-write for single runs and items, one grid writer, the config record ------------


def test_the_one_grid_writer_keeps_every_pixel(tmp_path):
    import numpy as np
    from PIL import Image

    from sdo.app.images import LABELLED_MAX_SIZE, LABELLED_MIN_SIZE, save_grid, to_uint8

    images = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    pixels = to_uint8(images)

    def read(name):
        return torch.from_numpy(np.array(Image.open(tmp_path / name).convert("RGB")))

    save_grid(images, tmp_path / "batch.png", columns=3)  # a batch: 3 per row, the empty cell black
    grid = read("batch.png")
    assert grid.shape == (16, 24, 3) and torch.equal(grid[8:, 8:16], pixels[4]) and not grid[8:, 16:].any()
    save_grid([images[:2], images[2:4]], tmp_path / "rows.png")  # rows, no labels: full resolution
    assert torch.equal(read("rows.png")[8:, :8], pixels[2])
    save_grid({"before": images[:2], "after": images[2:4]}, tmp_path / "labelled.png", captions={"after": ["a", "b"]})
    grid, scale = read("labelled.png"), -(-LABELLED_MIN_SIZE // 8)
    cell = pixels[3].repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    assert grid.shape[0] > 2 * 8 * scale  # the captions' strip above the after row
    assert torch.equal(grid[-8 * scale :, -8 * scale :], cell)  # the last image, enlarged, not resampled
    assert (grid[: 8 * scale, :4] == 255).all()  # the label margin is white
    save_grid({"large": torch.rand(2, 3, 300, 200)}, tmp_path / "preview.png")  # a preview: the long side shrunk
    assert read("preview.png").shape[0] == LABELLED_MAX_SIZE
    with pytest.raises(ValueError, match="one size"):
        save_grid([images, torch.rand(1, 3, 4, 4)], tmp_path / "mixed.png")


def test_a_single_run_and_an_item_are_one_optimization_and_the_config_is_recorded_before_any_result(
    tmp_path, monkeypatch
):
    from sdo.app import runs
    from sdo.app.sharded import item_seed

    recorded = []
    write_config = runs.write_config

    def record(out, command, config):  # the config is recorded once, after the checks, before any result file
        recorded.append(sorted(path.name for path in tmp_path.joinpath("one").iterdir()))
        return write_config(out, command, config)

    monkeypatch.setattr(runs, "write_config", record)
    tiny = ["--steps", "2", "--iters", "1", "--batch", "1", "--views", "0"]
    seed = item_seed(0, 0)  # item 0 of --conditions steers 0s to 1s with this seed
    one = ["optimize", "--source", "0", "--target", "1", "--seed", str(seed), "--out", str(tmp_path / "one")]
    assert main([*one, *tiny]) == 0
    assert len(recorded) == 1 and not {"metrics.json", "grid.png", "latent.safetensors"} & set(recorded[0])
    assert main(["optimize", "--conditions", "1", "--out", str(tmp_path / "many"), *tiny]) == 0
    item = tmp_path / "many" / "items" / "0"
    assert torch.equal(
        load_tensors(item / "latent.safetensors")["latent"],
        load_tensors(tmp_path / "one" / "latent.safetensors")["latent"],
    )
    single, many = (json.loads((folder / "metrics.json").read_text()) for folder in (tmp_path / "one", item))
    assert [r["reward"] for r in many["history"]] == [r["reward"] for r in single["history"]]


def test_the_demo_has_no_flag_of_the_pipeline_options_but_guidance():
    import dataclasses

    from sdo.app.cli import build_parser
    from sdo.app.pipeline_options import PipelineOptions

    parser = build_parser()
    assert parser.parse_args(["demo", "--guidance", "2"]).guidance == 2.0  # the embedded model's too
    for field in dataclasses.fields(PipelineOptions):
        if field.name != "guidance":
            with pytest.raises(SystemExit):  # unrecognized argument
                parser.parse_args(["demo", f"--{field.name.replace('_', '-')}", "1"])


def test_no_module_of_the_application_layer_imports_itself_back():
    """The import graph of ``sdo.app`` (every import, at the top or inside a function) has no cycle."""
    import ast
    from pathlib import Path

    root = Path(sdo.__file__).parent.parent
    modules = {
        ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): path
        for path in (root / "sdo" / "app").rglob("*.py")
    }
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
        graph[name] = (imported & set(modules)) - {name}

    def reaches(start, goal, seen):
        return any(
            nxt == goal or (nxt not in seen and not seen.add(nxt) and reaches(nxt, goal, seen)) for nxt in graph[start]
        )

    assert [name for name in graph if reaches(name, name, set())] == []


# Issue 27, item 12: the help and what the demo records.


def test_help_states_each_default_once_and_every_switchs(capsys):
    texts = {}
    for command in ("demo", "optimize", "finetune", "bench", "train-zoo"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        texts[command] = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    from sdo.app.cli import build_parser

    for command, parser in build_parser()._subparsers._group_actions[0].choices.items():
        for action in parser._actions:
            assert (action.help or "").count("(default") <= 1 and "(default: )" not in texts[command], action.dest
    assert (
        "--kept-steps KEPT_STEPS sdo-multi: comma-separated kept step indices (default: 4 spread" in texts["optimize"]
    )
    assert "(the hard shell prior) (default: on)" in texts["optimize"] and "(default: off)" in texts["finetune"]
    assert "--image" not in texts["demo"] and "reference image (PNG, JPEG, WebP, TIFF)" in texts["optimize"]
    assert "(default: clip, or the --task given)" in texts["finetune"]


def test_demo_records_its_true_settings_and_the_bar_ends_on_the_last_reward(tmp_path, monkeypatch):
    import sdo.latent
    from sdo.app.demo import demo_config, run_demo

    shown = []

    class Bar:  # records what the progress bar shows
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n=1):
            pass

        def set_postfix(self, refresh=True, **values):
            shown.append(values["reward"])

    monkeypatch.setattr(sdo.latent, "tqdm", Bar)
    config = demo_config(steps=2, iters=2, batch=1, out=str(tmp_path / "demo"))
    metrics = run_demo(config, methods=("sdo",))
    recorded = json.loads((tmp_path / "demo" / "metrics.json").read_text())["config"]
    assert "reward" not in recorded and "pipeline" not in recorded and recorded["task"] == "class"
    assert shown[-1] == f"{metrics['methods']['sdo']['reward_final']:.3f}" and len(shown) == 3


def test_optimize_checkpoint_kept_is_the_same_run_with_less_memory_and_refused_where_it_means_nothing(
    tmp_path, capsys
):
    tiny = ["--steps", "2", "--iters", "1", "--batch", "1", "--views", "0"]
    assert main(["optimize", "--out", str(tmp_path / "plain"), *tiny]) == 0
    assert main(["optimize", "--checkpoint-kept", "--out", str(tmp_path / "kept"), *tiny]) == 0
    plain, kept = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("plain", "kept"))
    assert torch.equal(*(load_tensors(tmp_path / name / "latent.safetensors")["latent"] for name in ("plain", "kept")))
    assert [r["rewards"] for r in kept["history"]] == [r["rewards"] for r in plain["history"]]
    assert kept["history"][0]["peak_mem_bytes"] < plain["history"][0]["peak_mem_bytes"]  # the kept step recomputed
    assert json.loads((tmp_path / "kept" / "config.json").read_text())["config"]["checkpoint_kept"] is True
    assert kept["summary"]["best_so_far_final"] == kept["history"][-1]["best_so_far"]
    capsys.readouterr()
    assert main(["optimize", "--method", "full", "--checkpoint-kept", "--out", str(tmp_path / "full"), *tiny]) == 2
    assert "--checkpoint-kept recomputes the kept steps of sdo, " in capsys.readouterr().err
    assert main(["optimize", "--checkpoint-decoder", "--out", str(tmp_path / "decoder"), *tiny]) == 2
    assert "--checkpoint-decoder recomputes a pipeline's VAE decoder" in capsys.readouterr().err
    assert not (tmp_path / "full").exists() and not (tmp_path / "decoder").exists()
    from sdo.app.cli import build_parser

    with pytest.raises(SystemExit):  # the demo runs full beside sdo: no --checkpoint-kept there
        build_parser().parse_args(["demo", "--checkpoint-kept"])
