"""sdo.Adjoint (AdjointDPM) against Full: exact on a linear model, convergent in fixed_point_iters, flat memory."""

from __future__ import annotations

import itertools

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
from memory_meter import peak_saved_bytes
from tiny_pipelines import tiny_unet

DIM = 5


def linear_problem(n_steps: int = 8, scheduler=None):
    """model_fn(x, t) = x W^T + c: W (a parameter) and c (conditioning) both require grad."""
    generator = torch.Generator().manual_seed(0)
    weight = (0.2 * torch.randn(DIM, DIM, dtype=torch.float64, generator=generator)).requires_grad_()
    shift = (0.1 * torch.randn(DIM, dtype=torch.float64, generator=generator)).requires_grad_()
    x = torch.randn(3, DIM, dtype=torch.float64, generator=generator).requires_grad_()
    scheduler = scheduler or DDIMScheduler(clip_sample=False)
    sampler = sdo.Sampler(lambda v, t: v @ weight.T + shift, scheduler, n_steps)
    return sampler, x, [x, weight, shift]


def gradients(sampler, x, inputs, mode, **kwargs):
    out = sampler.sample(x, grad=mode, **kwargs)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    return out, torch.autograd.grad((out * weights).sum(), inputs)


def relative(actual, expected) -> float:
    return max(float((a - e).norm() / e.norm()) for a, e in zip(actual, expected, strict=True))


def test_linear_ddim_matches_full_to_1e8():
    sampler, x, inputs = linear_problem()
    out_full, full = gradients(sampler, x, inputs, sdo.Full())
    mode = sdo.Adjoint(fixed_point_iters=30)
    out, adjoint = gradients(sampler, x, inputs, mode)
    torch.testing.assert_close(out, out_full, rtol=1e-14, atol=1e-14)  # the forward pass is plain sampling
    assert relative(adjoint, full) < 1e-8  # latent, parameter and conditioning
    assert mode.stats.reconstruction_error < 1e-10
    assert mode.stats.steps == 8 and mode.stats.tensors == 2


def test_error_shrinks_with_fixed_point_iters():
    sampler, x, inputs = linear_problem()
    _, full = gradients(sampler, x, inputs, sdo.Full())
    errors, reconstruction = [], []
    for iters in (0, 1, 2, 4, 8):
        mode = sdo.Adjoint(fixed_point_iters=iters)
        _, adjoint = gradients(sampler, x, inputs, mode)
        errors.append(relative(adjoint, full))
        reconstruction.append(mode.stats.reconstruction_error)
    assert errors[0] > 1e-4  # without refinement the error is the DDIM-inversion reconstruction error...
    assert all(b < a for a, b in itertools.pairwise(errors))  # ...and it shrinks with every refinement
    assert all(b < a for a, b in itertools.pairwise(reconstruction))
    assert errors[-1] < 1e-3 * errors[0]


@pytest.mark.parametrize(
    "factory", [EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler], ids=["euler", "flowmatch"]
)
def test_euler_solvers_match_full(factory):
    sampler, x, inputs = linear_problem(scheduler=factory(num_train_timesteps=1000))
    x = (x * sampler.init_noise_sigma).detach().requires_grad_()
    inputs[0] = x
    _, full = gradients(sampler, x, inputs, sdo.Full())
    _, adjoint = gradients(sampler, x, inputs, sdo.Adjoint(fixed_point_iters=30))
    assert relative(adjoint, full) < 1e-5  # FlowMatch's step computes in float32


def test_toy_gradient_reaches_latent_parameters_and_conditioning(toy):
    model, cond, x = toy
    sampler = sdo.Sampler(lambda v, t: model(v, t, cond), DDIMScheduler(clip_sample=False), 6)
    inputs = [x, cond, *model.parameters()]
    _, full = gradients(sampler, x, inputs, sdo.Full(), start_step=1)
    mode = sdo.Adjoint(fixed_point_iters=40)
    _, adjoint = gradients(sampler, x, inputs, mode, start_step=1)
    assert mode.stats.tensors == len(inputs) - 1  # discovered: the conditioning leaf and the 4 parameters
    for a, e in zip(adjoint, full, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-8, atol=1e-10)


