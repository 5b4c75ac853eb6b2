"""Stable-Diffusion-style pipelines from a local folder, and CLIP rewards, with tiny random models (no network)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sdo
from sdo.clip_rewards import AestheticReward, ClipImageEncoder, ClipScoreReward, ClipStyleReward
from sdo.latent import optimize_latent
from sdo.pipelines import from_pipeline
from tiny_pipelines import PROMPT, prompt_items_config, write_png

transformers = pytest.importorskip("transformers")


def test_from_pipeline_optimizes_the_latent_and_the_prompt_embedding(pipeline_dir, clip_dir):
    parts = from_pipeline(pipeline_dir, [PROMPT, PROMPT], guidance_scale=5.0, embeds_require_grad=True)
    assert parts.latent_shape == (2, 4, 8, 8)
    reward = ClipScoreReward(PROMPT, path=clip_dir / "clip")
    sampler = parts.sampler(4)
    latent = parts.initial_latent(seed=0).requires_grad_()
    score = reward(parts.decode(sampler.sample(latent, grad=sdo.Shortcut())))
    latent_grad, embed_grad = torch.autograd.grad(score.sum(), [latent, parts.prompt_embeds])
    assert latent_grad.abs().sum() > 0 and embed_grad.abs().sum() > 0

    result = optimize_latent(
        sampler, parts.initial_latent(0), lambda x0, c: reward(parts.decode(x0)), iters=3, lr=0.1, progress=False
    )
    assert result.history[-1]["reward"] > result.history[0]["reward"]


def test_latent_reward_hands_decoded_images_in_0_1_and_the_prompts_to_an_image_reward(pipeline_dir, tmp_path):
    from sdo.app.images import save_images

    parts = from_pipeline(pipeline_dir, [PROMPT, "newer"])
    seen = {}

    def brightness(images, prompts):
        seen.update(images=images.detach(), prompts=prompts)
        return images.mean(dim=(1, 2, 3))

    x0 = parts.sampler(2).sample(parts.initial_latent(0), grad=sdo.NoGrad()).requires_grad_()
    reward = parts.latent_reward(brightness)
    value = reward(x0)
    (latent_grad,) = torch.autograd.grad(value.sum(), x0)
    assert seen["prompts"] == [PROMPT, "newer"] and latent_grad.abs().sum() > 0
    assert seen["images"].min() >= 0 and seen["images"].max() <= 1 and seen["images"].std() > 0
    torch.testing.assert_close(value, parts.decode(x0).mean(dim=(1, 2, 3)))
    assert reward(x0.detach(), torch.tensor([1, 1])).shape == (2,) and seen["prompts"] == ["newer", "newer"]
    # The PNGs hold round(255 x) of the same images.
    paths = save_images(seen["images"], tmp_path / "images", "after")
    assert [p.name for p in paths] == ["after-0.png", "after-1.png"]
    from PIL import Image

    pixels = torch.as_tensor(np.array(Image.open(paths[1]))).permute(2, 0, 1).float() / 255
    assert pixels.shape == seen["images"][1].shape
    assert (pixels - seen["images"][1]).abs().max() <= 0.5 / 255 + 1e-6


def test_saved_latent_replays_in_a_plain_diffusers_loop(pipeline_dir):
    from diffusers import DiffusionPipeline

    parts = from_pipeline(pipeline_dir, PROMPT, guidance_scale=5.0)
    latent = parts.initial_latent(seed=3)
    ours = parts.sampler(5).sample(latent, grad=sdo.NoGrad())
    pipe = DiffusionPipeline.from_pretrained(str(pipeline_dir), local_files_only=True)
    pipe.scheduler = parts.scheduler  # the three lines the README documents
    image = pipe(PROMPT, latents=latent, num_inference_steps=5, guidance_scale=5.0, output_type="latent").images
    torch.testing.assert_close(image, ours, rtol=1e-4, atol=1e-5)


def test_clip_rewards_with_tiny_models(clip_dir):
    images = torch.rand(2, 3, 40, 40)
    encoder = ClipImageEncoder(clip_dir / "clip", cutouts=3, seed=0)
    assert encoder.image_embeds(images).shape == (2, 8)
    aesthetic = AestheticReward(clip_dir / "head.safetensors", path=clip_dir / "clip")
    x = images.clone().requires_grad_()
    (grad,) = torch.autograd.grad(aesthetic(x).sum(), x)
    assert grad.abs().sum() > 0
    style = ClipStyleReward(images[:1], path=clip_dir / "clip")
    assert style(images[:1]).item() == pytest.approx(0.0, abs=1e-10)
    assert style(images[1:]).item() < 0


def test_missing_weights_give_the_documented_error(tmp_path, monkeypatch):
    monkeypatch.delenv("SDO_CLIP_PATH", raising=False)
    with pytest.raises(FileNotFoundError, match=r"nowhere is not a CLIP model folder .*not a Hugging Face Hub id"):
        ClipImageEncoder(tmp_path / "nowhere")
    with pytest.raises(
        FileNotFoundError, match=r"No CLIP model folder given: pass its path \(`clip_path`\), or set \$SDO_CLIP_PATH"
    ):
        ClipImageEncoder()
    with pytest.raises(FileNotFoundError, match="LAION aesthetic head"):
        AestheticReward(tmp_path / "head.safetensors")
    with pytest.raises(FileNotFoundError, match="not a diffusers pipeline folder"):
        from_pipeline(tmp_path, PROMPT)


def test_load_image_reads_a_png_in_0_1(tmp_path):
    image = sdo.io.load_image(write_png(tmp_path / "style.png"))
    assert image.shape == (1, 3, 24, 24) and image.min() >= 0 and image.max() <= 1 and image.std() > 0.1
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(sdo.io.CorruptFileError, match=r"broken\.png: not a valid PNG file"):
        sdo.io.load_image(tmp_path / "broken.png")


def test_half_precision_pipeline_keeps_latent_and_gradient_in_float32(pipeline_dir):
    parts = from_pipeline(pipeline_dir, PROMPT, dtype=torch.bfloat16, vae_slicing=True, checkpoint_decoder=True)
    assert parts.network.dtype == torch.bfloat16
    latent = parts.initial_latent(0).requires_grad_()
    image = parts.decode(parts.sampler(3).sample(latent, grad=sdo.Shortcut(checkpoint=True)))
    (gradient,) = torch.autograd.grad(image.mean(), latent)
    assert latent.dtype == gradient.dtype == image.dtype == torch.float32
    assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0


def test_parts_name_their_network_and_keep_unet_as_a_read_only_alias():
    from sdo.pipelines import PipelineParts

    network = torch.nn.Linear(1, 1)
    parts = PipelineParts(None, None, (1, 4, 8, 8), None, network, None, None, None)
    assert parts.network is network and parts.unet is network
    with pytest.raises(AttributeError):
        parts.unet = torch.nn.Linear(1, 1)
    assert parts.network is network


@pytest.mark.parametrize("task", ["aesthetic", "clip", "style"])
def test_two_finetuning_steps_on_a_pipeline_reach_the_lora_weights(pipeline_dir, clip_dir, tmp_path, task):
    from sdo.app.finetuning import FinetuneConfig, finetune

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("lower\nnewer\n")
    config = FinetuneConfig(
        pipeline=str(pipeline_dir),
        prompts=str(prompts),
        task=task,
        style_image=str(write_png(tmp_path / "style.png")),
        clip_path=str(clip_dir / "clip"),
        aesthetic_head=str(clip_dir / "head.safetensors"),
        steps=2,
        sample_steps=3,
        batch_size=2,
        eval_every=1,
        checkpoint_every=1,
        lora_rank=2,
        lr=1e-2,
        out=str(tmp_path / "ft"),
    )
    record = finetune(config, progress=False)
    assert record["step"] == 2 and "eval_reward" in record and record["eval_on_training_prompts"] is True
    weights = sdo.io.load_tensors(tmp_path / "ft" / "sdo" / "adapter.safetensors")
    lora_b = [value for name, value in weights.items() if "lora_B" in name]
    assert lora_b and any(value.abs().sum() > 0 for value in lora_b)  # B starts at zero: only gradients move it


def test_optimize_cli_on_a_pipeline(pipeline_dir, clip_dir, tmp_path):
    from sdo.app.cli import main

    out = tmp_path / "opt"
    args = [
        "optimize",
        "--pipeline",
        str(pipeline_dir),
        "--prompt",
        PROMPT,
        "--reward",
        "clip",
        "--clip-path",
        str(clip_dir / "clip"),
        "--steps",
        "3",
        "--iters",
        "2",
        "--batch",
        "1",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    assert sdo.io.load_tensors(out / "latent.safetensors")["latent"].shape == (1, 4, 8, 8)
    assert (out / "grid.png").read_bytes()[:4] == b"\x89PNG"


def test_sd3_style_transformer_pipeline_with_flow_matching(sd3_dir):
    from diffusers import DiffusionPipeline

    parts = from_pipeline(sd3_dir, [PROMPT, PROMPT], guidance_scale=4.0, embeds_require_grad=True)
    assert type(parts.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and parts.latent_shape == (2, 4, 8, 8)
    latent = parts.initial_latent(1).requires_grad_()
    image = parts.decode(parts.sampler(3).sample(latent, grad=sdo.Shortcut()))
    latent_grad, embed_grad = torch.autograd.grad(image.square().mean(), [latent, parts.prompt_embeds])
    assert latent_grad.abs().sum() > 0 and embed_grad.abs().sum() > 0

    ours = parts.sampler(3).sample(latent.detach(), grad=sdo.NoGrad())
    pipe = DiffusionPipeline.from_pretrained(
        str(sd3_dir), local_files_only=True, text_encoder_3=None, tokenizer_3=None
    )
    plain = pipe(
        [PROMPT, PROMPT], latents=latent.detach(), num_inference_steps=3, guidance_scale=4.0, output_type="latent"
    ).images
    torch.testing.assert_close(plain, ours, rtol=1e-4, atol=1e-5)


def test_pipeline_evaluation_runs_in_batches_of_batch_size(pipeline_dir, clip_dir, tmp_path):
    """Issue 13.14: held-out evaluation over many prompts never sends more than one batch to the network."""
    from sdo.app.finetuning import FinetuneConfig
    from sdo.app.tasks.finetune import PipelineTarget

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(["lower", "newer", "wider", "lowest", "lower newer"]) + "\n")
    config = FinetuneConfig(
        pipeline=str(pipeline_dir),
        prompts=str(prompts),
        task="aesthetic",
        clip_path=str(clip_dir / "clip"),
        aesthetic_head=str(clip_dir / "head.safetensors"),
        sample_steps=2,
        batch_size=2,
    )
    target = PipelineTarget(config, torch.device("cpu"))
    batches = []
    assert target.unet is target.network is target.parts.network  # the old name, read-only
    target.network.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    record = target.evaluator()(target.network)
    measures, images = record
    assert torch.isfinite(torch.tensor(measures["eval_reward"])) and images.shape[0] == 5 and images.min() >= 0
    assert batches and max(batches) <= 2 * config.batch_size  # x2: the guided and unguided halves
    assert len(batches) == 2 * 3  # 2 sampling steps for each of the 3 batches (2 + 2 + 1 prompts)


def test_pickled_weights_are_refused_with_a_conversion_hint(pipeline_dir, clip_dir, tmp_path):
    """Issue 13.15: pipelines and CLIP load only safetensors; a .bin folder says how to convert it."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(pipeline_dir), local_files_only=True)
    pipe.save_pretrained(tmp_path / "bin", safe_serialization=False)
    with pytest.raises(sdo.MissingWeightsError, match=r"pickled \(\.bin\) weights.*safe_serialization=True"):
        from_pipeline(tmp_path / "bin", PROMPT)
    clip = transformers.CLIPModel.from_pretrained(str(clip_dir / "clip"), local_files_only=True)
    clip.save_pretrained(tmp_path / "clipbin")
    # transformers 5 writes safetensors whatever it is told: make the pickled folder by hand.
    (tmp_path / "clipbin" / "model.safetensors").unlink()
    torch.save(clip.state_dict(), tmp_path / "clipbin" / "pytorch_model.bin")
    with pytest.raises(sdo.MissingWeightsError, match=r"pickled \(\.bin\) weights.*safe_serialization=True"):
        ClipImageEncoder(tmp_path / "clipbin")


