"""Shared fixtures: every supported scheduler configuration, and small float64 models with a closed form."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

# (name, scheduler factory, DDIM eta). One parametrization that every mode is run against.
SCHEDULER_CASES = {
    "ddim": (lambda: DDIMScheduler(num_train_timesteps=1000, clip_sample=False), 0.0),
    "ddim-eta1": (lambda: DDIMScheduler(num_train_timesteps=1000, clip_sample=False), 1.0),
    "ddpm": (lambda: DDPMScheduler(num_train_timesteps=1000, clip_sample=False), 0.0),
    "dpm++2": (lambda: DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2), 0.0),
    "sde-dpm++2": (lambda: DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2), 0.0),
    "euler": (lambda: EulerDiscreteScheduler(num_train_timesteps=1000), 0.0),
    "flowmatch": (lambda: FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000), 0.0),
}
STOCHASTIC = {"ddim-eta1", "ddpm", "sde-dpm++2"}


@pytest.fixture(params=sorted(SCHEDULER_CASES))
def scheduler_case(request):
    factory, eta = SCHEDULER_CASES[request.param]
    return request.param, factory(), eta


class ToyDenoiser(torch.nn.Module):
    """A small nonlinear conv net with a conditioning vector, so every Jacobian in the loop is non-trivial."""

    def __init__(self, channels: int = 2, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = torch.nn.Conv2d(channels, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(4, channels, 3, padding=1)
        self.double()

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        time = torch.cos(torch.as_tensor(t, dtype=x.dtype) / 1000.0)
        hidden = torch.tanh(self.conv1(x) * time + cond[:, :1, None, None])
        return self.conv2(hidden) + 0.3 * x * cond[:, 1:, None, None]


@pytest.fixture
def toy():
    model = ToyDenoiser()
    cond = torch.tensor([[0.2, 0.5], [-0.1, 0.8]], dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    return model, cond, x


def tiny_unet(num_class_embeds: int | None = 11, dtype=torch.float64):
    """A real diffusers UNet2DModel, small enough for float64 tests on CPU."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=num_class_embeds,
    ).to(dtype)


def tiny_conditional_unet(dtype=torch.float64):
    """A real diffusers UNet2DConditionModel with cross-attention, small enough for CPU tests."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    ).to(dtype)
