"""Shortcut(step=[i, j, ...]): closed form, a plain reference loop, validation; the registry's new entries."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

import sdo
from sdo.methods import METHODS, MethodOptions, gradient_mode
from test_exact import DIM, ddim_coefficients, jacobian, linear_sampler
from test_modes import N_STEPS, assert_same, grads, reference_sample


@pytest.mark.parametrize("kept", [(0, 2), (1, 3, 4), (0, 1, 2, 3, 4)])
def test_multi_step_jacobian_closed_form(kept):
    n_steps = 5
    weight = torch.randn(DIM, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.5
    a, b = ddim_coefficients(n_steps)
    identity = torch.eye(DIM, dtype=torch.float64)
    expected = identity
    for i in range(n_steps):  # kept steps: the full step Jacobian; shortcut steps: a_i I
        expected = (a[i] * identity + (b[i] * weight if i in kept else 0)) @ expected
    actual = jacobian(linear_sampler(weight, n_steps), sdo.Shortcut(step=list(kept)))
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scheduler", [DDIMScheduler(clip_sample=False), EulerDiscreteScheduler()], ids=type)
def test_multi_step_matches_a_plain_loop(toy, scheduler):
    model, cond, x = toy

    def model_fn(x_in, t):
        return model(x_in, t, cond)

    kept = (2, 4, 5)
    sampler = sdo.Sampler(model_fn, scheduler, N_STEPS)
    out = sampler.sample(x, grad=sdo.Shortcut(step=list(kept)), start_step=1)
    roles = ["full" if i in kept else "shortcut" for i in range(1, N_STEPS)]
    expected = reference_sample(model_fn, scheduler, 0.0, x, roles, 1, None)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    inputs = [x, cond, *model.parameters()]
    assert_same(grads(out, inputs), grads(expected, inputs))


def test_one_element_list_equals_the_integer_step():
    assert sdo.Shortcut(step=[3]).roles(0, 6) == sdo.Shortcut(step=3).roles(0, 6)
    assert sdo.Shortcut(step=[1, 4]) == sdo.Shortcut(step=(1, 4))  # stored as a tuple: hashable, comparable
    hash(sdo.Shortcut(step=[1, 4]))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"step": []}, "at least one"),
        ({"step": [3, 1]}, "strictly increasing"),
        ({"step": [1, 1]}, "strictly increasing"),
        ({"step": [-1, 2]}, ">= 0"),
        ({"step": [True, 2]}, ">= 0"),
        ({"step": [1, 2.0]}, ">= 0"),
        ({"step": [1, 2], "k": 2}, "k"),
    ],
)
def test_bad_step_lists(kwargs, match):
    with pytest.raises(sdo.ConfigError, match=match):
        sdo.Shortcut(**kwargs)


def test_step_list_outside_the_run():
    with pytest.raises(sdo.ConfigError, match=r"\[2, 5\]"):
        sdo.Shortcut(step=[1, 3]).roles(2, 6)


def test_registry_entries():
    assert gradient_mode("adjoint") == sdo.Adjoint(fixed_point_iters=2)
    assert gradient_mode("adjoint", MethodOptions(adjoint_iters=0)) == sdo.Adjoint()
    stored = gradient_mode("adjoint", MethodOptions(adjoint_checkpoint_every=3))
    assert stored == sdo.Adjoint(fixed_point_iters=2, checkpoint_every=3)
    from sdo.app.tasks.latent import LatentTaskConfig

    assert LatentTaskConfig().method_options().adjoint_checkpoint_every is None  # the flag's 0 is off
    assert LatentTaskConfig(adjoint_checkpoint_every=4).method_options().adjoint_checkpoint_every == 4
    spread = gradient_mode("sdo-multi").roles(10, 20)
    assert [i for i, role in enumerate(spread, start=10) if role is sdo.gradients.StepRole.FULL] == [10, 12, 15, 17]
    assert gradient_mode("sdo-multi", MethodOptions(kept_steps=(1, 5))).kept_steps(0, 8) == (1, 5)
    assert METHODS["doodl"].kind == "doodl" and METHODS["freedom"].kind == "guidance"
    for name, function in [("doodl", "optimize_latent_doodl"), ("freedom", "freedom_sample")]:
        with pytest.raises(sdo.ConfigError, match=function):
            gradient_mode(name)
