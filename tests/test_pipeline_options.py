"""The one pipeline/reward options block shared by ``sdo optimize`` and ``sdo finetune`` (issue 17, Deliver 7)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from sdo.app.cli import add_config_flags
from sdo.app.finetuning import FinetuneConfig
from sdo.app.pipeline_options import PipelineOptions
from sdo.app.tasks.latent import LatentTaskConfig
from sdo.errors import ConfigError

BLOCK = [item.name for item in dataclasses.fields(PipelineOptions)]


def test_both_configs_take_the_block_and_define_none_of_its_fields_again():
    assert BLOCK == [
        "pipeline",
        "reward",
        "clip_path",
        "pickscore_path",
        "aesthetic_head",
        "style_image",
        "height",
        "width",
        "guidance",
        "max_pixels",
    ]
    for config_cls in (LatentTaskConfig, FinetuneConfig):
        assert issubclass(config_cls, PipelineOptions)
        names = [item.name for item in dataclasses.fields(config_cls)]
        assert names[: len(BLOCK)] == BLOCK and len(set(names)) == len(names)
        for name in BLOCK:
            if name != "reward":  # fine-tuning's reward defaults to its task's (the one override)
                assert (
                    config_cls.__dataclass_fields__[name].metadata
                    is PipelineOptions.__dataclass_fields__[name].metadata
                )


def test_the_block_gives_flat_flags_with_the_old_names():
    for config_cls in (LatentTaskConfig, FinetuneConfig):
        parser = argparse.ArgumentParser()
        add_config_flags(parser, config_cls)
        args = parser.parse_args(["--clip-path", "c", "--pickscore-path", "p", "--style-image", "s.png"])
        args = parser.parse_args(["--aesthetic-head", "h", "--height", "16", "--width", "24", "--guidance", "2"])
        assert (args.aesthetic_head, args.height, args.width, args.guidance) == ("h", 16, 24, 2.0)


def test_reward_spec_defaults_per_config():
    assert LatentTaskConfig().reward_spec() == "clip"
    assert FinetuneConfig().reward_spec() == "confidence"  # the embedded model's task; no image reward
    tuned = FinetuneConfig(pipeline="p", prompts="f", task="aesthetic")
    assert tuned.reward_spec() == "aesthetic" and tuned.reward_terms() == {"aesthetic": 1.0}
    weighted = FinetuneConfig(pipeline="p", prompts="f", reward="clip=1,aesthetic=0.5")
    assert weighted.reward_terms() == {"clip": 1.0, "aesthetic": 0.5}
    assert LatentTaskConfig(height=16).size() == {"height": 16, "width": None}


def test_the_block_validates_once_for_both_configs():
    for make in (
        lambda **kw: LatentTaskConfig(prompt="a cat", **kw),
        lambda **kw: FinetuneConfig(prompts="f", **kw),
    ):
        with pytest.raises(ConfigError, match="`style_image`"):
            make(pipeline="p", reward="style")
        with pytest.raises(ConfigError, match="unknown reward 'nope'"):
            make(pipeline="p", reward="nope")
        with pytest.raises(ConfigError, match="`height` must be an integer in \\[0, 16384\\]"):
            make(height=-8)


def test_image_reward_passes_every_file_option(monkeypatch):
    import sdo.app.reward_spec as reward_spec

    seen = {}
    monkeypatch.setattr(reward_spec, "image_reward", lambda spec, prompts, **kw: seen.update(spec=spec, **kw))
    FinetuneConfig(
        pipeline="p", prompts="f", task="pickscore", clip_path="c", pickscore_path="k", aesthetic_head="h"
    ).image_reward(["a"], "cpu")
    assert seen == dict(
        spec="pickscore",
        device="cpu",
        clip_path="c",
        pickscore_path="k",
        aesthetic_head="h",
        style_image="",
        max_pixels=64_000_000,
    )
