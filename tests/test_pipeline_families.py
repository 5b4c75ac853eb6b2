"""SDXL and Flux pipelines from a local folder (tiny random models): the same image as the plain diffusers pipeline,
gradients, fine-tuning with every method, non-square sizes and clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import sdo
from sdo.app.finetuning import add_lora
from sdo.pipelines import from_pipeline
from tiny_pipelines import HEIGHT, PROMPT, WIDTH, load

transformers = pytest.importorskip("transformers")


@pytest.fixture(params=["sdxl", "flux"])
def family_dir(request, sdxl_dir, flux_dir):
    return request.param, {"sdxl": sdxl_dir, "flux": flux_dir}[request.param]


def plain(folder, **options):
    return load(folder)(height=HEIGHT, width=WIDTH, **options).images


@pytest.mark.parametrize("options", [{}, {"guidance_scale": 3.0}], ids=["defaults", "guidance-3"])
def test_the_sample_is_the_plain_pipelines_image(family_dir, options):
    family, folder = family_dir
    parts = from_pipeline(folder, [PROMPT, "newer"], height=HEIGHT, width=WIDTH, **options)
    assert parts.family == family
    latent = parts.initial_latent(seed=2)
    with torch.no_grad():
        ours = parts.sampler(3).sample(latent, grad=sdo.NoGrad())
        image = parts.decode(ours)  # [0, 1], as the plain pipeline's output_type="pt"
    run = dict(prompt=[PROMPT, "newer"], latents=latent, num_inference_steps=3, **options)
    torch.testing.assert_close(plain(folder, output_type="latent", **run), ours, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(plain(folder, output_type="pt", **run), image, rtol=1e-4, atol=1e-4)
    assert image.shape == (2, 3, HEIGHT, WIDTH)


def test_flux_true_classifier_free_guidance_with_a_negative_prompt(flux_dir):
    parts = from_pipeline(flux_dir, PROMPT, height=HEIGHT, width=WIDTH, negative_prompt="low", true_cfg_scale=2.0)
    assert parts.model_fn.guided and parts.latent_shape == (1, 8 * 12, 16)
    latent = parts.initial_latent(seed=0)
    ours = parts.sampler(2).sample(latent, grad=sdo.NoGrad())
    run = dict(negative_prompt="low", true_cfg_scale=2.0, latents=latent, num_inference_steps=2)
    torch.testing.assert_close(plain(flux_dir, prompt=PROMPT, output_type="latent", **run), ours, rtol=1e-4, atol=1e-4)


def test_sdxl_zero_negative_embeddings_and_time_ids(sdxl_dir):
    parts = from_pipeline(sdxl_dir, PROMPT, height=HEIGHT, width=WIDTH)
    assert parts.negative_embeds.abs().sum() == 0  # force_zeros_for_empty_prompt, no negative prompt given
    assert parts.model_fn.added_cond_kwargs["time_ids"].tolist() == [[32, 48, 0, 0, 32, 48]]
    named = from_pipeline(sdxl_dir, PROMPT, height=HEIGHT, width=WIDTH, negative_prompt="low")
    assert named.negative_embeds.abs().sum() > 0


def test_gradients_reach_the_latent_the_embeddings_and_the_lora_weights(family_dir):
    _, folder = family_dir
    parts = from_pipeline(folder, [PROMPT, PROMPT], height=HEIGHT, width=WIDTH, embeds_require_grad=True)
    latent = parts.initial_latent(1).requires_grad_()
    image = parts.decode(parts.sampler(3).sample(latent, grad=sdo.Shortcut()))
    grads = torch.autograd.grad(image.square().mean(), [latent, parts.prompt_embeds, parts.pooled_embeds])
    assert all(grad.abs().sum() > 0 for grad in grads)

    network = add_lora(parts.network, rank=2, targets=parts.lora_targets)
    lora = [p for name, p in network.named_parameters() if "lora_A" in name]
    assert lora and all(p.requires_grad for p in lora)
    for name, parameter in network.named_parameters():
        if "lora_B" in name:  # B starts at zero, which would leave A without a gradient
            torch.nn.init.normal_(parameter, std=0.1)
    image = parts.decode(parts.sampler(3).sample(latent.detach(), grad=sdo.Shortcut(step="random")))
    lora_grads = torch.autograd.grad(image.square().mean(), lora)
    assert sum(float(grad.abs().sum()) for grad in lora_grads) > 0


@pytest.mark.parametrize("method", ["sdo", "draft-k", "draft-1", "alignprop", "checkpointed"])
def test_two_finetuning_steps_for_each_method(family_dir, clip_dir, tmp_path, method):
    from sdo.app.finetuning import FinetuneConfig, finetune

    _, folder = family_dir
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("lower\nnewer\n")
    config = FinetuneConfig(
        pipeline=str(folder),
        prompts=str(prompts),
        task="clip",
        method=method,
        clip_path=str(clip_dir / "clip"),
        steps=2,
        sample_steps=2,
        draft_k=2,
        truncation_high=2,
        batch_size=2,
        eval_every=0,
        checkpoint_every=2,
        lora_rank=2,
        lr=1e-2,
        kl_weight=0.5,  # the base-model regularizer, through the adapters switched off
        height=HEIGHT,
        width=WIDTH,
        out=str(tmp_path / "ft"),
    )
    record = finetune(config, progress=False)
    assert record["step"] == 2 and "eval_reward" in record and record["kl"] >= 0
    first = json.loads((tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["kl"] == 0.0  # LoRA's B starts at zero
    weights = sdo.io.load_tensors(tmp_path / "ft" / "sdo" / "adapter.safetensors")
    assert any(value.abs().sum() > 0 for name, value in weights.items() if "lora_B" in name)


def test_optimize_and_finetune_commands_on_a_pipeline(family_dir, clip_dir, tmp_path):
    from sdo.app.cli import main

    _, folder = family_dir
    size = ["--height", str(HEIGHT), "--width", str(WIDTH)]
    clip = ["--clip-path", str(clip_dir / "clip")]
    optimize = ["optimize", "--pipeline", str(folder), "--prompt", PROMPT, "--steps", "2", "--iters", "2"]
    assert main([*optimize, "--batch", "1", *clip, *size, "--out", str(tmp_path / "opt")]) == 0
    assert (tmp_path / "opt" / "grid.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "prompts.txt").write_text("lower\n")
    finetune = ["finetune", "--pipeline", str(folder), "--prompts", str(tmp_path / "prompts.txt"), "--task", "clip"]
    small = ["--steps", "1", "--sample-steps", "2", "--batch-size", "1", "--lora-rank", "2"]
    assert main([*finetune, *small, *clip, *size, "--out", str(tmp_path / "ft")]) == 0
    assert (tmp_path / "ft" / "sdo" / "adapter.safetensors").is_file()


def test_a_size_the_model_cannot_take_names_the_multiple(family_dir):
    family, folder = family_dir
    multiple = {"sdxl": 8, "flux": 4}[family]
    with pytest.raises(sdo.ConfigError, match=f"multiples of {multiple}"):
        from_pipeline(folder, PROMPT, height=HEIGHT + 2, width=WIDTH)


def test_missing_component_and_unsupported_class_name_the_supported_families(sdxl_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(sdxl_dir, copy)
    index = json.loads((copy / "model_index.json").read_text())
    (copy / "model_index.json").write_text(json.dumps({**index, "unet": [None, None]}))
    with pytest.raises(sdo.ConfigError, match=r"has no `unet`.*StableDiffusionXLPipeline.*FluxPipeline"):
        from_pipeline(copy, PROMPT)
    (copy / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyV22Pipeline"}))
    with pytest.raises(sdo.ConfigError, match=r"KandinskyV22Pipeline is not supported.*SDXL.*SD3.*Flux"):
        from_pipeline(copy, PROMPT)
    (copy / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(copy / "vae")
    with pytest.raises(sdo.MissingWeightsError, match="could not be loaded"):
        from_pipeline(copy, PROMPT)


def test_sd3_contract_with_a_non_square_size(sd3_dir):
    parts = from_pipeline(sd3_dir, PROMPT, height=HEIGHT, width=WIDTH)
    latent = parts.initial_latent(seed=4)
    ours = parts.sampler(2).sample(latent, grad=sdo.NoGrad())
    options = dict(text_encoder_3=None, tokenizer_3=None)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(sd3_dir), local_files_only=True, **options)
    image = pipe(PROMPT, latents=latent, num_inference_steps=2, height=HEIGHT, width=WIDTH, output_type="latent")
    torch.testing.assert_close(image.images, ours, rtol=1e-4, atol=1e-4)