def test_explicit_params_reach_a_non_leaf_conditioning(toy):
    model, _, x = toy
    model.requires_grad_(False)
    raw = torch.tensor([[0.2, 0.5], [-0.1, 0.8]], dtype=torch.float64, requires_grad=True)
    results = []
    for make_mode in (lambda cond: sdo.Full(), lambda cond: sdo.Adjoint(fixed_point_iters=40, params=[cond])):
        cond = raw * 2  # a non-leaf conditioning tensor, whose own gradient is asked for
        sampler = sdo.Sampler(lambda v, t, c=cond: model(v, t, c), DDIMScheduler(clip_sample=False), 5)
        results.append(gradients(sampler, x, [x, cond, raw], make_mode(cond))[1])
    for a, e in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(a, e, rtol=1e-8, atol=1e-10)


def test_real_unet_cosine_with_full():
    unet = tiny_unet()
    denoiser = sdo.Denoiser(unet, class_labels=torch.tensor([3]))
    sampler = sdo.Sampler(denoiser, DDIMScheduler(clip_sample=False), 10)
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    inputs = [x, *unet.parameters()]
    _, full = gradients(sampler, x, inputs, sdo.Full())
    _, adjoint = gradients(sampler, x, inputs, sdo.Adjoint(fixed_point_iters=3))
    flat = torch.cat([g.flatten() for g in adjoint]), torch.cat([g.flatten() for g in full])
    assert torch.nn.functional.cosine_similarity(*flat, dim=0) > 0.999
    assert torch.nn.functional.cosine_similarity(adjoint[0].flatten(), full[0].flatten(), dim=0) > 0.999


@pytest.mark.parametrize("mode", [sdo.Adjoint(fixed_point_iters=1), sdo.Full()], ids=repr)
def test_saved_memory_is_flat_in_the_number_of_steps(toy, mode):
    model, cond, x = toy
    latent_bytes = x.numel() * x.element_size()

    def measure(n_steps):
        sampler = sdo.Sampler(lambda v, t: model(v, t, cond), DDIMScheduler(clip_sample=False), n_steps)
        return peak_saved_bytes(lambda: sampler.sample(x, grad=mode).square().sum().backward())

    small, large = measure(4), measure(16)
    if isinstance(mode, sdo.Full):
        assert large > 3 * small  # the meter sees a graph that grows with the steps
    else:
        assert small > 4 * latent_bytes  # one step's activations at a time...
        assert large - small <= latent_bytes  # ...whatever the number of steps


def test_no_grad_context_and_no_inputs_give_plain_sampling(toy):
    model, cond, x = toy
    sampler = sdo.Sampler(lambda v, t: model(v, t, cond.detach()), DDIMScheduler(clip_sample=False), 4)
    plain = sampler.sample(x, grad=sdo.NoGrad())
    with torch.no_grad():
        torch.testing.assert_close(sampler.sample(x, grad=sdo.Adjoint()), plain, rtol=0, atol=0)
    model.requires_grad_(False)
    out = sampler.sample(x.detach(), grad=sdo.Adjoint())
    assert not out.requires_grad
    torch.testing.assert_close(out, plain, rtol=0, atol=0)


@pytest.mark.parametrize("iters", [-1, 1.5, True, "2"])
def test_bad_fixed_point_iters(iters):
    with pytest.raises(sdo.ConfigError, match="fixed_point_iters"):
        sdo.Adjoint(fixed_point_iters=iters)


