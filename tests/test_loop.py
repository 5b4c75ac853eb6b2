"""The one latent-optimization loop, the registry's runners, Sampler.with_options, and library inputs checked at
the call (issue 17 items 1, 5, 7; issue 19 items 6, 8)."""

from __future__ import annotations

import warnings

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

import sdo
from sdo import zoo
from sdo.checks import check_schedule_start
from sdo.doodl import DoodlUpdate, edict_sampler
from sdo.freedom import GuidanceStepper
from sdo.gradients import SpreadShortcut, StepRole
from sdo.latent import LatentProblem, LatentStepper
from sdo.methods import METHODS, MethodOptions
from sdo.rewards import ClassifierReward


@pytest.fixture(scope="module")
def unet():
    return zoo.load_unet()


@pytest.fixture(scope="module")
def reward():
    return ClassifierReward(zoo.load_reward_classifier(), 8)


def test_spread_shortcut_says_when_it_keeps_every_step():
    mode = SpreadShortcut()
    with pytest.warns(UserWarning, match=r"keeps every one of the 4 steps run: this run is Full\(\)"):
        assert mode.roles(0, 4) == sdo.Full().roles(0, 4)
    assert mode.covers_every_step(0, 4) and mode.covers_every_step(3, 5) and not mode.covers_every_step(0, 5)
    with pytest.warns(UserWarning, match=r"this run is Checkpointed\(\)"):
        assert SpreadShortcut(checkpoint=True).roles(0, 2) == sdo.Checkpointed().roles(0, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a real shortcut run stays silent
        roles = mode.roles(0, 9)
    assert [i for i, role in enumerate(roles) if role is StepRole.FULL] == [0, 2, 4, 6]
    assert METHODS["sdo-multi"].mode() == SpreadShortcut()
    with pytest.raises(sdo.ConfigError, match="count"):
        SpreadShortcut(count=0)


def test_every_entry_carries_its_runner(unet, reward):
    sampler = zoo.ddim_sampler(unet, torch.tensor([3]), 4)
    problem = LatentProblem(sampler, zoo.noise(1, 2), reward, seed=2)
    kinds = {name: method.runner.kind for name, method in METHODS.items()}
    assert kinds["doodl"] == kinds["doodl-adam"] == "doodl" and kinds["freedom"] == "guidance"
    assert {kind for name, kind in kinds.items() if name not in ("doodl", "doodl-adam", "freedom")} == {"mode"}
    doodl = METHODS["doodl"].stepper(problem)
    assert isinstance(doodl, LatentStepper) and isinstance(doodl.update, DoodlUpdate)
    assert isinstance(doodl.objective.sampler, sdo.EDICTSampler)  # built from the plain sampler, in one place
    assert isinstance(METHODS["freedom"].stepper(problem), GuidanceStepper)
    # the registry's run of a gradient mode is optimize_latent's, bit for bit
    options = MethodOptions(lr=0.1, project_to_shell=True)
    via_registry = METHODS["sdo"].optimize(problem, options, iters=2, progress=False)
    direct = sdo.optimize_latent(
        sampler, problem.latent, reward, iters=2, lr=0.1, project_to_shell=True, seed=2, progress=False
    )
    assert torch.equal(via_registry.latent, direct.latent) and torch.equal(via_registry.sample, direct.sample)
    assert [r["rewards"] for r in via_registry.history] == [r["rewards"] for r in direct.history]


def test_freedom_through_the_registry_reports_unguided_then_guided(unet, reward):
    sampler = zoo.ddim_sampler(unet, torch.tensor([3, 3]), 4)
    problem = LatentProblem(sampler, zoo.noise(2, 1), reward, seed=1, measure=True)
    result = METHODS["freedom"].optimize(problem, MethodOptions(freedom_scale=0.5), progress=False)
    first, final = result.history
    with torch.no_grad():
        unguided = sampler.sample(problem.latent, sdo.NoGrad(), generator=torch.Generator().manual_seed(1))
        assert first["rewards"] == pytest.approx(reward(unguided).tolist(), abs=1e-5)
        assert final["rewards"] == pytest.approx(reward(result.sample).tolist(), abs=1e-5)
    assert final["reward"] > first["reward"]  # guidance towards 8s raises the reward
    assert first["seconds"] > 0 and first["peak_mem_bytes"] > 0 and final["seconds"] == 0


def test_with_options_keeps_every_setting():
    def model_fn(x, t):
        return x * 0.1

    ddim = sdo.Sampler(model_fn, DDIMScheduler(clip_sample=False), 5, eta=0.5, compile="reduce-overhead")
    sigmas = [1.0, 0.75, 0.5, 0.25]
    flow = sdo.Sampler(
        model_fn, FlowMatchEulerDiscreteScheduler(), 4, timestep_options={"sigmas": sigmas}, scale_noise=True
    )
    for sampler in (ddim, flow):
        copy = sampler.with_options()
        for name in ("model_fn", "num_inference_steps", "eta", "timestep_options", "scale_noise", "compile_options"):
            assert getattr(copy, name) == getattr(sampler, name), name
        assert copy.scheduler.config == sampler.scheduler.config and type(copy.scheduler) is type(sampler.scheduler)
        assert torch.equal(copy.timesteps, sampler.timesteps)
    compiled = flow.with_options(compile=True)
    assert compiled.compile_options is not None and compiled.timestep_options == {"sigmas": sigmas}
    assert compiled.scale_noise and compiled.num_inference_steps == 4
    fewer = ddim.with_options(num_inference_steps=3)
    assert (fewer.num_inference_steps, fewer.eta, fewer.compile_options) == (3, 0.5, ddim.compile_options)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    plain = flow.with_options()
    torch.testing.assert_close(plain.sample(x, sdo.NoGrad()), flow.sample(x, sdo.NoGrad()), rtol=0, atol=0)
    with pytest.raises(sdo.ConfigError, match="with_options"):
        ddim.with_options(steps=3)


def test_a_one_step_schedule_that_starts_clean_is_refused(unet):
    sampler = zoo.ddim_sampler(unet, torch.tensor([3]), 1)
    assert sampler.timesteps.tolist() == [0]  # leading spacing, no offset: the only step is t=0
    with pytest.raises(sdo.ConfigError, match=r"first timestep is 0, below half of the 1000 training timesteps"):
        sampler.sample(zoo.noise(1), sdo.NoGrad())
    with pytest.raises(sdo.ConfigError, match="first timestep"):
        sdo.freedom_sample(sampler, zoo.noise(1), lambda x, c: x.flatten(1).mean(1))
    with pytest.raises(sdo.ConfigError, match="first timestep"):
        edict_sampler(sdo.Sampler(sampler.model_fn, zoo.scheduler("ddim"), 1)).sample(zoo.noise(1))
    two = zoo.ddim_sampler(unet, torch.tensor([3]), 2)
    assert two.timesteps.tolist() == [500, 0]
    assert two.sample(zoo.noise(1), sdo.NoGrad()).shape == (1, 1, 32, 32)
    check_schedule_start(0.0, 1000, start_step=1)  # editing from a later step stays allowed
    check_schedule_start(500.0, 1000, start_step=0)


def test_optimize_cli_refuses_a_one_step_schedule(tmp_path, capsys):
    from sdo.app.cli import main

    assert main(["optimize", "--steps", "1", "--iters", "1", "--batch", "1", "--out", str(tmp_path / "out")]) == 2
    assert "first timestep is 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("make_reward", "match"),
    [
        (lambda: lambda x0, c: 1.5, r"must return a floating-point \[batch\] tensor of shape \(2,\), got float"),
        (lambda: lambda x0, c: x0.flatten(1).mean(1)[:1], r"shape \(2,\), got \(1,\)"),
        (lambda: lambda x0, c: (x0.flatten(1).mean(1) > 0).long(), r"got a tensor of torch.int64"),
    ],
)
def test_reward_output_is_checked_at_the_call(unet, make_reward, match):
    sampler = zoo.ddim_sampler(unet, torch.tensor([3, 3]), 3)
    with pytest.raises(sdo.ConfigError, match=match):
        sdo.optimize_latent(sampler, zoo.noise(2), make_reward(), iters=1, progress=False)
    with pytest.raises(sdo.ConfigError, match=match):
        sdo.optimize_latent_doodl(edict_sampler(sampler), zoo.noise(2), make_reward(), iters=1, progress=False)
    with pytest.raises(sdo.ConfigError, match=match):
        sdo.freedom_sample(sampler, zoo.noise(2), make_reward())


