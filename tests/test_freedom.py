"""freedom_sample: deterministic per seed, guidance raises the reward on every x0-predicting scheduler, errors."""

from __future__ import annotations

import types

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


# issue 28: the official FreeDoM schedule (the authors' SD code: window, time travel, step size) beside sdo's.


class ClassNet(torch.nn.Module):
    """A float64 class-conditional network as cheap as a test needs, in a diffusers UNet's call shape."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mix = torch.nn.Parameter(0.5 * torch.randn(3))  # no conv: float64 convolutions are slow on a busy CPU
        self.embed = torch.nn.Embedding(11, 1)
        self.double().requires_grad_(False)

    def forward(self, x, t, class_labels):
        time = torch.cos(torch.as_tensor(t, dtype=x.dtype) / 1000.0)
        mixed = self.mix[0] * x + self.mix[1] * x.roll(1, -1) + self.mix[2] * x.roll(1, -2)
        sample = 0.5 * torch.tanh(mixed) * time + (0.8 + 0.1 * self.embed(class_labels)[:, :, None, None]) * x
        return types.SimpleNamespace(sample=sample)


def official_sampler(n_steps, guidance=3.0):
    net = ClassNet()
    denoiser = sdo.Denoiser(net, class_labels=torch.tensor([1, 4]), null_class_label=10, guidance_scale=guidance)
    return sdo.Sampler(denoiser, DDPMScheduler(clip_sample=False), n_steps)


def closeness(x0, cond=None):
    """A reward with a non-constant gradient."""
    return -(x0 - 0.5).square().flatten(1).mean(dim=1)


def official_loop(net, x, n_steps, w, generator, factor=0.2, repeats=3):
    """The authors' SD sampling loop, written out: loop step i has index n - 1 - i; guidance where
    70 > index >= 30 of 100 (scaled to n steps), rho = factor * w * rms(e_c - e_u) / rms(grad) over the batch,
    time travel where 70 > index >= 40; each step the DDPM posterior (what diffusers' DDPM step is)."""
    ab = DDPMScheduler(clip_sample=False).alphas_cumprod.to(torch.float64)
    labels, null = torch.tensor([1, 4]), torch.full((2,), 10)
    stride = 1000 // n_steps
    for i in range(n_steps):
        t = (n_steps - 1 - i) * stride
        a_t, a_prev = ab[t], ab[t - stride] if t >= stride else torch.tensor(1.0, dtype=torch.float64)
        position = 100 * i / n_steps  # the official index, scaled: 100 - 1 - index at 100 steps
        guided, travels = 30 <= position < 70, 30 <= position < 60
        for number in range(repeats if travels else 1):
            x = x.detach().requires_grad_(guided)
            with torch.set_grad_enabled(guided):
                e_c, e_u = net(x, t, labels).sample, net(x, t, null).sample
                e = e_u + w * (e_c - e_u)
                x0 = (x - (1 - a_t).sqrt() * e) / a_t.sqrt()
                if guided:
                    (grad,) = torch.autograd.grad(closeness(x0).sum(), x)
                    rho = factor * w * (e_c - e_u).square().mean().sqrt() / grad.square().mean().sqrt()
            c1 = a_prev.sqrt() * (1 - a_t / a_prev) / (1 - a_t)
            c2 = (a_t / a_prev).sqrt() * (1 - a_prev) / (1 - a_t)
            x_prev = (c1 * x0 + c2 * x).detach()
            if t > 0:
                variance = (1 - a_prev) * (1 - a_t / a_prev) / (1 - a_t)
                x_prev = x_prev + variance.sqrt() * torch.randn(x.shape, generator=generator, dtype=x.dtype)
            if guided:
                x_prev = x_prev + rho.detach() * grad
            if number + 1 < (repeats if travels else 1):
                beta = a_t / a_prev
                z = torch.randn(x.shape, generator=generator, dtype=x.dtype)
                x = beta.sqrt() * x_prev + (1 - beta).sqrt() * z
        x = x_prev
    return x.detach()


def test_official_schedule_matches_the_authors_loop_written_out():
    sampler = official_sampler(10)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    result = sdo.freedom_sample(
        sampler, x, closeness, schedule="official", repeats=3, generator=torch.Generator().manual_seed(7)
    )
    expected = official_loop(sampler.model_fn.model, x, 10, 3.0, torch.Generator().manual_seed(7))
    # diffusers' DDPM step takes its coefficients in float32 (~1e-6 apart); a per-sample rho (0.03) or the factor
    # 0.21 (0.19) moves the sample by far more
    torch.testing.assert_close(result.sample, expected, rtol=1e-5, atol=1e-5)
    assert [(h["step"], h["pass"]) for h in result.history] == [
        *[(step, number) for step in (3, 4, 5) for number in range(3)],
        (6, 0),
    ]
    sdo_rule = sdo.freedom_sample(sampler, x, closeness, repeats=3, generator=torch.Generator().manual_seed(7))
    assert (sdo_rule.sample - result.sample).abs().max() > 1e-3  # the schedules differ


def test_official_window_is_the_authors_steps_at_100_and_scales_by_proportion():
    from sdo.freedom import FreedomSettings, official_steps

    settings = FreedomSettings()
    loop_steps = [i for i in range(100) if 70 > 100 - 1 - i >= 30]  # the authors' index counts down from 99
    travel_steps = [i for i in range(100) if 70 > 100 - 1 - i >= 40]
    window, travel = official_steps(100, settings.official_window), official_steps(100, settings.official_travel)
    assert list(range(*window)) == loop_steps and list(range(*travel)) == travel_steps
    assert official_steps(50, settings.official_window) == (15, 35)  # ends before step 40 at 50 steps
    assert official_steps(50, settings.official_travel) == (15, 30)
    assert (settings.schedule, settings.scale, settings.official_repeats) == ("sdo", 0.2, 3)
    result = sdo.freedom_sample(
        official_sampler(100),
        torch.zeros(2, 1, 4, 4, dtype=torch.float64),
        closeness,
        schedule="official",
        repeats=2,
        generator=torch.Generator().manual_seed(0),
    )
    passes = {}
    for record in result.history:
        passes[record["step"]] = passes.get(record["step"], 0) + 1
    assert passes == {step: 2 if step in travel_steps else 1 for step in loop_steps}
    assert len({record["rho"] for record in result.history if record["step"] == 30}) == 2  # one rho per pass


def test_official_schedule_refuses_a_model_without_guidance_before_any_work():
    from sdo.freedom import GuidanceStepper
    from sdo.latent import LatentProblem

    calls = []
    unguided = official_sampler(10, guidance=1.0)
    plain = sdo.Sampler(lambda v, t: calls.append(t) or v, DDPMScheduler(clip_sample=False), 10)
    x = torch.zeros(2, 1, 4, 4, dtype=torch.float64)
    for sampler, got in (
        (unguided, r"an sdo.Denoiser without guidance \(guidance_scale=1.0\)"),
        (plain, "a function"),
    ):
        with pytest.raises(sdo.ConfigError, match=r"`schedule`='official', --freedom-schedule official.*" + got):
            sdo.freedom_sample(sampler, x, closeness, schedule="official")
        with pytest.raises(sdo.ConfigError, match="--freedom-schedule official"):
            GuidanceStepper(LatentProblem(sampler, x, closeness), schedule="official")
    assert calls == []
    with pytest.raises(sdo.ConfigError, match=r"`schedule` must be one of \('sdo', 'official'\), got 'paper'"):
        sdo.freedom_sample(official_sampler(10), x, closeness, schedule="paper")
    with pytest.raises(sdo.ConfigError, match=r"\(steps 3..6 of 10\), none of which runs from step 7"):
        sdo.freedom_sample(official_sampler(10), x, closeness, schedule="official", start_step=7)
    with pytest.raises(sdo.ConfigError, match="guidance_parts needs classifier-free guidance"):
        unguided.model_fn.guidance_parts(x, torch.tensor(10))


def test_freedom_schedule_flag_reaches_the_stepper_and_the_record(tmp_path, capsys):
    from sdo.app import cli
    from sdo.app.tasks.latent import LatentTaskConfig
    from sdo.latent import LatentProblem
    from sdo.methods import METHODS

    def config(*flags):
        args = cli.build_parser().parse_args(["optimize", "--method", "freedom", *flags])
        return cli._config_from(args, LatentTaskConfig)

    assert config().recorded()["freedom_schedule"] == "sdo"
    official = config("--freedom-schedule", "official", "--freedom-repeats", "3")
    assert official.recorded()["freedom_schedule"] == "official"  # metrics.json and config.json record it
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    problem = LatentProblem(official_sampler(10), x, closeness, seed=7)
    result = METHODS["freedom"].optimize(problem, official.method_options(), progress=False)
    alone = sdo.freedom_sample(
        problem.sampler, x, closeness, schedule="official", repeats=3, generator=torch.Generator().manual_seed(7)
    )
    torch.testing.assert_close(result.sample, alone.sample, rtol=0, atol=0)
    refused = tmp_path / "refused"
    argv = [
        "optimize",
        "--method",
        "freedom",
        "--freedom-schedule",
        "official",
        "--source",
        "-1",
        "--out",
        str(refused),
    ]
    assert cli.main(argv) == 2  # refused before any model loads
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdo optimize: error: The official FreeDoM schedule (--freedom-schedule 'official') sizes")
    assert err.count("\n") == 0 and "which --source -1 (unconditional samples) does not have" in err
    assert not refused.exists()
