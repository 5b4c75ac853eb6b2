"""Hub ids (``org/name``) wherever a model is taken: pipelines and CLIP models from a Hugging Face cache laid out as
the Hub lays it out, offline (issue 18, Deliver 2)."""

from __future__ import annotations

import pytest
import torch

import sdo
from sdo.hub import model_source
from tiny_pipelines import PROMPT

pytest.importorskip("transformers")


def test_model_source_takes_a_folder_then_a_hub_id_and_refuses_the_rest(tmp_path):
    assert model_source(tmp_path, "CLIP model") == sdo.hub.ModelSource(str(tmp_path), hub=False)
    assert model_source("org/name", "CLIP model") == sdo.hub.ModelSource("org/name", hub=True)
    assert model_source("stabilityai/stable-diffusion-2-1", "x").hub
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()
    assert not model_source(tmp_path / "org" / "name", "x").hub  # an existing folder wins
    (tmp_path / "file.txt").write_text("x")
    for bad, reason in [("nowhere", "no such folder"), ("a/b/c", "no such folder"), (tmp_path / "file.txt", "a file")]:
        with pytest.raises(sdo.MissingWeightsError, match=reason) as error:
            model_source(bad, "diffusers pipeline")
        assert "\n" not in str(error.value) and "Hub id" in str(error.value)


def test_from_pipeline_and_load_pipeline_take_a_hub_id_from_the_cache(offline_cache, pipeline_dir):
    from_folder = sdo.from_pipeline(pipeline_dir, PROMPT, guidance_scale=5.0)
    from_hub = sdo.from_pipeline("org/tiny-sd", PROMPT, guidance_scale=5.0)
    latent = from_hub.initial_latent(seed=2)
    expected = from_folder.decode(from_folder.sampler(3).sample(latent, grad=sdo.NoGrad()))
    got = from_hub.decode(from_hub.sampler(3).sample(latent, grad=sdo.NoGrad()))
    assert expected.std() > 0
    torch.testing.assert_close(got, expected)
    pipe = sdo.pipelines.load_pipeline("org/tiny-sd")
    assert type(pipe).__name__ == "StableDiffusionPipeline"


def test_clip_and_pickscore_take_a_hub_id_from_the_cache(offline_cache, clip_dir):
    from sdo.clip_rewards import ClipImageEncoder, ClipScoreReward, PickScoreReward

    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    from_folder = ClipScoreReward(PROMPT, path=clip_dir / "clip")(images)
    from_hub = ClipScoreReward(PROMPT, encoder=ClipImageEncoder("org/tiny-clip"))(images)
    torch.testing.assert_close(from_hub, from_folder)
    pick = PickScoreReward(PROMPT, path="org/tiny-clip")
    torch.testing.assert_close(pick(images), pick.scale * from_folder)


def test_optimize_cli_takes_hub_ids_for_the_pipeline_and_clip(offline_cache, pipeline_dir, clip_dir, tmp_path):
    from sdo.app.cli import main

    common = ["optimize", "--prompt", PROMPT, "--steps", "2", "--iters", "1", "--batch", "1"]
    hub = ["--pipeline", "org/tiny-sd", "--clip-path", "org/tiny-clip", "--out", str(tmp_path / "h")]
    assert main([*common, *hub]) == 0
    folders = ["--pipeline", str(pipeline_dir), "--clip-path", str(clip_dir / "clip"), "--out", str(tmp_path / "f")]
    assert main([*common, *folders]) == 0
    hub_latent = sdo.io.load_tensors(tmp_path / "h" / "latent.safetensors")["latent"]
    folder_latent = sdo.io.load_tensors(tmp_path / "f" / "latent.safetensors")["latent"]
    torch.testing.assert_close(hub_latent, folder_latent)


def test_an_uncached_hub_id_offline_is_one_line_naming_the_id_and_hf_hub_offline(offline_cache, capsys, tmp_path):
    from sdo.app.cli import main
    from sdo.clip_rewards import ClipImageEncoder

    for load in (lambda: sdo.from_pipeline("org/absent", PROMPT), lambda: ClipImageEncoder("org/absent-clip")):
        with pytest.raises(sdo.MissingWeightsError, match=r"'org/absent.*HF_HUB_OFFLINE") as error:
            load()
        assert "\n" not in str(error.value)
    out = str(tmp_path / "o")
    assert main(["optimize", "--pipeline", "org/absent", "--prompt", PROMPT, "--out", out]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "'org/absent'" in line and "HF_HUB_OFFLINE" in line
