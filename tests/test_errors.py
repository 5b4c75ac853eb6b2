"""Bad input gets a ValueError that names the argument and the allowed values; nothing is clamped."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

import sdo


@pytest.fixture
def sampler():
    return sdo.Sampler(lambda x, t: 0.1 * x, DDIMScheduler(clip_sample=False), 6)


X = torch.zeros(1, 2)


@pytest.mark.parametrize(
    ("mode", "start", "match"),
    [
        (sdo.Shortcut(step=6), 0, r"`step` must be an index in \[0, 5\]"),
        (sdo.Shortcut(step=1), 3, r"`step` must be an index in \[3, 5\]"),
        (sdo.Shortcut(step=5, k=2), 0, r"`step` must be an index in \[0, 4\]"),
        (sdo.Shortcut(k=7), 0, r"`k`=7 is larger than the 6 remaining steps.*\[1, 6\]"),
        (sdo.Shortcut(k=4), 3, r"`k`=4 is larger than the 3 remaining steps"),
        (sdo.Truncated(7), 0, r"`k`=7 is larger than the 6 remaining steps"),
        (sdo.RandomTruncation(2, 9), 0, r"`high`=9 is larger than the 6 remaining steps"),
    ],
)
def test_mode_does_not_fit_the_schedule(sampler, mode, start, match):
    with pytest.raises(ValueError, match=match):
        sampler.sample(X, grad=mode, start_step=start)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: sdo.RandomTruncation(3, 2), r"`low` must be <= `high`, got low=3, high=2"),
        (lambda: sdo.RandomTruncation(0, 2), r"`low` must be an integer >= 1"),
        (lambda: sdo.Truncated(0), r"`k` must be an integer >= 1"),
        (lambda: sdo.Shortcut(k=0), r"`k` must be an integer >= 1"),
        (lambda: sdo.Shortcut(step="middle"), r"`step` must be one of \('first', 'last', 'random'\)"),
        (lambda: sdo.Shortcut(step=-1), r"`step` must be a non-negative"),
    ],
)
def test_invalid_mode_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize(("start", "stop"), [(6, None), (-1, None), (7, None), (2, 2), (0, 7)])
def test_step_range(sampler, start, stop):
    with pytest.raises(ValueError, match=r"`st(art|op)_step` must be an integer in \["):
        sampler.sample(X, grad=sdo.NoGrad(), start_step=start, stop_step=stop)


def test_unsupported_scheduler_class_lists_the_supported_ones():
    with pytest.raises(ValueError, match=r"`scheduler` must be one of DDIMScheduler, .*, FlowMatchEuler"):
        sdo.Sampler(lambda x, t: x, PNDMScheduler(), 10)


def test_unsupported_dpm_algorithm():
    scheduler = DPMSolverMultistepScheduler(algorithm_type="dpmsolver", final_sigmas_type="sigma_min")
    with pytest.raises(ValueError, match=r"algorithm_type` must be one of \('dpmsolver\+\+', 'sde-dpmsolver\+\+'\)"):
        sdo.Sampler(lambda x, t: x, scheduler, 10)


def test_unknown_prediction_types():
    with pytest.raises(ValueError, match=r"`scheduler.config.prediction_type` must be one of .*got 'x0'"):
        sdo.Sampler(lambda x, t: x, DDIMScheduler(prediction_type="x0"), 10)
    with pytest.raises(ValueError, match=r"`prediction_type` must be one of .*got 'noise'"):
        sdo.Denoiser(torch.nn.Identity(), prediction_type="noise")


def test_adapter_and_scheduler_prediction_types_must_agree():
    denoiser = sdo.Denoiser(torch.nn.Identity(), prediction_type="v_prediction")
    with pytest.raises(ValueError, match=r"predicts 'v_prediction' but DDIMScheduler expects 'epsilon'"):
        sdo.Sampler(denoiser, DDIMScheduler(), 10)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, 1001])
def test_number_of_steps(bad):
    """At least one step, and no more than the schedule's training timesteps (1000 here)."""
    with pytest.raises(sdo.ConfigError, match=r"`num_inference_steps` must be an integer in \[1, 1000\]"):
        sdo.Sampler(lambda x, t: x, DDIMScheduler(), bad)


def test_eta_only_for_ddim():
    from diffusers import DDPMScheduler

    with pytest.raises(ValueError, match="`eta` must be >= 0, and non-zero only with DDIMScheduler"):
        sdo.Sampler(lambda x, t: x, DDPMScheduler(), 10, eta=0.5)


def test_grad_must_be_a_mode(sampler):
    with pytest.raises(ValueError, match="`grad` must be a gradient mode"):
        sampler.sample(X, grad="shortcut")