@pytest.mark.parametrize(
    ("scheduler", "eta", "match"),
    [
        (DDPMScheduler(clip_sample=False), 0.0, "deterministic solvers"),
        (DPMSolverMultistepScheduler(), 0.0, "deterministic solvers"),
        (DDIMScheduler(clip_sample=False), 1.0, "eta=0"),
        (DDIMScheduler(clip_sample=True), 0.0, "clip_sample=False"),
        (FlowMatchEulerDiscreteScheduler(stochastic_sampling=True), 0.0, "stochastic_sampling"),
    ],
    ids=["ddpm", "dpm", "ddim-eta1", "ddim-clip", "flow-stochastic"],
)
def test_unsupported_solvers(toy, scheduler, eta, match):
    model, cond, x = toy
    sampler = sdo.Sampler(lambda v, t: model(v, t, cond), scheduler, 4, eta=eta)
    with pytest.raises(sdo.ConfigError, match=match):
        sampler.sample(x, grad=sdo.Adjoint())


def test_bad_params():
    with pytest.raises(sdo.ConfigError, match="params"):
        sdo.Adjoint(params=[1.0])


def test_adjoint_and_invertible_share_one_reverse_walk():
    from sdo._autograd import ReverseWalkMode

    assert issubclass(sdo.Adjoint, ReverseWalkMode) and issubclass(sdo.Invertible, ReverseWalkMode)
    for make in (sdo.Adjoint, sdo.Invertible):
        with pytest.raises(sdo.ConfigError, match="params"):
            make(params=[torch.zeros(1), "w"])
        weight = torch.zeros(2, requires_grad=True)
        assert make(params=[weight]).params == (weight,)  # a sequence, kept as a tuple
    assert sdo.Adjoint().stats is not sdo.Adjoint().stats  # every instance records its own walk


SOLVERS = {
    "ddim-eps": lambda: DDIMScheduler(clip_sample=False),
    "ddim-v": lambda: DDIMScheduler(clip_sample=False, prediction_type="v_prediction"),
    "euler": lambda: EulerDiscreteScheduler(num_train_timesteps=1000),
    "flowmatch": lambda: FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000),
}


def scaled(sampler, x):
    """The start latent at the scheduler's noise scale (Euler starts at sigma_max), as a new leaf."""
    return (x * sampler.init_noise_sigma).detach().requires_grad_()


@pytest.mark.parametrize("solver", SOLVERS)
def test_checkpoint_every_step_is_full_on_the_toy(toy, solver):
    model, cond, x = toy
    sampler = sdo.Sampler(lambda v, t: model(v, t, cond), SOLVERS[solver](), 6)
    x = scaled(sampler, x)
    inputs = [x, cond, *model.parameters()]
    _, full = gradients(sampler, x, inputs, sdo.Full(), start_step=1)
    mode = sdo.Adjoint(checkpoint_every=1)
    _, adjoint = gradients(sampler, x, inputs, mode, start_step=1)
    for a, e in zip(adjoint, full, strict=True):  # nothing rebuilt: the VJPs of Full, at the same states
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-14)
    assert mode.stats.reconstruction_error == 0 and mode.stats.segment_errors == ()
    assert mode.stats.stored_states == 6 and mode.stats.max_residual == 0
    assert mode.stats.network_calls == 2 * 5 - 1  # a forward and a VJP call per step (the first forward's: the probe)


