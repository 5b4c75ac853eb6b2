"""Every gradient mode x every scheduler against an independent plain loop written here.

The reference below is the definition in docs/design.md, spelled out step by step: for each step it either runs
everything under no_grad, detaches only the network output (shortcut), or keeps everything.
"""

from __future__ import annotations

import pytest
import torch

import sdo

N_STEPS = 6


def reference_roles(mode, start: int, stop: int) -> list[str]:
    """The docs/design.md table, written independently of sdo.gradients."""
    n = stop - start
    if isinstance(mode, (sdo.Full, sdo.Checkpointed)):
        return ["full"] * n
    if isinstance(mode, sdo.NoGrad):
        return ["nograd"] * n
    if isinstance(mode, sdo.Truncated):
        return ["nograd"] * (n - mode.k) + ["full"] * mode.k
    if isinstance(mode, sdo.Shortcut):
        kept = {"first": start, "last": stop - mode.k}.get(mode.step, mode.step)
        return ["full" if kept <= i < kept + mode.k else "shortcut" for i in range(start, stop)]
    raise AssertionError(mode)


def reference_sample(model_fn, scheduler, eta, x, roles, start, generator):
    """A plain diffusers loop: fresh scheduler, scale_model_input, step; detaching as `roles` says."""
    scheduler = type(scheduler).from_config(scheduler.config)
    scheduler.set_timesteps(N_STEPS)
    extra = {"eta": eta} if isinstance(scheduler, sdo.schedulers.DDIMScheduler) else {}
    if sdo.schedulers.is_stochastic(scheduler, eta):
        extra["generator"] = generator
    for i, role in zip(range(start, N_STEPS), roles, strict=True):
        t = scheduler.timesteps[i]
        with torch.set_grad_enabled(role != "nograd"):
            with torch.set_grad_enabled(role == "full"):
                scaled = scheduler.scale_model_input(x, t) if hasattr(type(scheduler), "scale_model_input") else x
                out = model_fn(scaled, t)
            x = scheduler.step(out, t, x, **extra).prev_sample
    return x


MODES = [
    sdo.Full(),
    sdo.Checkpointed(),
    sdo.NoGrad(),
    sdo.Truncated(1),
    sdo.Truncated(3),
    sdo.Truncated(3, checkpoint=True),  # the graphed steps recomputed in backward: the same numbers
    sdo.Shortcut(),
    sdo.Shortcut(step="last"),
    sdo.Shortcut(step=3),
    sdo.Shortcut(step=2, k=2),
    sdo.Shortcut(step=3, k=2, checkpoint=True),
]


def grads(output, inputs):
    weights = torch.linspace(-1, 1, output.numel(), dtype=output.dtype).reshape(output.shape)
    if not output.requires_grad:
        return [None] * len(inputs)
    return torch.autograd.grad((output * weights).sum(), inputs, allow_unused=True)


def assert_same(actual, expected):
    for a, e in zip(actual, expected, strict=True):
        if e is None or a is None:
            assert a is None and e is None
        else:
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", MODES, ids=repr)
@pytest.mark.parametrize("start", [0, 2])
def test_mode_matches_reference_loop(scheduler_case, toy, mode, start):
    _, scheduler, eta = scheduler_case
    model, cond, x = toy
    if isinstance(mode, sdo.Shortcut) and isinstance(mode.step, int) and mode.step < start:
        pytest.skip("kept step before start_step is an error case, tested separately")

    def model_fn(x_in, t):
        return model(x_in, t, cond)

    inputs = [x, cond, *model.parameters()]
    sampler = sdo.Sampler(model_fn, scheduler, N_STEPS, eta=eta)
    out = sampler.sample(x, grad=mode, start_step=start, generator=torch.Generator().manual_seed(7))
    roles = reference_roles(mode, start, N_STEPS)
    expected = reference_sample(model_fn, scheduler, eta, x, roles, start, torch.Generator().manual_seed(7))

    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert out.requires_grad == expected.requires_grad
    assert_same(grads(out, inputs), grads(expected, inputs))


