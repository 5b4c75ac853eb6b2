"""The Python API refuses what the command refuses (issue 26, Deliver 3, 8 and 9): ``sdo.finetune`` checks its
reward's output, no update leaves a user's weights or a latent non-finite, guidance scales are finite numbers in
[0, 1000] wherever they are given, and bad prompt lists or image batches are one ``SdoError``, not a traceback."""

from __future__ import annotations

import math

import pytest
import torch

import sdo
from sdo import zoo
from sdo.app import cli
from sdo.app.finetuning import FinetuneConfig, finetune, ink_reward
from sdo.errors import ConfigError, NonFiniteRewardError
from sdo.latent import LatentProblem, SampleObjective
from tiny_pipelines import PROMPT, load

transformers = pytest.importorskip("transformers")

TINY = dict(steps=1, sample_steps=2, batch_size=2, eval_every=0)


def tiny_config(tmp_path, **changes) -> FinetuneConfig:
    return FinetuneConfig(**{**TINY, "out": str(tmp_path / "run"), **changes})


def brightness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    return images.mean(dim=(1, 2, 3))


# Deliver 3: sdo.finetune checks its reward at the first call.


@pytest.mark.parametrize(
    "reward, got",
    [
        (lambda x0, labels: ink_reward(x0).mean(), "got ()"),  # a scalar: the logged reward was divided by B
        (lambda x0, labels: ink_reward(x0)[:, None].expand(-1, 3), r"got \(2, 3\)"),  # logged x3
        (lambda x0, labels: ink_reward(x0)[:1], r"got \(1,\)"),
        (lambda x0, labels: 0.5, "got float"),  # AttributeError before
        (lambda x0, labels: [0.5, 0.5], "got list"),
        (lambda x0, labels: None, "got NoneType"),
        (lambda x0, labels: torch.ones(len(x0), dtype=torch.long), "got a tensor of torch.int64"),
    ],
    ids=["scalar", "B-by-3", "one", "float", "list", "None", "integer"],
)
def test_finetune_refuses_a_reward_that_is_not_a_floating_batch_tensor(tmp_path, reward, got):
    with pytest.raises(ConfigError, match=r"`reward` must return a .*\[batch\] tensor of shape \(2,\), " + got):
        finetune(tiny_config(tmp_path), reward=reward, progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_finetune_evaluation_checks_the_reward_too(pipeline_dir, tmp_path):
    def reward(images, prompts):  # right in training, a scalar in the (no-grad) evaluation
        return brightness(images, prompts) if torch.is_grad_enabled() else images.mean()

    config = tiny_config(tmp_path, batch_size=1)
    with pytest.raises(ConfigError, match=r"shape \(1,\), got \(\)"):
        finetune(config, reward=reward, pipeline=load(pipeline_dir), prompts=[PROMPT], progress=False)


# Deliver 8: the user's objects stay finite.


@pytest.mark.parametrize(
    "reward, what",
    [
        (lambda images, prompts: brightness(images, prompts) * math.nan, "The reward is not finite at step 1"),
        (  # finite values, NaN gradient: sqrt's gradient at the masked-out negative entries
            lambda images, prompts: torch.where(images > 2, (images - 2).sqrt(), images).mean(dim=(1, 2, 3)),
            "The gradient of the reward is not finite at step 1",
        ),
    ],
    ids=["nan-reward", "nan-gradient"],
)
def test_a_non_finite_update_leaves_the_users_full_weights_as_they_were(pipeline_dir, tmp_path, reward, what):
    pipe = load(pipeline_dir)
    before = {name: value.clone() for name, value in pipe.unet.state_dict().items()}
    config = tiny_config(tmp_path, batch_size=1, lora_rank=0)
    with pytest.raises(NonFiniteRewardError, match=what + r" .*stopped before the update.*checkpoint: none") as err:
        finetune(config, reward=reward, pipeline=pipe, prompts=[PROMPT], progress=False)
    assert err.value.result == {"step": 1, "last_checkpoint": None}
    after = pipe.unet.state_dict()
    assert all(torch.equal(after[name], value) for name, value in before.items())  # NaN weights before the fix


def test_finetune_refuses_a_step_that_would_overflow_a_weight(tmp_path):
    config = tiny_config(tmp_path, task="bold", lr=1e38)  # Adam's first step moves each weight by ~lr
    with pytest.raises(NonFiniteRewardError, match=r"update at step 1 could make a weight infinite .*lr 1e\+38"):
        finetune(config, progress=False)  # a RuntimeError (overflow) from inside torch before


def test_a_latent_update_that_would_not_be_finite_is_refused_and_not_applied():
    unet = zoo.load_unet()
    sampler = zoo.ddim_sampler(unet, torch.tensor([1, 2]), 2)
    noise = zoo.noise(2, 0)
    problem = LatentProblem(sampler, noise, ink_reward)

    def overflowing(z):
        def update(z, gradient):
            with torch.no_grad():
                z.sub_(gradient * 1e38 * 1e10)  # a step that overflows float32

        return update

    stepper = problem.stepper(SampleObjective(sampler, ink_reward), overflowing, sdo.Shortcut())
    with pytest.raises(
        NonFiniteRewardError, match="update at iteration 0 would make the latent NaN or infinite"
    ) as err:
        stepper.step()
    assert torch.equal(stepper.latent.detach(), noise)  # kept as it was
    assert torch.equal(err.value.result.latent, noise) and len(err.value.result.history) == 1


def test_optimize_latent_refuses_a_learning_rate_whose_adam_step_overflows():
    sampler = zoo.ddim_sampler(zoo.load_unet(), torch.tensor([1]), 2)
    with pytest.raises(ConfigError, match=r"`lr` must be a finite number in \(0, 3.403e\+37\], got 1e\+38"):
        sdo.optimize_latent(sampler, zoo.noise(1, 0), ink_reward, lr=1e38, iters=1, progress=False)


@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0, 1001.0, "7.5"])
def test_guidance_scales_are_finite_numbers_in_the_commands_range(pipeline_dir, value):
    shown = repr(value)
    with pytest.raises(ConfigError, match=rf"`guidance_scale` must be a finite number in \[0, 1000\], got {shown}"):
        sdo.from_pipeline(pipeline_dir, PROMPT, guidance_scale=value)
    with pytest.raises(ConfigError, match=r"`guidance_scale` must be a finite number in \[0, 1000\]"):
        zoo.ddim_sampler(zoo.load_unet(), torch.tensor([1]), 2, guidance_scale=value)


