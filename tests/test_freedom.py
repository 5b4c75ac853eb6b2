"""freedom_sample: deterministic per seed, guidance raises the reward on every x0-predicting scheduler, errors."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

import sdo

SCHEDULERS = {
    "ddim": lambda: DDIMScheduler(clip_sample=False),
    "ddpm": lambda: DDPMScheduler(clip_sample=False),
    "euler": lambda: EulerDiscreteScheduler(),
    "flowmatch": lambda: FlowMatchEulerDiscreteScheduler(),
}


def brightness(x0: torch.Tensor, cond: object = None) -> torch.Tensor:
    """A reward guidance must raise: the mean pixel value."""
    return x0.flatten(1).mean(dim=1)


def toy_sampler(toy, name, n_steps=6):
    model, cond, _ = toy
    model.requires_grad_(False)
    return sdo.Sampler(lambda v, t: model(v, t, cond.detach()), SCHEDULERS[name](), n_steps)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_guidance_raises_the_reward(toy, name):
    sampler = toy_sampler(toy, name)
    x = toy[2].detach() * sampler.init_noise_sigma
    plain = sampler.sample(x, grad=sdo.NoGrad(), generator=torch.Generator().manual_seed(3))
    guided = sdo.freedom_sample(sampler, x, brightness, scale=0.3, generator=torch.Generator().manual_seed(3))
    assert (guided.rewards > brightness(plain)).all()
    assert [h["step"] for h in guided.history] == list(range(6))
    assert guided.network_calls == 6 and guided.seconds > 0


def test_time_travel_repeats_the_early_half_of_the_window(toy):
    sampler = toy_sampler(toy, "ddpm")
    result = sdo.freedom_sample(sampler, toy[2].detach(), brightness, repeats=3, generator=torch.Generator())
    assert [(h["step"], h["pass"]) for h in result.history[:7]] == [
        (0, 0),
        (0, 1),
        (0, 2),
        (1, 0),
        (1, 1),
        (1, 2),
        (2, 0),
    ]
    assert len(result.history) == 3 * 3 + 3 and result.network_calls == 12


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_deterministic_for_a_seed_and_unguided_at_scale_zero(toy, name):
    sampler = toy_sampler(toy, name)
    x = toy[2].detach()
    runs = [
        sdo.freedom_sample(sampler, x, brightness, repeats=3, generator=torch.Generator().manual_seed(5))
        for _ in range(2)
    ]
    torch.testing.assert_close(runs[0].sample, runs[1].sample, rtol=0, atol=0)
    assert runs[0].history == runs[1].history
    unguided = sdo.freedom_sample(sampler, x, brightness, scale=0.0, generator=torch.Generator().manual_seed(5))
    plain = sampler.sample(x, grad=sdo.NoGrad(), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(unguided.sample, plain, rtol=1e-12, atol=1e-12)


def test_window_limits_the_guided_steps(toy):
    sampler = toy_sampler(toy, "ddim")
    result = sdo.freedom_sample(sampler, toy[2].detach(), brightness, window=(2, 5), start_step=1)
    assert [h["step"] for h in result.history] == [2, 3, 4]


def test_decoder_is_applied_before_the_reward(toy):
    sampler = toy_sampler(toy, "ddim", 4)
    x = toy[2].detach()
    negated = sdo.freedom_sample(sampler, x, brightness, decoder=lambda z: -z)
    direct = sdo.freedom_sample(sampler, x, brightness)
    torch.testing.assert_close(negated.rewards, -brightness(negated.sample))
    assert (brightness(negated.sample) < brightness(direct.sample)).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"window": (0, 7)}, "window"),
        ({"window": (3, 3)}, "window"),
        ({"window": (0, 4), "start_step": 1}, "window"),
        ({"window": (0, 4), "travel": (3, 5)}, "travel"),
        ({"repeats": 0}, "repeats"),
        ({"scale": -1.0}, "scale"),
    ],
)
def test_bad_arguments(toy, kwargs, match):
    sampler = toy_sampler(toy, "ddim")
    with pytest.raises(sdo.ConfigError, match=match):
        sdo.freedom_sample(sampler, toy[2].detach(), brightness, **kwargs)


def test_scheduler_without_x0_prediction(toy):
    model, cond, x = toy
    sampler = sdo.Sampler(lambda v, t: model(v, t, cond), DPMSolverMultistepScheduler(), 4)
    with pytest.raises(sdo.ConfigError, match="predicts x0"):
        sdo.freedom_sample(sampler, x.detach(), brightness)


def test_a_guidance_run_is_one_pass_and_says_so(toy):
    from sdo.freedom import GuidanceStepper
    from sdo.latent import LatentProblem
    from sdo.methods import METHODS

    problem = LatentProblem(toy_sampler(toy, "ddim", 3), toy[2].detach(), brightness, seed=0)
    runner = METHODS["freedom"].runner
    assert runner.one_pass and runner.iterations(20) == GuidanceStepper.iterations == 1
    assert not any(method.runner.one_pass for name, method in METHODS.items() if name != "freedom")
    with pytest.raises(sdo.ConfigError, match=r"one guided sampling pass: `iters` must be 1, got 5"):
        GuidanceStepper(problem).run(5)  # not silently ignored
    result = METHODS["freedom"].optimize(problem, iters=20, progress=False)  # the registry asks the runner: 1
    start, guided = result.history
    assert (start["iter"], guided["iter"]) == (0, 1) and start["seconds"] > 0 and guided["seconds"] == 0
    assert start["elapsed"] == guided["elapsed"] == start["seconds"]  # the pass's cost, recorded once
    alone = GuidanceStepper(problem).iterate()  # one pass on its own (sdo bench): the guided sample's record
    assert alone["rewards"] == guided["rewards"] and alone["iter"] == 0