@pytest.mark.parametrize(
    ("latent", "match"),
    [
        (zoo.noise(1).double(), r"`latent` has dtype torch.float64, but the network runs in torch.float32"),
        (zoo.noise(1).half(), r"`latent` has dtype torch.float16"),
        (zoo.noise(1).bfloat16(), r"`latent` has dtype torch.bfloat16"),
        (torch.zeros(1, 1, 32, 32, dtype=torch.int64), r"`latent` must be a floating-point tensor, got a tensor"),
        (torch.randn(1, 1, 30, 30), r"`latent` has shape \(1, 1, 30, 30\), but the network takes \[batch, 1, H, W\]"),
        (torch.randn(1, 3, 32, 32), r"takes \[batch, 1, H, W\] latents with H and W multiples of 4"),
    ],
    ids=["float64", "float16", "bfloat16", "int64", "size", "channels"],
)
def test_latent_is_checked_against_the_network(unet, reward, latent, match):
    sampler = zoo.ddim_sampler(unet, torch.tensor([3]), 3)
    with pytest.raises(sdo.ConfigError, match=match):
        sdo.optimize_latent(sampler, latent, reward, iters=1, progress=False)
    with pytest.raises(sdo.ConfigError, match=match.replace("`latent`", "`x`")):
        sampler.sample(latent, sdo.NoGrad())


@pytest.mark.parametrize("betas", [(2.0, 0.9), (0.9, 1.0), (-0.1, 0.9), (0.9,), "ab"])
def test_adam_betas_are_checked(unet, reward, betas):
    sampler = zoo.ddim_sampler(unet, torch.tensor([3]), 3)
    with pytest.raises(sdo.ConfigError, match=r"`betas` must be a pair of numbers in \[0, 1\)"):
        sdo.optimize_latent(sampler, zoo.noise(1), reward, iters=1, betas=betas, progress=False)
