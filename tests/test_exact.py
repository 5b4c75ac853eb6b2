"""Exact answers: closed forms on a linear model, gradcheck, Checkpointed == Full on a real UNet, memory."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

import sdo
from tiny_pipelines import tiny_unet

DIM = 5


def ddim_coefficients(n_steps: int) -> tuple[list[float], list[float]]:
    """DDIM (eta 0) as x_{i+1} = a_i x_i + b_i eps, read off the scheduler's own (float32-rounded) schedule.

    ``a_i`` and ``b_i`` are probed with unit inputs, then checked against Song et al. 2021, Eq. 12:
    ``a = sqrt(ab_prev / ab)``, ``b = sqrt(1 - ab_prev) - a sqrt(1 - ab)``.
    """
    scheduler = DDIMScheduler(clip_sample=False)
    scheduler.set_timesteps(n_steps)
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    a, b = [], []
    for t in scheduler.timesteps:
        a.append(float(scheduler.step(zero, t, one).prev_sample))
        b.append(float(scheduler.step(one, t, zero).prev_sample))
        prev = int(t) - 1000 // n_steps
        ab = scheduler.alphas_cumprod.double()[t]
        ab_prev = scheduler.alphas_cumprod.double()[prev] if prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
        assert a[-1] == pytest.approx(float((ab_prev / ab).sqrt()), rel=1e-6)
        assert b[-1] == pytest.approx(float((1 - ab_prev).sqrt() - (ab_prev / ab).sqrt() * (1 - ab).sqrt()), rel=1e-5)
    return a, b


def linear_sampler(weight: torch.Tensor, n_steps: int) -> sdo.Sampler:
    return sdo.Sampler(lambda x, t: x @ weight.T, DDIMScheduler(clip_sample=False), n_steps)


def jacobian(sampler: sdo.Sampler, mode) -> torch.Tensor:
    x = torch.randn(1, DIM, dtype=torch.float64)
    return torch.autograd.functional.jacobian(lambda v: sampler.sample(v[None], grad=mode)[0], x[0])


@pytest.mark.parametrize("kept", [0, 2, 4])
def test_shortcut_jacobian_closed_form(kept):
    n_steps = 5
    weight = torch.randn(DIM, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.5
    a, b = ddim_coefficients(n_steps)
    identity = torch.eye(DIM, dtype=torch.float64)
    others = torch.tensor([a[i] for i in range(n_steps) if i != kept], dtype=torch.float64).prod()
    expected = others * (a[kept] * identity + b[kept] * weight)
    actual = jacobian(linear_sampler(weight, n_steps), sdo.Shortcut(step=kept))
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_full_jacobian_closed_form():
    n_steps = 5
    weight = torch.randn(DIM, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.5
    a, b = ddim_coefficients(n_steps)
    expected = torch.eye(DIM, dtype=torch.float64)
    for a_i, b_i in zip(a, b, strict=True):
        expected = (a_i * torch.eye(DIM, dtype=torch.float64) + b_i * weight) @ expected
    for mode in (sdo.Full(), sdo.Checkpointed()):
        torch.testing.assert_close(jacobian(linear_sampler(weight, n_steps), mode), expected, rtol=1e-12, atol=1e-12)


def test_full_gradcheck_float64(toy):
    model, cond, x = toy
    x = x[:1].detach().requires_grad_()
    cond = cond[:1].detach().requires_grad_()
    scheduler = DDIMScheduler(clip_sample=False)

    def run(x_in, cond_in):
        sampler = sdo.Sampler(lambda v, t: model(v, t, cond_in), scheduler, 3)
        return sampler.sample(x_in, grad=sdo.Full())

    assert torch.autograd.gradcheck(run, (x, cond), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "scheduler",
    [DDPMScheduler(clip_sample=False), DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")],
    ids=type,
)
def test_checkpointed_equals_full_on_a_real_unet(scheduler):
    unet = tiny_unet()
    labels = torch.tensor([3, 7])
    denoiser = sdo.Denoiser(unet, class_labels=labels, null_class_label=10, guidance_scale=2.0)
    sampler = sdo.Sampler(denoiser, scheduler, 4)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    inputs = [x, *unet.parameters()]
    results = []
    for mode in (sdo.Full(), sdo.Checkpointed()):
        out = sampler.sample(x, grad=mode, generator=torch.Generator().manual_seed(4))
        results.append((out, torch.autograd.grad(out.square().sum(), inputs)))
    (full_out, full_grads), (ckpt_out, ckpt_grads) = results
    torch.testing.assert_close(ckpt_out, full_out, rtol=0, atol=0)
    for g_ckpt, g_full in zip(ckpt_grads, full_grads, strict=True):
        torch.testing.assert_close(g_ckpt, g_full, rtol=1e-10, atol=1e-12)


def saved_bytes(run) -> int:
    """Bytes autograd saves for backward while `run()` executes (the activation memory of the graph)."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return total


@pytest.mark.parametrize("mode", [sdo.Shortcut(), sdo.Checkpointed(), sdo.Full()], ids=repr)
def test_saved_memory_versus_number_of_steps(toy, mode):
    model, cond, x = toy
    latent_bytes = x.numel() * x.element_size()

    def measure(n_steps):
        sampler = sdo.Sampler(lambda v, t: model(v, t, cond), DDIMScheduler(clip_sample=False), n_steps)
        return saved_bytes(lambda: sampler.sample(x, grad=mode))

    small, medium, large = measure(4), measure(8), measure(16)
    if isinstance(mode, sdo.Full):
        per_step = (medium - small) / 4
        assert per_step > 4 * latent_bytes  # activations of every step are kept...
        assert large - medium == pytest.approx(8 * per_step, rel=0.01)  # ...and memory grows linearly
    elif isinstance(mode, sdo.Shortcut):
        # One step's activations; only scalar schedule coefficients may accumulate, never a latent per step.
        assert small > 4 * latent_bytes
        assert large - small < latent_bytes
    else:
        # Checkpointed keeps each step's input latent for the recomputation, and no activations.
        assert large - small <= 12 * latent_bytes


@pytest.mark.parametrize("random_depth", [False, True], ids=["Truncated", "RandomTruncation"])
def test_checkpointed_truncation_saves_step_inputs_not_activations(toy, random_depth):
    """``Truncated(k, checkpoint=True)`` (and AlignProp's ``RandomTruncation(..., checkpoint=True)``) keep each
    graphed step's input latent for the recomputation, and no activations: memory does not grow with k as the
    unchecked mode's does (which keeps k steps' activations)."""
    model, cond, x = toy
    latent_bytes = x.numel() * x.element_size()
    sampler = sdo.Sampler(lambda v, t: model(v, t, cond), DDIMScheduler(clip_sample=False), 16)

    def measure(k: int, checkpoint: bool) -> int:
        mode = (
            sdo.RandomTruncation(k, k, generator=torch.Generator().manual_seed(0), checkpoint=checkpoint)
            if random_depth
            else sdo.Truncated(k, checkpoint=checkpoint)
        )
        return saved_bytes(lambda: sampler.sample(x, grad=mode))

    per_step = (measure(8, False) - measure(4, False)) / 4
    assert per_step > 4 * latent_bytes  # unchecked: every graphed step's activations are kept
    assert measure(8, True) - measure(4, True) <= 4 * 3 * latent_bytes  # checkpointed: a few latents per step
    assert measure(8, True) < measure(1, False)  # less than one unchecked step's activations
