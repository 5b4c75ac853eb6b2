"""EDICTSampler: exact inversion, Invertible == Full, an independent EDICT loop, flat memory, DOODL, bad input."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

import sdo
from memory_meter import peak_saved_bytes
from sdo.doodl import PairObjective, doodl_adam_stepper, doodl_stepper
from sdo.latent import AdamUpdate, LatentProblem
from sdo.methods import METHODS, MethodOptions
from tiny_pipelines import tiny_unet


def toy_edict(toy, n_steps=6, mix=0.93):
    model, cond, _ = toy
    return sdo.EDICTSampler(lambda v, t: model(v, t, cond), DDIMScheduler(clip_sample=False), n_steps, mix=mix)


def reference_edict(model_fn, n_steps, mix, x, start=0):
    """EDICT written from the paper (Eqs. 10-13) with the authors' alternating order, on a plain diffusers DDIM; the
    parity counts from ``start`` (both official codes enumerate ``timesteps[start:]``)."""
    scheduler = DDIMScheduler(clip_sample=False)
    scheduler.set_timesteps(n_steps)
    a_, y_ = x, x
    for i, t in enumerate(scheduler.timesteps[start:]):
        first, second = (a_, y_) if i % 2 == 0 else (y_, a_)
        first = scheduler.step(model_fn(second, t), t, first).prev_sample
        second = scheduler.step(model_fn(first, t), t, second).prev_sample
        a_, y_ = (first, second) if i % 2 == 0 else (second, first)
        a_ = mix * a_ + (1 - mix) * y_
        y_ = (1 - mix) * a_ + mix * y_
    return a_, y_


def test_full_matches_an_independent_edict_loop(toy):
    model, cond, x = toy
    sampler = toy_edict(toy)
    expected = reference_edict(lambda v, t: model(v, t, cond), 6, 0.93, x)
    for actual, wanted in zip(sampler.sample_pair(x, grad=sdo.Full()), expected, strict=True):
        torch.testing.assert_close(actual, wanted, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(sampler.sample(x, grad=sdo.NoGrad()), expected[0], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("start", [1, 3])
def test_sampling_from_an_odd_step_counts_the_parity_from_it(toy, start):
    model, cond, x = toy
    sampler = toy_edict(toy)
    expected = reference_edict(lambda v, t: model(v, t, cond), 6, 0.93, x, start)
    for actual, wanted in zip(sampler.sample_pair(x, grad=sdo.NoGrad(), start_step=start), expected, strict=True):
        torch.testing.assert_close(actual, wanted, rtol=1e-13, atol=1e-13)
    x_back, y_back = sampler.invert(*expected, step=start)  # exactly invertible from the odd start
    torch.testing.assert_close(x_back, x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y_back, x, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("start", [0, 3])
def test_invert_recovers_the_latent_in_float64(start):
    unet = tiny_unet()
    denoiser = sdo.Denoiser(unet, class_labels=torch.tensor([3, 7]), null_class_label=10, guidance_scale=2.0)
    sampler = sdo.EDICTSampler(denoiser, DDIMScheduler(clip_sample=False), 8)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    pair = sampler.sample_pair(x, grad=sdo.NoGrad(), start_step=start)
    assert not torch.allclose(pair[0], x)
    x_back, y_back = sampler.invert(*pair, step=start)
    torch.testing.assert_close(x_back, x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y_back, x, rtol=1e-12, atol=1e-12)


def test_invertible_equals_full_for_latent_parameters_and_conditioning(toy):
    model, cond, x = toy
    sampler = toy_edict(toy)
    inputs = [x, cond, *model.parameters()]
    results = []
    for mode in (sdo.Full(), sdo.Invertible()):
        x_out, y_out = sampler.sample_pair(x, grad=mode, start_step=1)
        weights = torch.linspace(-1, 1, x.numel(), dtype=x.dtype).reshape(x.shape)
        results.append(torch.autograd.grad((x_out * weights).sum() + y_out.square().sum(), inputs))
    for invertible, full in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(invertible, full, rtol=1e-8, atol=1e-10)
    only_x = sampler.sample(x, grad=sdo.Invertible())  # the y output unused: its gradient counts as zero
    (grad_x,) = torch.autograd.grad(only_x.sum(), [x])
    (expected,) = torch.autograd.grad(sampler.sample(x, grad=sdo.Full()).sum(), [x])
    torch.testing.assert_close(grad_x, expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("start", [0, 1])
def test_invertible_equals_full_from_a_distinct_pair_and_records_its_walk(toy, start):
    model, cond, x = toy
    sampler = toy_edict(toy)
    y = (0.5 * x + 0.25).detach().requires_grad_()  # the pair's second latent, different from x
    inputs = [x, y, cond, *model.parameters()]
    mode = sdo.Invertible()
    results = []
    for grad in (sdo.Full(), mode):
        x_out, y_out = sampler.sample_pair(x, y, grad=grad, start_step=start)
        results.append(torch.autograd.grad(x_out.sin().sum() + 2 * y_out.sum(), inputs))
    for invertible, full in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(invertible, full, rtol=1e-8, atol=1e-10)
    n = 6 - start
    assert mode.stats.steps == n and mode.stats.tensors == len(inputs) - 2
    assert mode.stats.reconstruction_error < 1e-10 and mode.stats.max_residual < 1e-10
    assert mode.stats.network_calls == 6 * n - 1  # forward reuses the probe's call; 2 inversions, 2 recomputed


def test_default_mode_is_a_fresh_invertible_per_call(toy):
    sampler = toy_edict(toy, 4)
    x = toy[2]
    (grad_default,) = torch.autograd.grad(sampler.sample(x).square().sum(), [x])
    (grad_full,) = torch.autograd.grad(sampler.sample(x, grad=sdo.Full()).square().sum(), [x])
    torch.testing.assert_close(grad_default, grad_full, rtol=1e-8, atol=1e-10)
    assert sdo.EDICTSampler.sample.__defaults__[0] is None  # no shared mode (and no shared stats) as a default


@pytest.mark.parametrize("mode", [sdo.Invertible(), sdo.Full()], ids=repr)
def test_saved_memory_is_flat_for_invertible(toy, mode):
    x = toy[2]
    latent_bytes = x.numel() * x.element_size()

    def measure(n_steps):
        sampler = toy_edict(toy, n_steps)
        return peak_saved_bytes(lambda: sampler.sample(x, grad=mode).square().sum().backward())

    small, large = measure(4), measure(16)
    if isinstance(mode, sdo.Full):
        assert large > 3 * small
    else:
        assert small > 4 * latent_bytes
        assert large - small <= 2 * latent_bytes


def test_doodl_raises_the_reward_with_a_consistent_history(toy):
    sampler = toy_edict(toy, 4)
    _, _, x = toy
    target = torch.full_like(x[0], 0.5)

    def reward(x0, cond):
        return -(x0 - target).square().flatten(1).mean(dim=1)

    result = sdo.optimize_latent_doodl(sampler, x, reward, iters=6, lr=10.0, clip=0.05, measure=True, progress=False)
    assert isinstance(result, sdo.OptimizationResult)
    assert [r["iter"] for r in result.history] == list(range(7))
    assert set(result.history[0]) >= {"iter", "reward", "rewards", "loss", "seconds", "elapsed", "peak_mem_bytes"}
    assert "peak_mem_bytes" not in result.history[-1]  # the final evaluation is not an iteration
    assert result.history[-1]["reward"] > result.history[0]["reward"]
    torch.testing.assert_close(result.latent.flatten(1).norm(dim=1), x.detach().flatten(1).norm(dim=1))
    again = sdo.optimize_latent_doodl(sampler, x, reward, iters=6, lr=10.0, clip=0.05, progress=False)
    torch.testing.assert_close(again.latent, result.latent, rtol=0, atol=0)  # seeded perturbation
    assert not any("peak_mem_bytes" in r for r in again.history)  # measuring is opt-in, as in optimize_latent


def test_doodl_adam_has_doodls_first_gradient_and_raises_the_reward(toy):
    sampler = toy_edict(toy, 4)
    x = toy[2].detach()
    target = torch.full_like(x[0], 0.5)

    def reward(x0, cond):
        return -(x0 - target).square().flatten(1).mean(dim=1)

    problem = LatentProblem(sampler, x, reward, seed=1)
    doodl, adam = doodl_stepper(problem), METHODS["doodl-adam"].stepper(problem, MethodOptions(lr=0.05))
    first = [doodl.step(), adam.step()]
    assert isinstance(adam.update, AdamUpdate) and isinstance(adam.objective, PairObjective)
    torch.testing.assert_close(adam.gradient, doodl.gradient, rtol=1e-12, atol=1e-14)
    assert first[0]["rewards"] == first[1]["rewards"]
    result = METHODS["doodl-adam"].optimize(problem, MethodOptions(lr=0.05), iters=8, progress=False)
    assert result.history[-1]["reward"] > result.history[0]["reward"]
    torch.testing.assert_close(result.latent.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1))  # on the shell
    with pytest.raises(sdo.ConfigError, match="EDICTSampler"):
        doodl_adam_stepper(replace(problem, sampler=sampler.sampler))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda f: sdo.EDICTSampler(f, DDPMScheduler(), 4), "DDIMScheduler"),
        (lambda f: sdo.EDICTSampler(f, DDIMScheduler(clip_sample=True), 4), "clip_sample"),
        (lambda f: sdo.EDICTSampler(f, DDIMScheduler(clip_sample=False), 4, mix=0.0), "mix"),
        (lambda f: sdo.EDICTSampler(f, DDIMScheduler(clip_sample=False), 4, mix=1.5), "mix"),
        (lambda f: sdo.EDICTSampler(f, DDIMScheduler(clip_sample=False), 4, mix=True), "mix"),
        (lambda f: sdo.EDICTSampler(f, DDIMScheduler(clip_sample=False), 0), "num_inference_steps"),
    ],
)
def test_bad_edict_input(toy, make, match):
    model, cond, _ = toy
    with pytest.raises(sdo.ConfigError, match=match):
        make(lambda v, t: model(v, t, cond))


def test_bad_modes_and_arguments(toy):
    model, cond, x = toy
    sampler = toy_edict(toy, 4)
    with pytest.raises(sdo.ConfigError, match="Invertible"):
        sampler.sample(x, grad=sdo.Shortcut())
    plain = sdo.Sampler(lambda v, t: model(v, t, cond), DDIMScheduler(clip_sample=False), 4)
    with pytest.raises(sdo.ConfigError, match="EDICTSampler"):
        plain.sample(x, grad=sdo.Invertible())
    with pytest.raises(sdo.ConfigError, match="step"):
        sampler.invert(x, step=4)
    reward = lambda x0, c: x0.flatten(1).mean(dim=1)  # noqa: E731
    for kwargs, match in [({"iters": -1}, "iters"), ({"momentum": 1.0}, "momentum"), ({"clip": 0.0}, "clip")]:
        with pytest.raises(sdo.ConfigError, match=match):
            sdo.optimize_latent_doodl(sampler, x, reward, progress=False, **kwargs)
    with pytest.raises(sdo.ConfigError, match="EDICTSampler"):
        sdo.optimize_latent_doodl(plain, x, reward, progress=False)


def test_sampler_and_edict_sampler_satisfy_the_one_sampler_protocol(toy):
    import typing

    from sdo.protocols import LatentSampler

    edict = toy_edict(toy, 4)
    x = toy[2].detach()
    assert typing.get_type_hints(LatentProblem)["sampler"] is LatentSampler
    for sampler in (edict.sampler, edict):
        assert isinstance(sampler, LatentSampler), type(sampler).__name__
        assert sampler.sample(x, sdo.NoGrad(), start_step=1).shape == x.shape  # the call the objectives make
        assert sampler.network is edict.sampler.network and sampler.num_inference_steps == 4
    assert not isinstance(lambda x: x, LatentSampler)


def test_doodl_renormalize_is_the_old_name_of_project_to_shell(toy):
    sampler = toy_edict(toy, 4)
    x = toy[2].detach()

    def reward(x0, cond):
        return x0.flatten(1).mean(dim=1)

    def run(**kwargs):
        return sdo.optimize_latent_doodl(sampler, x, reward, iters=1, lr=10.0, clip=0.05, progress=False, **kwargs)

    new, old, default = run(project_to_shell=False), run(renormalize=False), run()
    torch.testing.assert_close(old.latent, new.latent, rtol=0, atol=0)
    norms = x.flatten(1).norm(dim=1)
    torch.testing.assert_close(default.latent.flatten(1).norm(dim=1), norms)  # projected by default
    assert not torch.allclose(new.latent.flatten(1).norm(dim=1), norms)
