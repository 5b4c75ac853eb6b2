"""PickScore, weighted sums of rewards (``--reward clip=1.0,aesthetic=0.5``), and every reward's gradient."""

from __future__ import annotations

import json

import pytest
import torch

import sdo
from sdo import zoo
from sdo.app.reward_spec import image_reward, parse_reward_spec
from sdo.app.tasks.finetune import ink_reward
from sdo.clip_rewards import ClipImageEncoder, ClipScoreReward, PickScoreReward
from sdo.rewards import AdversarialReward, ClassifierReward, StyleReward, WeightedReward
from tiny_pipelines import PROMPT, write_png

pytest.importorskip("transformers")


def test_specs_parse_to_names_and_weights():
    assert parse_reward_spec("clip") == {"clip": 1.0}
    assert parse_reward_spec("clip=1.0, aesthetic=0.5") == {"clip": 1.0, "aesthetic": 0.5}
    assert parse_reward_spec("pickscore=2,style=0") == {"pickscore": 2.0, "style": 0.0}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "bad reward spec"),
        ("clip=", "bad reward spec"),
        ("=1", "bad reward spec"),
        ("clip,,aesthetic", "bad reward spec"),
        ("clip=one", "bad weight 'one'"),
        ("clip=1=2", "bad weight"),
        ("beauty=1", r"unknown reward 'beauty'.*known rewards: clip, aesthetic, style, pickscore"),
        ("clip=-0.5", "must be a finite number >= 0, got -0.5"),
        ("clip=nan", "finite number >= 0"),
        ("clip=1,clip=2", "appears twice"),
    ],
)
def test_bad_specs_get_one_clear_error(spec, message):
    with pytest.raises(sdo.ConfigError, match=message):
        parse_reward_spec(spec)


def test_config_and_weighted_reward_refuse_negative_weights():
    from sdo.app.tasks.latent import LatentTaskConfig

    with pytest.raises(sdo.ConfigError, match="finite number >= 0"):
        LatentTaskConfig(pipeline="p", prompt="x", reward="clip=1,aesthetic=-1")
    with pytest.raises(sdo.ConfigError, match="negative for b"):
        WeightedReward({"a": (1.0, ink_reward), "b": (-1.0, ink_reward)})


def image_rewards(clip_dir, tmp_path):
    clip = str(clip_dir / "clip")
    options = dict(
        clip_path=clip,
        pickscore_path=clip,  # any CLIP folder has PickScore's layout
        aesthetic_head=str(clip_dir / "head.safetensors"),
        style_image=str(write_png(tmp_path / "style.png")),
    )
    specs = ("clip", "aesthetic", "style", "pickscore", "clip=1.0,aesthetic=0.5,style=2,pickscore=0.1")
    return {spec: image_reward(spec, [PROMPT], **options) for spec in specs}


def test_every_image_reward_passes_its_gradient_to_the_image(clip_dir, tmp_path):
    images = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(0)).requires_grad_()
    for spec, reward in image_rewards(clip_dir, tmp_path).items():
        values = reward(images, None)
        assert values.shape == (2,) and torch.isfinite(values).all(), spec
        (grad,) = torch.autograd.grad(values.sum(), images)
        assert grad.abs().sum() > 0, spec


def test_weighted_reward_is_the_weighted_sum_of_its_logged_terms(clip_dir, tmp_path):
    rewards = image_rewards(clip_dir, tmp_path)
    weighted = rewards["clip=1.0,aesthetic=0.5,style=2,pickscore=0.1"]
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    total = weighted(images, None)
    terms = weighted.last_terms
    assert set(terms) == {"clip", "aesthetic", "style", "pickscore"}
    expected = terms["clip"] + 0.5 * terms["aesthetic"] + 2 * terms["style"] + 0.1 * terms["pickscore"]
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(terms["clip"], rewards["clip"](images, None))


def test_pickscore_is_the_scaled_clip_similarity(clip_dir):
    pick = PickScoreReward([PROMPT, "newer"], path=clip_dir / "clip")
    images = torch.rand(2, 3, 32, 32)
    cosine = (pick.encoder.image_embeds(images) * pick.text.embeds).sum(-1)
    torch.testing.assert_close(pick(images), pick.encoder.model.logit_scale.exp() * cosine)
    torch.testing.assert_close(pick(images, torch.tensor([1, 1]))[1], pick(images)[1])


def test_a_list_of_prompts_is_scored_as_given(clip_dir):
    """The image-reward convention ``reward(images, prompts)``: prompts given at the call replace those of the
    constructor, image by image; an unseen prompt is encoded once and cached."""
    clip = ClipScoreReward([PROMPT, "newer"], encoder=ClipImageEncoder(clip_dir / "clip"))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(clip(images, ["newer", PROMPT]), clip(images, torch.tensor([1, 0])))
    fresh = clip(images, ["a third prompt", "a third prompt"])
    alone = ClipScoreReward("a third prompt", encoder=clip.encoder)(images)
    torch.testing.assert_close(fresh, alone)
    assert "a third prompt" in clip.text.cache


def test_missing_pickscore_folder_names_its_variable(monkeypatch):
    monkeypatch.delenv("SDO_PICKSCORE_PATH", raising=False)
    with pytest.raises(sdo.MissingWeightsError, match=r"\$SDO_PICKSCORE_PATH"):
        PickScoreReward(PROMPT)


def test_every_embedded_model_reward_passes_its_gradient_to_the_image():
    classifier = zoo.load_reward_classifier()
    images, labels = zoo.load_digits()
    x = (images[:2] * 0.9).clone().requires_grad_()  # in the displayable range, where ink_reward is not clamped
    rewards = {
        "classifier": ClassifierReward(classifier, 3, views=2),
        "style": StyleReward(classifier, images[labels == 8][:1]),
        "adversarial": AdversarialReward(classifier, 8, images[:2]),
        "ink (bold)": ink_reward,
    }
    for name, reward in rewards.items():
        (grad,) = torch.autograd.grad(reward(x, None).sum(), x)
        assert grad.abs().sum() > 0, name


def test_optimize_logs_each_term(pipeline_dir, clip_dir, tmp_path):
    from sdo.app.cli import main

    out = tmp_path / "opt"
    args = ["optimize", "--pipeline", str(pipeline_dir), "--prompt", PROMPT, "--steps", "2", "--iters", "2"]
    weights = ["--reward", "clip=1.0,aesthetic=0.5", "--aesthetic-head", str(clip_dir / "head.safetensors")]
    assert main([*args, *weights, "--clip-path", str(clip_dir / "clip"), "--batch", "1", "--out", str(out)]) == 0
    history = json.loads((out / "metrics.json").read_text())["history"]
    for record in history:
        assert record["reward"] == pytest.approx(record["reward_clip"] + 0.5 * record["reward_aesthetic"], abs=1e-5)
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_finetune_logs_each_term(pipeline_dir, clip_dir, tmp_path):
    from sdo.app.finetuning import FinetuneConfig, finetune

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("lower\nnewer\n")
    config = FinetuneConfig(
        pipeline=str(pipeline_dir),
        prompts=str(prompts),
        reward="pickscore=1,clip=0.5",
        clip_path=str(clip_dir / "clip"),
        pickscore_path=str(clip_dir / "clip"),
        steps=2,
        sample_steps=2,
        batch_size=2,
        eval_every=0,
        lora_rank=2,
        out=str(tmp_path / "ft"),
    )
    finetune(config, progress=False)
    records = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        assert record["reward"] == pytest.approx(record["reward_pickscore"] + 0.5 * record["reward_clip"], abs=1e-5)
