"""Shared fixtures: every supported scheduler configuration, small float64 models with a closed form, and the tiny
random pipelines and CLIP model of ``tiny_pipelines`` (built once per session; no test may change their files)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

import tiny_pipelines

# Each test's torch thread count: torch's own default (the machine's cores) when pytest runs alone; under
# pytest-xdist (`make test` runs `pytest -n 2`) the workers share the cores, so each gets its part (1 of 2), since
# more threads than cores slow every worker down. Subprocess tests set OMP_NUM_THREADS=1.
XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
DEFAULT_THREADS = max(1, torch.get_num_threads() // XDIST_WORKERS)


@pytest.fixture(autouse=True)
def default_threads():
    """Each test starts on :data:`DEFAULT_THREADS`, whatever an earlier command's ``--threads`` set."""
    torch.set_num_threads(DEFAULT_THREADS)


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


def shared_folder(tmp_path_factory, name: str, save: Callable[[Path], Path]) -> Iterator[Path]:
    """The folder ``save`` writes under a fresh session directory; after the session its files must be unchanged,
    since every test file reads the same copy."""
    pytest.importorskip("transformers")
    folder = save(tmp_path_factory.mktemp(name))
    before = tiny_pipelines.file_digests(folder)
    yield folder
    assert tiny_pipelines.file_digests(folder) == before, f"a test changed the shared {name} folder {folder}"


@pytest.fixture(scope="session")
def pipeline_dir(tmp_path_factory):
    """A tiny Stable-Diffusion-1.x pipeline folder (DDIM, 8x8 latents)."""
    yield from shared_folder(tmp_path_factory, "pipe", tiny_pipelines.save_sd)


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    """A folder holding a tiny CLIP model (``clip/``) and aesthetic head (``head.safetensors``)."""
    yield from shared_folder(tmp_path_factory, "clip", tiny_pipelines.save_clip)


@pytest.fixture(scope="session")
def sd3_dir(tmp_path_factory):
    """A tiny SD3 pipeline folder (flow matching, no T5)."""
    yield from shared_folder(tmp_path_factory, "sd3", tiny_pipelines.save_sd3)


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory):
    """A tiny SDXL pipeline folder."""
    yield from shared_folder(tmp_path_factory, "sdxl", tiny_pipelines.save_sdxl)


@pytest.fixture(scope="session")
def flux_dir(tmp_path_factory):
    """A tiny Flux pipeline folder."""
    yield from shared_folder(tmp_path_factory, "flux", tiny_pipelines.save_flux)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch, pipeline_dir, clip_dir):
    """A temporary Hugging Face cache holding ``org/tiny-sd`` and ``org/tiny-clip``, with ``HF_HUB_OFFLINE=1``."""
    cache = tmp_path / "hf-cache"
    tiny_pipelines.place_in_cache(cache, "org/tiny-sd", pipeline_dir)
    tiny_pipelines.place_in_cache(cache, "org/tiny-clip", clip_dir / "clip")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("SDO_CLIP_PATH", raising=False)
    return cache
