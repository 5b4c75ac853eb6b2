"""Fine-tuning results that leave sdo (issue 18, Deliver 1, 3 and 5): diffusers-native LoRA files for SD 1.x, SDXL,
SD3 and Flux, full weights and fused pipelines that plain diffusers loads, fine-tuning from Python objects with an
image reward, and sample grids; on the tiny random pipelines of tiny_pipelines."""

from __future__ import annotations

import json

import pytest
import torch

import sdo
from sdo.app.finetuning import FinetuneConfig, finetune
from sdo.app.lora import add_lora, network_of, save_for_diffusers
from sdo.app.resume import prompt_digest
from sdo.errors import ResumeMismatchError
from sdo.finetuning import fuse_lora, load_adapter
from tiny_pipelines import PROMPT, load

transformers = pytest.importorskip("transformers")

SIZES = {"sd": {}, "sd3": {}, "sdxl": dict(height=32, width=48), "flux": dict(height=32, width=48)}
SMALL = dict(steps=1, sample_steps=2, batch_size=1, eval_every=0, checkpoint_every=1, lora_rank=2, lr=5e-2)


def images(pipe, family: str = "sd") -> torch.Tensor:
    """The pipeline's own images ``[1, 3, H, W]`` in [0, 1] for PROMPT from fixed noise."""
    latents = sdo.from_pipeline(pipe, PROMPT, **SIZES[family]).initial_latent(seed=3)
    with torch.no_grad():
        return pipe(PROMPT, latents=latents, num_inference_steps=2, output_type="pt", **SIZES[family]).images


