"""The compiled no-grad chain: same samples and gradients as eager, and one graph for every step and iteration."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from torch._dynamo.utils import counters

import sdo
from sdo.compiled import CompiledModelFn, CompileOptions, compile_options
from sdo.errors import ConfigError
from tiny_pipelines import tiny_conditional_unet, tiny_unet

QUICK = CompileOptions(backend="aot_eager")  # dynamo traces and guards exactly as with inductor, without codegen


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def class_sampler(compile, steps: int = 4, scheduler=None) -> sdo.Sampler:
    unet = tiny_unet(dtype=torch.float32).requires_grad_(False)
    classes = torch.tensor([1, 2])
    denoiser = sdo.Denoiser(unet, class_labels=classes, null_class_label=10, guidance_scale=2.0)
    scheduler = scheduler or DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    return sdo.Sampler(denoiser, scheduler, steps, compile=compile)


def sample_and_gradient(sampler: sdo.Sampler, mode: sdo.GradientMode):
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    x0 = sampler.sample(x, grad=mode)
    if x0.requires_grad:
        (x0 * torch.linspace(-1, 1, 64).view(1, 1, 8, 8)).sum().backward()
    return x0.detach(), x.grad


@pytest.mark.parametrize(
    ("solver", "mode"),
    [
        ("ddim", sdo.Shortcut()),
        ("ddim", sdo.Shortcut(step="last")),
        ("ddim", sdo.NoGrad()),
        ("dpm++2", sdo.Shortcut()),
    ],
    ids=str,
)
def test_compiled_samples_and_gradients_equal_eager(solver, mode):
    def scheduler():
        if solver == "ddim":
            return DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
        return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)

    eager_x0, eager_grad = sample_and_gradient(class_sampler(False, scheduler=scheduler()), mode)
    compiled_x0, compiled_grad = sample_and_gradient(class_sampler(QUICK, scheduler=scheduler()), mode)
    torch.testing.assert_close(compiled_x0, eager_x0, rtol=1e-5, atol=1e-6)
    if eager_grad is None:
        assert compiled_grad is None
    else:
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-5, atol=1e-6)


def test_one_graph_serves_every_step_sample_call_and_optimize_iteration():
    sampler = class_sampler(QUICK, steps=5)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sampler.sample(x, grad=sdo.NoGrad())  # 5 steps, 5 different timesteps
    assert graphs() == 1
    for _ in range(3):
        sampler.sample(x.clone().requires_grad_(True), grad=sdo.Shortcut())
    result = sdo.optimize_latent(sampler, x, lambda x0, cond: -x0.square().flatten(1).mean(1), iters=3, progress=False)
    assert len(result.history) == 4
    assert graphs() == 1, counters["recompiles"]
    # Another sampler over the same network (a new Denoiser, new labels, other steps) reuses the compiled graph.
    again = sdo.Sampler(
        dataclasses.replace(sampler.model_fn, class_labels=torch.tensor([7, 3])),
        sampler.scheduler,
        3,
        compile=QUICK,
    )
    again.sample(x, grad=sdo.NoGrad())
    assert graphs() == 1


def test_text_conditioned_unet_with_an_embedding_that_requires_grad():
    unet = tiny_conditional_unet(dtype=torch.float32).requires_grad_(False)
    cond = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(2), requires_grad=True)
    denoiser = sdo.Denoiser(
        unet, encoder_hidden_states=cond, negative_encoder_hidden_states=torch.zeros(1, 3, 8), guidance_scale=3.0
    )
    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    results = []
    for compile in (False, QUICK):
        cond.grad = None
        x0 = sdo.Sampler(denoiser, scheduler, 3, compile=compile).sample(x, grad=sdo.Shortcut(step=1))
        x0.square().sum().backward()
        results.append((x0.detach(), cond.grad.clone()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-6)
    assert graphs() == 1


def test_compile_argument_is_checked():
    assert compile_options(False) is None and compile_options(None) is None
    assert compile_options(True) == CompileOptions()
    assert compile_options("max-autotune").mode == "max-autotune"
    assert CompileOptions().mode_for(torch.device("cpu")) == "default"
    assert CompileOptions().mode_for(torch.device("cuda")) == "reduce-overhead"
    with pytest.raises(ConfigError, match="mode"):
        compile_options("fastest")
    with pytest.raises(ConfigError, match="compile"):
        compile_options(3)
    compiled = CompiledModelFn(lambda x, t: x, QUICK)
    with pytest.raises(RuntimeError, match="no-grad"):
        compiled(torch.zeros(1), torch.tensor(1))


@pytest.mark.slow
def test_inductor_compiled_chain_equals_eager_without_recompiling():
    """Real code generation (inductor, C++ on CPU) on a tiny network: equal results, one graph for 3 iterations."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(4, 1, 3, padding=1)
    )
    net.requires_grad_(False)

    def model_fn(x, t):
        return net(x) * torch.cos(t.float() / 1000)

    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    reward = lambda x0, cond: -x0.square().flatten(1).mean(1)  # noqa: E731
    eager = sdo.optimize_latent(sdo.Sampler(model_fn, scheduler, 3), x, reward, iters=3, progress=False)
    compiled = sdo.optimize_latent(
        sdo.Sampler(model_fn, scheduler, 3, compile=True), x, reward, iters=3, progress=False
    )
    torch.testing.assert_close(compiled.latent, eager.latent, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled.sample, eager.sample, rtol=1e-5, atol=1e-6)
    assert graphs() == 1, counters["recompiles"]


def test_commands_build_compiled_samplers_when_asked(tmp_path):
    from sdo import zoo
    from sdo.app.bench import BenchConfig
    from sdo.app.cli import build_parser
    from sdo.app.finetuning import FinetuneConfig
    from sdo.app.tasks.finetune import ZooTarget
    from sdo.app.tasks.latent import LatentTaskConfig, _sampler

    for command in ("optimize", "bench", "finetune"):
        assert build_parser().parse_args([command, "--compile"]).compile is True
    target = ZooTarget(FinetuneConfig(compile=True, out=str(tmp_path)), torch.device("cpu"))
    assert isinstance(target.sampler(target.network, torch.tensor([1])).detached_model_fn, CompiledModelFn)
    sampler = zoo.ddim_sampler(target.network, torch.tensor([1]), 2)
    assert isinstance(_sampler(sampler, LatentTaskConfig(compile=True)).detached_model_fn, CompiledModelFn)
    assert _sampler(sampler, LatentTaskConfig()) is sampler
    assert BenchConfig(compile=True).compile