def test_invert_refuses_a_non_finite_guidance_scale(pipeline_dir):
    parts = sdo.from_pipeline(pipeline_dir, PROMPT)
    images = torch.rand(1, 3, *parts.image_size)
    with pytest.raises(ConfigError, match=r"`guidance_scale` must be a finite number in \[0, 1000\], got nan"):
        parts.invert(images, 2, 4, math.nan)  # a NaN latent before
    with pytest.raises(ConfigError, match="`step` must be an integer"):
        parts.invert(images, math.nan, 4)
    with pytest.raises(ConfigError, match="`num_inference_steps` must be an integer"):
        parts.invert(images, 2, math.nan)
    assert torch.isfinite(parts.invert(images, 2, 4, 1.0)).all()


# Deliver 9: one SdoError instead of a traceback.


def test_from_pipeline_refuses_an_empty_or_non_text_prompt(pipeline_dir):
    with pytest.raises(ConfigError, match=r"`prompt` must be a string or a non-empty list of strings, got \[\]"):
        sdo.from_pipeline(pipeline_dir, [])
    with pytest.raises(ConfigError, match="`prompt` must be a string or a list of strings, got an item 3"):
        sdo.from_pipeline(pipeline_dir, [PROMPT, 3])
    with pytest.raises(ConfigError, match="`prompt` must be UTF-8 text"):
        sdo.from_pipeline(pipeline_dir, "caf\udce9")


def test_encode_refuses_an_empty_batch(pipeline_dir):
    parts = sdo.from_pipeline(pipeline_dir, PROMPT)
    with pytest.raises(ConfigError, match=r"`images` is an empty batch \(shape \(0, 3, 16, 16\)\)"):
        parts.encode(torch.rand(0, 3, *parts.image_size))


@pytest.mark.parametrize(
    "prompts, eval_prompts, match",
    [
        ((p for p in [PROMPT]), None, "`prompts` must be a list of strings, got generator; pass list"),
        ([PROMPT], [], "`eval_prompts` must be a non-empty list of strings, got an empty list"),
        ([PROMPT], [1], "`eval_prompts` must be a list of strings, got an item 1"),
        (["\udcff"], None, "`prompts` must be UTF-8 text"),
    ],
    ids=["generator", "empty-eval", "number-eval", "not-utf8"],
)
def test_finetune_refuses_bad_prompt_lists_before_anything_loads(tmp_path, prompts, eval_prompts, match):
    config = tiny_config(tmp_path)
    with pytest.raises(ConfigError, match=match):  # nothing loads: the pipeline is never looked at
        finetune(config, reward=brightness, pipeline=object(), prompts=prompts, eval_prompts=eval_prompts)
    assert not (tmp_path / "run").exists()


def test_a_prompt_file_that_is_not_utf8_is_one_line_naming_its_flag(tmp_path):
    (tmp_path / "train.txt").write_text("a cat\n")
    (tmp_path / "eval.txt").write_bytes(b"a dog\ncaf\xe9\n")
    config = tiny_config(
        tmp_path,
        task="clip",
        pipeline=str(tmp_path / "absent"),
        prompts=str(tmp_path / "train.txt"),
        eval_prompts=str(tmp_path / "eval.txt"),
    )
    with pytest.raises(ConfigError, match=r"^--eval-prompts .*eval.txt, line 2: not UTF-8 text \(byte 0xe9\)\.$"):
        finetune(config)


def test_a_non_utf8_prompt_on_the_command_line_is_one_line_naming_the_flag(capsys, tmp_path):
    out = tmp_path / "out"
    argv = ["optimize", "--pipeline", str(tmp_path / "absent"), "--prompt", "\udcff", "--out", str(out)]
    assert cli.main(argv) == 2  # what Python makes of the argument byte 0xff
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sdo optimize: error: --prompt must be UTF-8 text"), err
    assert "(flag --prompt)" not in err[0] and not out.exists()