def test_optimize_prompts_file_runs_one_item_per_prompt(pipeline_dir, clip_dir, tmp_path):
    from sdo.app.sharded import run_items

    config = prompt_items_config(pipeline_dir, clip_dir, tmp_path, f"{PROMPT}\n# skipped\nlower\n")
    summary = run_items(config, progress=False)
    assert summary["finished"] == 2 and [row["condition"] for row in summary["per_item"]] == [repr(PROMPT), "'lower'"]
    metrics = sdo.io.load_json(tmp_path / "items" / "items" / "1" / "metrics.json")
    assert metrics["item"]["prompt"] == "lower"
    assert sdo.io.load_tensors(tmp_path / "items" / "items" / "0" / "latent.safetensors")["latent"].shape == (
        1,
        4,
        8,
        8,
    )
    assert run_items(config, progress=False)["skipped_as_finished"] == 2


def test_optimize_checkpoint_decoder_is_the_same_run_with_less_memory(pipeline_dir, clip_dir, tmp_path):
    from sdo.app.cli import main

    args = ["optimize", "--pipeline", str(pipeline_dir), "--prompt", PROMPT, "--clip-path", str(clip_dir / "clip")]
    args += ["--steps", "2", "--iters", "1", "--batch", "1"]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert main([*args, "--checkpoint-decoder", "--out", str(tmp_path / "decoder")]) == 0
    plain, decoder = (sdo.io.load_json(tmp_path / name / "metrics.json") for name in ("plain", "decoder"))
    latents = [sdo.io.load_tensors(tmp_path / name / "latent.safetensors")["latent"] for name in ("plain", "decoder")]
    torch.testing.assert_close(latents[0], latents[1], rtol=0, atol=1e-6)
    assert [r["reward"] for r in decoder["history"]] == pytest.approx([r["reward"] for r in plain["history"]])
    assert decoder["history"][0]["peak_mem_bytes"] < plain["history"][0]["peak_mem_bytes"]  # decoder recomputed
    assert sdo.io.load_json(tmp_path / "decoder" / "config.json")["config"]["checkpoint_decoder"] is True
