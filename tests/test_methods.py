"""The estimator registry: one name, one gradient mode, in every command."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

import sdo
from sdo.app.bench import BenchConfig
from sdo.app.finetuning import FINETUNE_METHODS, FinetuneConfig
from sdo.app.tasks.latent import LATENT_METHODS, LatentTaskConfig, build_task
from sdo.doodl import edict_sampler, scaled_clip
from sdo.methods import METHODS, MethodOptions, gradient_mode, method_names


def test_names_resolve_to_the_documented_modes():
    latent, weights = MethodOptions("latent"), MethodOptions("weights", draft_k=3, alignprop_high=7)
    assert gradient_mode("full", latent) == gradient_mode("full", weights) == sdo.Full()
    assert gradient_mode("checkpointed", weights) == sdo.Checkpointed()
    assert gradient_mode("sdo", latent) == sdo.Shortcut(step="first")  # the paper's choice for a latent
    assert gradient_mode("sdo", weights) == sdo.Shortcut(step="random")  # and for weights
    assert gradient_mode("sdo-first", weights) == sdo.Shortcut(step="first")
    assert gradient_mode("sdo-last", latent) == sdo.Shortcut(step="last")
    assert gradient_mode("draft-k", weights) == sdo.Truncated(3)
    assert gradient_mode("draft-1", weights) == sdo.Truncated(1)
    assert gradient_mode("alignprop", weights) == sdo.RandomTruncation(1, 7, checkpoint=True)  # as the official code
    checkpointed_draft = gradient_mode("draft-k", dataclasses.replace(weights, checkpoint_kept=True))
    assert checkpointed_draft == sdo.Truncated(3, checkpoint=True)
    assert gradient_mode("nograd", latent) == sdo.NoGrad()
    checkpointed = gradient_mode("sdo", MethodOptions("latent", checkpoint_kept=True))
    assert checkpointed == sdo.Shortcut(step="first", checkpoint=True)


def test_every_command_accepts_exactly_the_registry_names():
    latent = ("sdo", "sdo-first", "sdo-random", "sdo-last", "full", "checkpointed", "adjoint", "sdo-multi")
    assert LATENT_METHODS == method_names("latent") == (*latent, "doodl", "doodl-adam", "freedom")
    modes = tuple(name for name, method in METHODS.items() if method.kind == "mode" and name != "nograd")
    assert FINETUNE_METHODS == method_names("weights") == modes and not {"doodl", "doodl-adam"} & set(modes)
    weights = (*modes, "nograd")
    assert BenchConfig(methods=",".join(weights), variable="weights").method_names == list(weights)
    flags = {field.name: field.metadata for field in dataclasses.fields(LatentTaskConfig)}
    assert flags["method"]["choices"] == LATENT_METHODS


def test_finetuning_modes_come_from_the_registry():
    generator = torch.Generator().manual_seed(0)
    for name in FINETUNE_METHODS:
        config = FinetuneConfig(method=name, sample_steps=10)
        assert config.mode(generator) == gradient_mode(name, MethodOptions("weights", draft_k=2, alignprop_high=10))


def test_unknown_and_latent_incapable_names_are_refused():
    with pytest.raises(sdo.ConfigError, match=r"unknown method 'magic'; known methods: sdo, sdo-first"):
        gradient_mode("magic")
    with pytest.raises(sdo.ConfigError, match=r"method 'alignprop' gives no gradient to the latent"):
        gradient_mode("alignprop", MethodOptions("latent"))
    with pytest.raises(sdo.ConfigError, match=r"`method` must be one of .* for fine-tuning, got 'nograd'"):
        FinetuneConfig(method="nograd")


def test_sampler_schedule_properties():
    ddim = sdo.Sampler(lambda x, t: x, DDIMScheduler(), 4)
    reference = DDIMScheduler()
    reference.set_timesteps(4)
    assert torch.equal(ddim.timesteps, reference.timesteps) and ddim.init_noise_sigma == 1.0
    euler = sdo.Sampler(lambda x, t: x, EulerDiscreteScheduler(), 4)
    reference = EulerDiscreteScheduler()
    reference.set_timesteps(4)
    assert euler.init_noise_sigma == pytest.approx(float(reference.init_noise_sigma)) and euler.init_noise_sigma > 10


def test_doodl_clip_flag_defaults_to_the_clip_scaled_to_the_run():
    assert scaled_clip(50) == pytest.approx(1e-3) and scaled_clip(10) == pytest.approx(5e-3)
    assert scaled_clip(1) == pytest.approx(0.05)  # the authors' total movement, 50 x 1e-3, in one iteration
    with pytest.raises(sdo.ConfigError, match="iters"):
        scaled_clip(0)
    assert MethodOptions().doodl_clip == 1e-3  # the library keeps the authors' value
    assert LatentTaskConfig(iters=10).method_options().doodl_clip == pytest.approx(5e-3)
    assert LatentTaskConfig(iters=10, doodl_clip=2e-3).method_options().doodl_clip == 2e-3
    with pytest.raises(sdo.ConfigError, match="doodl_clip"):
        LatentTaskConfig(doodl_clip=-1.0)


@pytest.mark.parametrize(("method", "chain"), [("sdo", "ddim"), ("doodl", "edict"), ("doodl-adam", "edict")])
def test_adversarial_original_is_the_sample_of_the_chain_the_method_optimizes(method, chain):
    task = build_task(LatentTaskConfig(task="adversarial", method=method, steps=4, batch=2))
    assert task.notes["original_chain"] == chain
    with torch.no_grad():
        ddim = task.sampler.sample(task.latent, sdo.NoGrad())
        edict = edict_sampler(task.sampler).sample(task.latent, sdo.NoGrad())
    expected = edict if chain == "edict" else ddim
    assert torch.equal(task.original, expected) and not torch.allclose(ddim, edict)
    assert torch.equal(task.reward.original, expected)  # the proximity term keeps the image near it
