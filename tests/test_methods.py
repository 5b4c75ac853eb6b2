"""The estimator registry: one name, one gradient mode, in every command."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

import sdo
from sdo.app.bench import BenchConfig
from sdo.app.finetuning import FINETUNE_METHODS, FinetuneConfig
from sdo.app.tasks.latent import LATENT_METHODS, LatentTaskConfig, build_task
from sdo.doodl import edict_sampler, scaled_clip
from sdo.latent import LatentProblem
from sdo.methods import METHODS, MethodOptions, gradient_mode, method_names


def test_names_resolve_to_the_documented_modes():
    latent, weights = MethodOptions("latent"), MethodOptions("weights", draft_k=3, truncation_high=7)
    assert gradient_mode("full", latent) == gradient_mode("full", weights) == sdo.Full()
    assert gradient_mode("checkpointed", weights) == sdo.Checkpointed()
    assert gradient_mode("sdo", latent) == sdo.Shortcut(step="first")  # the paper's choice for a latent
    assert gradient_mode("sdo", weights) == sdo.Shortcut(step="random")  # and for weights
    assert gradient_mode("sdo-first", weights) == sdo.Shortcut(step="first")
    assert gradient_mode("sdo-last", latent) == sdo.Shortcut(step="last")
    assert gradient_mode("draft-k", weights) == sdo.Truncated(3)
    assert gradient_mode("draft-1", weights) == sdo.Truncated(1)
    assert gradient_mode("alignprop", weights) == sdo.AlignProp(
        checkpoint=True
    )  # a threshold per step, as the official
    assert gradient_mode("random-truncation", weights) == sdo.RandomTruncation(1, 7, checkpoint=True)  # sdo's former
    assert weights.alignprop_high == 7  # the knob's older name still reads
    checkpointed_draft = gradient_mode("draft-k", dataclasses.replace(weights, checkpoint_kept=True))
    assert checkpointed_draft == sdo.Truncated(3, checkpoint=True)
    assert gradient_mode("nograd", latent) == sdo.NoGrad()
    checkpointed = gradient_mode("sdo", MethodOptions("latent", checkpoint_kept=True))
    assert checkpointed == sdo.Shortcut(step="first", checkpoint=True)


def test_every_command_accepts_exactly_the_registry_names():
    latent = ("sdo", "sdo-first", "sdo-random", "sdo-last", "full", "checkpointed", "adjoint", "sdo-multi")
    assert LATENT_METHODS == method_names("latent") == (*latent, "doodl", "doodl-adam", "freedom")
    modes = tuple(name for name, method in METHODS.items() if method.kind == "mode" and name != "nograd")
    assert FINETUNE_METHODS == method_names("weights") == modes and not {"doodl", "doodl-adam"} & set(modes)
    weights = (*modes, "nograd")
    assert BenchConfig(methods=",".join(weights), variable="weights").method_names == list(weights)
    flags = {field.name: field.metadata for field in dataclasses.fields(LatentTaskConfig)}
    assert flags["method"]["choices"] == (*LATENT_METHODS, "auto")  # auto: sdo.app.auto chooses one of them
    finetune_flags = {field.name: field.metadata for field in dataclasses.fields(FinetuneConfig)}
    assert finetune_flags["method"]["choices"] == (*FINETUNE_METHODS, "auto")


def test_finetuning_modes_come_from_the_registry():
    generator = torch.Generator().manual_seed(0)
    for name in FINETUNE_METHODS:
        config = FinetuneConfig(method=name, sample_steps=10)
        assert config.mode(generator) == gradient_mode(name, MethodOptions("weights", draft_k=2, truncation_high=10))


def test_unknown_and_latent_incapable_names_are_refused():
    with pytest.raises(sdo.ConfigError, match=r"unknown method 'magic'; known methods: sdo, sdo-first"):
        gradient_mode("magic")
    with pytest.raises(sdo.ConfigError, match=r"method 'random-truncation' gives no gradient to the latent"):
        gradient_mode("random-truncation", MethodOptions("latent"))
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


def test_doodl_clip_flag_defaults_to_the_clip_scaled_to_the_run():
    assert scaled_clip(50) == pytest.approx(1e-3) and scaled_clip(10) == pytest.approx(5e-3)
    assert scaled_clip(1) == pytest.approx(0.05)  # the authors' total movement, 50 x 1e-3, in one iteration
    with pytest.raises(sdo.ConfigError, match="iters"):
        scaled_clip(0)
    assert MethodOptions().doodl_clip == 1e-3  # the library keeps the authors' value
    assert LatentTaskConfig(iters=10).method_options().doodl_clip == pytest.approx(5e-3)
    assert LatentTaskConfig(iters=10, doodl_clip=2e-3).method_options().doodl_clip == 2e-3
    with pytest.raises(sdo.ConfigError, match="doodl_clip"):
        LatentTaskConfig(doodl_clip=-1.0)


@pytest.mark.parametrize(("method", "chain"), [("sdo", "ddim"), ("doodl", "edict"), ("doodl-adam", "edict")])
def test_adversarial_original_is_the_sample_of_the_chain_the_method_optimizes(method, chain):
    task = build_task(LatentTaskConfig(task="adversarial", method=method, steps=4, batch=2))
    assert task.notes["original_chain"] == chain
    with torch.no_grad():
        ddim = task.sampler.sample(task.latent, sdo.NoGrad())
        edict = edict_sampler(task.sampler).sample(task.latent, sdo.NoGrad())
    expected = edict if chain == "edict" else ddim
    assert torch.equal(task.original, expected) and not torch.allclose(ddim, edict)
    assert torch.equal(task.reward.original, expected)  # the proximity term keeps the image near it


def test_every_default_is_read_from_one_settings_object_per_rule():
    import inspect

    from sdo.app.method_flags import MethodFlags
    from sdo.doodl import DOODL_CLIP, DoodlSettings, DoodlUpdate, doodl_adam_stepper, doodl_stepper
    from sdo.freedom import FreedomSettings, GuidanceStepper
    from sdo.latent import AdamSettings, latent_stepper
    from sdo.methods import FINETUNE_TRUNCATION, TruncationSettings

    adam, doodl, freedom = AdamSettings(), DoodlSettings(), FreedomSettings()
    # the values themselves are unchanged (every published figure was made with them)
    assert (adam.lr, adam.betas, adam.prior_weight, adam.project_to_shell) == (0.05, (0.9, 0.9), 0.0, True)
    assert adam.lr_schedule == "constant"  # the authors' behaviour
    assert (doodl.lr, doodl.momentum, doodl.clip, doodl.perturbation, doodl.iters) == (1.0, 0.9, 1e-3, 1e-4, 50)
    assert (freedom.scale, freedom.repeats) == (0.2, 1) and doodl.clip == DOODL_CLIP
    assert (TruncationSettings().draft_k, TruncationSettings().truncation_high) == (2, 10)  # one default each
    assert TruncationSettings() == FINETUNE_TRUNCATION

    def defaults(function):
        return {n: p.default for n, p in inspect.signature(function).parameters.items() if p.default is not p.empty}

    for function in (sdo.optimize_latent, latent_stepper, doodl_adam_stepper):
        found = defaults(function)
        assert {key: found[key] for key in ("lr", "betas", "project_to_shell", "lr_schedule") if key in found} == {
            key: getattr(adam, key) for key in ("lr", "betas", "project_to_shell", "lr_schedule") if key in found
        }, function.__name__
    for function in (sdo.optimize_latent_doodl, doodl_stepper, DoodlUpdate.__init__):
        found = defaults(function)
        assert [found[key] for key in ("lr", "momentum", "clip", "perturbation", "project_to_shell")] == [
            doodl.lr,
            doodl.momentum,
            doodl.clip,
            doodl.perturbation,
            doodl.project_to_shell,
        ], function.__name__
    for function in (sdo.freedom_sample, GuidanceStepper.__init__):
        assert (defaults(function)["scale"], defaults(function)["repeats"]) == (freedom.scale, freedom.repeats)
    options = MethodOptions()
    adam_options = (options.lr, options.betas, options.prior_weight, options.project_to_shell, options.lr_schedule)
    assert adam_options == dataclasses.astuple(adam)
    assert (options.doodl_lr, options.doodl_clip, options.doodl_project_to_shell) == (doodl.lr, doodl.clip, True)
    assert (options.freedom_scale, options.freedom_repeats, options.draft_k) == (0.2, 1, 2)
    flags = {field.name: field for field in dataclasses.fields(MethodFlags)}  # the CLI flags and their help
    assert [flags[name].default for name in ("lr", "prior_weight", "project", "doodl_lr", "freedom_scale")] == [
        adam.lr,
        adam.prior_weight,
        adam.project_to_shell,
        doodl.lr,
        freedom.scale,
    ]
    assert "0.001 x 50 / --iters" in flags["doodl_clip"].metadata["help"]
    assert (
        flags["lr_schedule"].default == adam.lr_schedule
        and "(1 + cos(pi k / K)) / 2" in flags["lr_schedule"].metadata["help"]
    )
    assert BenchConfig().draft_k == 2 and FinetuneConfig().draft_k == 2 and FinetuneConfig().truncation_high == 10


@pytest.mark.parametrize(("method", "steps", "bench"), [("draft-k", 3, "2"), ("random-truncation", 4, "10")])
def test_a_depth_above_the_steps_is_refused_one_way_in_bench_and_finetune(method, steps, bench):
    knob = METHODS[method].depth
    message = rf"`{knob}` must be in \[1, {steps}\], got 9"
    with pytest.raises(sdo.ConfigError, match=message):
        BenchConfig(methods=method, variable="weights", steps=str(steps), **{knob: 9})
    with pytest.raises(sdo.ConfigError, match=message):
        FinetuneConfig(method=method, sample_steps=steps, **{knob: 9})
    assert getattr(BenchConfig(methods=method, variable="weights", steps="10"), knob) == int(bench)


def test_the_former_depth_flag_still_sets_random_truncations_depth():
    from sdo.app.cli import build_parser

    for command in ("finetune", "bench"):
        for flag in ("--truncation-high", "--alignprop-high"):
            assert build_parser().parse_args([command, flag, "3"]).truncation_high == 3


def test_runners_say_what_their_runs_are():
    from sdo.app.results import replays

    sampler = sdo.Sampler(lambda x, t: x * 0.1, DDIMScheduler(clip_sample=False), 3)
    for name, method in METHODS.items():
        runner, edict = method.runner, name in ("doodl", "doodl-adam")
        assert runner.replays == replays(name) == (not edict and name != "freedom"), name
        assert runner.chain == ("edict" if edict else "ddim") and runner.iterations(7) == (
            1 if name == "freedom" else 7
        )
        chain = runner.chain_sampler(sampler)
        assert isinstance(chain, sdo.EDICTSampler) if edict else chain is sampler, name
        assert (runner.not_a_latent is None) == runner.replays


# issue 28: the Adam run's lr schedule reaches every Adam-driven runner, and the others refuse it.


def linear_problem():
    sampler = sdo.Sampler(lambda x, t: x * 0.1, DDIMScheduler(clip_sample=False), 3)
    latent = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    return LatentProblem(sampler, latent, lambda x, c: x.mean(dim=(1, 2, 3)))


@pytest.mark.parametrize("name", ["sdo", "full", "doodl-adam"])
def test_registry_steppers_use_the_cosine_lrs_and_step_as_optimize_runs(name):
    options = MethodOptions(lr=0.2, lr_schedule="cosine")
    stepper = METHODS[name].stepper(linear_problem(), options, 4)
    used = []
    for _ in range(4):
        stepper.iterate()
        used.append(stepper.update.optimizer.param_groups[0]["lr"])
    assert used == pytest.approx([0.2 * (1 + math.cos(math.pi * k / 4)) / 2 for k in range(4)], rel=1e-12)
    stepped = stepper.finish()
    whole = METHODS[name].optimize(linear_problem(), options, iters=4, progress=False)
    torch.testing.assert_close(stepped.latent, whole.latent, rtol=0, atol=0)
    constant = METHODS[name].optimize(linear_problem(), MethodOptions(lr=0.2), iters=4, progress=False)
    assert not torch.equal(constant.latent, whole.latent)


@pytest.mark.parametrize("name", ["doodl", "freedom"])
def test_methods_without_adam_refuse_a_schedule_they_would_ignore(name):
    message = rf"method '{name}' runs no Adam .*: `lr_schedule` 'cosine' would be ignored"
    with pytest.raises(sdo.ConfigError, match=message):
        METHODS[name].check(MethodOptions(lr_schedule="cosine"))
    with pytest.raises(sdo.ConfigError, match=message):
        LatentTaskConfig(method=name, lr_schedule="cosine", steps=3)
    with pytest.raises(sdo.ConfigError, match=r"`lr_schedule` must be one of constant, cosine, got 'step'"):
        METHODS["sdo"].check(MethodOptions(lr_schedule="step"))
    METHODS[name].check(MethodOptions())  # constant, the default, is their own behaviour