class SeenImages:
    """An image reward (brightness) that records what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, list[str]]] = []

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.calls.append((images.detach(), list(prompts)))
        return images.mean(dim=(1, 2, 3))


@pytest.fixture(params=["sd", "sdxl", "sd3", "flux"])
def family(request):
    return request.param, request.getfixturevalue(
        {"sd": "pipeline_dir", "sdxl": "sdxl_dir", "sd3": "sd3_dir", "flux": "flux_dir"}[request.param]
    )


def test_load_lora_weights_in_plain_diffusers_gives_sdos_images(family, tmp_path):
    name, folder = family
    reward = SeenImages()
    config = FinetuneConfig(**SMALL, out=str(tmp_path / "ft"), **SIZES[name])
    finetune(config, reward=reward, pipeline=load(folder, name), prompts=[PROMPT, "newer"], progress=False)

    images_seen, prompts_seen = reward.calls[0]
    assert images_seen.ndim == 4 and images_seen.shape[1] == 3 and 0 <= images_seen.min() <= images_seen.max() <= 1
    assert prompts_seen[0] in (PROMPT, "newer") and len(prompts_seen) == len(images_seen)
    network_name = "transformer" if name in ("sd3", "flux") else "unet"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ft" / "pytorch_lora_weights.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert keys and all(key.startswith(f"{network_name}.") for key in keys)

    base = images(load(folder, name), name)
    plain = load(folder, name)
    plain.load_lora_weights(tmp_path / "ft")
    theirs = images(plain, name)
    ours_pipe = load(folder, name)
    load_adapter(network_of(ours_pipe)[1], tmp_path / "ft" / "sdo" / "adapter.safetensors")
    ours = images(ours_pipe, name)
    assert (theirs - ours).abs().max() <= 1e-5
    assert (theirs - base).abs().max() > 1e-4  # the adapter changed the model


def test_lora_alpha_other_than_rank_loads_right_through_the_metadata(pipeline_dir, tmp_path):
    pipe = load(pipeline_dir)
    network = add_lora(pipe.unet, rank=2, targets="to_q,to_k,to_v,to_out.0", alpha=6)
    for name, parameter in network.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.3)
    save_for_diffusers(pipe, network, tmp_path, lora=True)
    plain = load(pipeline_dir)
    plain.load_lora_weights(tmp_path)
    assert (images(plain) - images(pipe)).abs().max() <= 1e-5
    assert not list(tmp_path.glob(".diffusers.*"))  # the temporary folder is gone


def test_python_objects_run_record_resume_and_refuse_other_prompts(pipeline_dir, tmp_path):
    pipe, prompts = load(pipeline_dir), [PROMPT, "newer"]
    config = FinetuneConfig(**{**SMALL, "eval_every": 1}, out=str(tmp_path / "ft"))  # task: the zoo's; unused
    record = finetune(config, reward=SeenImages(), pipeline=pipe, prompts=prompts, progress=False)
    assert record["eval_on_training_prompts"] is True and 0 <= record["eval_reward"] <= 1
    recorded = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert recorded["config"]["pipeline"] == str(pipeline_dir)
    assert recorded["config"]["prompts_sha256"] == prompt_digest(prompts)
    assert (tmp_path / "ft" / "samples" / "step-000001.png").read_bytes()[:4] == b"\x89PNG"

    longer = FinetuneConfig(**{**SMALL, "steps": 2}, out=str(tmp_path / "ft"))
    with pytest.raises(ResumeMismatchError, match="different training prompt list"):
        finetune(longer, reward=SeenImages(), pipeline=pipe, prompts=["lower"], progress=False)
    reward = SeenImages()
    record = finetune(longer, reward=reward, pipeline=pipe, prompts=prompts, eval_prompts=["wider"], progress=False)
    assert record["step"] == 2 and record["eval_on_training_prompts"] is False
    assert reward.calls[-1][1] == ["wider"]  # the evaluation scored the evaluation prompt
    lines = (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]  # resumed after step 1


def test_full_weights_and_fused_pipelines_load_in_plain_diffusers(pipeline_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    full = FinetuneConfig(**{**SMALL, "lora_rank": 0, "lr": 1e-3}, out=str(tmp_path / "full"))
    finetune(full, reward=SeenImages(), pipeline=load(pipeline_dir), prompts=[PROMPT], progress=False)
    saved = UNet2DConditionModel.from_pretrained(tmp_path / "full" / "unet")
    tuned = load_adapter(load(pipeline_dir).unet, tmp_path / "full" / "sdo" / "adapter.safetensors")
    for key, value in tuned.state_dict().items():
        torch.testing.assert_close(saved.state_dict()[key], value, rtol=0, atol=0)

    lora = FinetuneConfig(**SMALL, out=str(tmp_path / "lora"), save_pipeline=str(tmp_path / "fused"))
    finetune(lora, reward=SeenImages(), pipeline=load(pipeline_dir), prompts=[PROMPT], progress=False)
    plain = load(pipeline_dir)
    plain.load_lora_weights(tmp_path / "lora")
    expected = images(plain)
    torch.testing.assert_close(images(load(tmp_path / "fused")), expected, rtol=0, atol=1e-4)
    finetune(lora, reward=SeenImages(), pipeline=load(pipeline_dir), prompts=[PROMPT], progress=False)
    torch.testing.assert_close(images(load(tmp_path / "fused")), expected, rtol=0, atol=1e-4)  # its own: replaced
    other = FinetuneConfig(**SMALL, out=str(tmp_path / "other"), save_pipeline=str(tmp_path / "fused"))
    with pytest.raises(sdo.ConfigError, match="is not a pipeline sdo saved for --out"):
        finetune(other, reward=SeenImages(), pipeline=load(pipeline_dir), prompts=[PROMPT], progress=False)
    assert not (tmp_path / "other").exists()

    fused = fuse_lora(load(pipeline_dir), tmp_path / "lora")
    assert not any("lora" in key or "base_layer" in key for key in fused.unet.state_dict())
    fused.save_pretrained(tmp_path / "again")
    torch.testing.assert_close(images(load(tmp_path / "again")), expected, rtol=0, atol=1e-4)


def test_python_api_refuses_what_it_cannot_use(pipeline_dir, tmp_path):
    config = FinetuneConfig(**SMALL, out=str(tmp_path / "ft"))
    with pytest.raises(sdo.ConfigError, match=r"`prompts` .* required"):
        finetune(config, reward=SeenImages(), pipeline=object(), progress=False)
    with pytest.raises(sdo.ConfigError, match="must be lists of strings"):
        finetune(config, reward=SeenImages(), pipeline=object(), prompts="a cat", progress=False)
    with pytest.raises(sdo.ConfigError, match="task of the embedded model"):
        finetune(config, pipeline=object(), prompts=["a cat"], progress=False)
    with pytest.raises(sdo.ConfigError, match="are for pipelines"):
        finetune(config, prompts=["a cat"], progress=False)
    with pytest.raises(sdo.ConfigError, match=r"`task` 'clip' scores a pipeline's images"):
        finetune(FinetuneConfig(**SMALL, task="clip", out=str(tmp_path / "ft")), progress=False)
    assert not (tmp_path / "ft").exists()  # refused before anything was written