@pytest.mark.parametrize(
    "mode_factory",
    [
        lambda g: sdo.RandomTruncation(1, 4, generator=g),
        lambda g: sdo.RandomTruncation(1, 4, generator=g, checkpoint=True),  # compared with the unchecked Truncated
        lambda g: sdo.Shortcut(step="random", k=2, generator=g),
    ],
)
def test_random_modes_draw_once_per_trajectory(scheduler_case, toy, mode_factory):
    _, scheduler, eta = scheduler_case
    model, cond, x = toy

    def model_fn(x_in, t):
        return model(x_in, t, cond)

    sampler = sdo.Sampler(model_fn, scheduler, N_STEPS, eta=eta)
    mode = mode_factory(torch.Generator().manual_seed(3))
    draws = torch.Generator().manual_seed(3)
    for _ in range(3):  # three trajectories, each with its own draw from the mode's generator
        if isinstance(mode, sdo.RandomTruncation):
            expected_mode = sdo.Truncated(int(torch.randint(1, 5, (1,), generator=draws)))
        else:
            expected_mode = sdo.Shortcut(step=int(torch.randint(0, N_STEPS - 1, (1,), generator=draws)), k=2)
        out = sampler.sample(x, grad=mode, generator=torch.Generator().manual_seed(5))
        roles = reference_roles(expected_mode, 0, N_STEPS)
        expected = reference_sample(model_fn, scheduler, eta, x, roles, 0, torch.Generator().manual_seed(5))
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        assert_same(grads(out, [x, cond]), grads(expected, [x, cond]))


def test_same_trajectory_in_every_mode_and_call(scheduler_case, toy):
    _, scheduler, eta = scheduler_case
    model, cond, x = toy
    sampler = sdo.Sampler(lambda x_in, t: model(x_in, t, cond), scheduler, N_STEPS, eta=eta)
    outs = [sampler.sample(x, grad=mode, generator=torch.Generator().manual_seed(11)) for mode in MODES]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-12, atol=1e-12)


def test_stochastic_schedulers_depend_on_the_seed(scheduler_case, toy):
    name, scheduler, eta = scheduler_case
    model, cond, x = toy
    sampler = sdo.Sampler(lambda x_in, t: model(x_in, t, cond), scheduler, N_STEPS, eta=eta)
    a = sampler.sample(x, grad=sdo.NoGrad(), generator=torch.Generator().manual_seed(1))
    b = sampler.sample(x, grad=sdo.NoGrad(), generator=torch.Generator().manual_seed(2))
    assert (not torch.equal(a, b)) == (name in {"ddim-eta1", "ddpm", "sde-dpm++2"})


def test_sampler_never_mutates_the_callers_scheduler(scheduler_case, toy):
    _, scheduler, eta = scheduler_case
    model, cond, x = toy
    before = dict(vars(scheduler))
    sdo.Sampler(lambda x_in, t: model(x_in, t, cond), scheduler, N_STEPS, eta=eta).sample(x, grad=sdo.Full())
    assert vars(scheduler).keys() == before.keys()
    for key, value in before.items():
        assert vars(scheduler)[key] is value, key


@pytest.mark.parametrize("checkpoint", [True, False], ids=["checkpointed", "stored"])
def test_alignprop_draws_a_threshold_per_step_and_keeps_the_chain_on_the_linear_path(scheduler_case, toy, checkpoint):
    """The official AlignProp: u_i ~ Uniform{0..n} at each step i; the network output keeps its graph when i >= u_i,
    else it is detached while the solver update stays differentiable (a shortcut step)."""
    _, scheduler, eta = scheduler_case
    model, cond, x = toy

    def model_fn(x_in, t):
        return model(x_in, t, cond)

    sampler = sdo.Sampler(model_fn, scheduler, N_STEPS, eta=eta)
    mode = sdo.AlignProp(generator=torch.Generator().manual_seed(3), checkpoint=checkpoint)
    draws = torch.Generator().manual_seed(3)
    for start in (0, 2, 0):  # a fresh set of thresholds per trajectory
        n = N_STEPS - start
        thresholds = torch.randint(0, n + 1, (n,), generator=draws).tolist()
        roles = ["full" if i >= u else "shortcut" for i, u in enumerate(thresholds)]
        out = sampler.sample(x, grad=mode, start_step=start, generator=torch.Generator().manual_seed(5))
        expected = reference_sample(model_fn, scheduler, eta, x, roles, start, torch.Generator().manual_seed(5))
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        inputs = [x, cond, *model.parameters()]
        assert_same(grads(out, inputs), grads(expected, inputs))


def test_alignprop_graphs_step_i_with_probability_i_plus_1_over_n_plus_1():
    mode, n, trajectories = sdo.AlignProp(generator=torch.Generator().manual_seed(0)), 4, 4000
    graphed = torch.zeros(n)
    for _ in range(trajectories):
        graphed += torch.tensor([role is sdo.gradients.StepRole.CHECKPOINT for role in mode.roles(0, n)]).float()
    expected = torch.arange(1, n + 1) / (n + 1)  # 0.2, 0.4, 0.6, 0.8
    torch.testing.assert_close(graphed / trajectories, expected, atol=0.025, rtol=0)  # ~3 sd of a 4000-draw mean