@pytest.mark.parametrize("solver", SOLVERS)
def test_checkpoint_every_step_is_full_on_a_unet(solver):
    unet, scheduler = tiny_unet(), SOLVERS[solver]()
    kind = sdo.schedulers.prediction_type(scheduler)
    sampler = sdo.Sampler(sdo.Denoiser(unet, class_labels=torch.tensor([3]), prediction_type=kind), scheduler, 4)
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = scaled(sampler, x)
    inputs = [x, *unet.parameters()]
    _, full = gradients(sampler, x, inputs, sdo.Full())
    _, adjoint = gradients(sampler, x, inputs, sdo.Adjoint(checkpoint_every=1))
    for a, e in zip(adjoint, full, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("solver", SOLVERS)
def test_checkpoint_every_n_steps_keeps_the_plain_walk(solver):
    """k = n stores what the plain walk keeps (input and output) and rebuilds the same states; it differs only in
    running the first step's VJP at the stored start latent instead of the rebuilt one, which can only help."""
    sampler, x, inputs = linear_problem(10, SOLVERS[solver]())
    x = inputs[0] = scaled(sampler, x)
    _, full = gradients(sampler, x, inputs, sdo.Full())
    plain, every_n = sdo.Adjoint(), sdo.Adjoint(checkpoint_every=10)
    _, plain_grads = gradients(sampler, x, inputs, plain)
    _, n_grads = gradients(sampler, x, inputs, every_n)
    assert every_n.stats.stored_states == plain.stats.stored_states == 2
    assert every_n.stats.segment_errors == plain.stats.segment_errors  # the same reconstruction, bit for bit
    assert every_n.stats.reconstruction_error == plain.stats.reconstruction_error > 1e-3
    assert every_n.stats.network_calls == plain.stats.network_calls
    # the model is linear, so the step Jacobians do not depend on the state: the latent gradients agree exactly
    torch.testing.assert_close(n_grads[0], plain_grads[0], rtol=1e-12, atol=1e-14)
    assert relative(n_grads, full) <= relative(plain_grads, full)


@pytest.mark.parametrize("solver", SOLVERS)
def test_intermediate_checkpoints_bound_the_drift(solver):
    sampler, x, inputs = linear_problem(10, SOLVERS[solver]())
    x = inputs[0] = scaled(sampler, x)
    _, full = gradients(sampler, x, inputs, sdo.Full())
    plain, every_3 = sdo.Adjoint(), sdo.Adjoint(checkpoint_every=3)  # 3 does not divide 10: segments 3, 3, 3, 1
    _, plain_grads = gradients(sampler, x, inputs, plain)
    _, grads = gradients(sampler, x, inputs, every_3)
    assert plain.stats.reconstruction_error > 1e-2  # the plain walk drifts...
    assert every_3.stats.reconstruction_error < plain.stats.reconstruction_error  # ...less within 3 steps
    assert relative(grads, full) < 0.5 * relative(plain_grads, full)
    assert every_3.stats.stored_states == 5  # x_0, x_3, x_6, x_9 and the final latent
    assert len(every_3.stats.segment_errors) == 3  # the last segment (one step) rebuilds nothing
    assert every_3.stats.reconstruction_error == max(every_3.stats.segment_errors)
    assert every_3.stats.network_calls <= plain.stats.network_calls


def test_stored_states_cost_one_latent_each(toy):
    model, cond, x = toy
    latent_bytes = x.numel() * x.element_size()

    def measure(n_steps):
        sampler = sdo.Sampler(lambda v, t: model(v, t, cond), DDIMScheduler(clip_sample=False), n_steps)
        mode = sdo.Adjoint(checkpoint_every=4)
        return peak_saved_bytes(lambda: sampler.sample(x, grad=mode).square().sum().backward())

    assert measure(16) - measure(4) <= 3 * latent_bytes  # 4 stored latents more (one of them the saved input)


def test_backward_twice_with_stored_states(toy):
    model, cond, x = toy
    sampler = sdo.Sampler(lambda v, t: model(v, t, cond), DDIMScheduler(clip_sample=False), 5)
    out = sampler.sample(x, grad=sdo.Adjoint(checkpoint_every=2)).square().sum()
    first = torch.autograd.grad(out, x, retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(out, x)[0], first, rtol=0, atol=0)


@pytest.mark.parametrize("every", [0, -2, 1.5, True, "3"])
def test_bad_checkpoint_every(every):
    with pytest.raises(sdo.ConfigError, match="checkpoint_every"):
        sdo.Adjoint(checkpoint_every=every)
