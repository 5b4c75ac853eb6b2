"""The estimator registry: one name, one gradient mode, in every command."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

import sdo
from sdo.app.bench import BenchConfig
from sdo.app.finetuning import FINETUNE_METHODS, FinetuneConfig
from sdo.app.tasks.latent import LATENT_METHODS, LatentTaskConfig
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
    latent = ("sdo", "sdo-first", "sdo-random", "sdo-last", "full", "checkpointed", "adjoint", "sdo-multi", "doodl")
    assert LATENT_METHODS == method_names("latent") == (*latent, "freedom")
    modes = tuple(name for name, method in METHODS.items() if method.kind == "mode" and name != "nograd")
    assert FINETUNE_METHODS == method_names("weights") == modes and "doodl" not in modes
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
