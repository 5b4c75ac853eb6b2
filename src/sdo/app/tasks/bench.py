"""Benchmark workloads: the same model, sampler, reward and seeds for every method.

- ``mnist``: the embedded model (quality and cost): class-conditional UNet, DDIM, reward = reward classifier's
  log-probability of a target class.
- ``sd15``: a Stable-Diffusion-1.5-sized ``UNet2DConditionModel`` and VAE decoder built from their published
  configs with random weights (no download), 512x512, classifier-free guidance, DDIM, and a reward on the decoded
  image: for cost only (its outputs mean nothing), on a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sdo import zoo
from sdo.models import Denoiser
from sdo.rewards import ClassifierReward
from sdo.sampling import Sampler
from sdo.zoo.nets import RewardNet, build_unet

__all__ = ["SD15_UNET_CONFIG", "SD15_VAE_CONFIG", "Workload", "mnist_workload", "scaled_config", "sd15_workload"]

# Published Stable Diffusion v1.5 configs (unet/config.json and vae/config.json of the v1.5 release).
SD15_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SD15_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}


@dataclass
class Workload:
    """What every benchmarked method shares.

    Attributes:
        name: workload name.
        make_sampler: ``(steps, model) -> Sampler`` running ``model`` (a copy of ``model`` when weights are trained).
        latent: ``[B, ...]`` initial latent (the same for every method).
        reward: ``reward(x0, cond) -> [B]`` of a sample (the one reward protocol; ``cond`` is None here), decoding
            included for latent-diffusion workloads.
        model: the network whose weights ``--variable weights`` optimizes.
        others: the other modules the run keeps on the device (the reward's networks, the VAE), for the memory
            ``--method auto`` plans.
        device, dtype: where and in which precision the work runs.
    """

    name: str
    make_sampler: Callable[[int, torch.nn.Module], Sampler]
    latent: torch.Tensor
    reward: Callable[[torch.Tensor, object], torch.Tensor]
    model: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    others: tuple[torch.nn.Module, ...] = ()


def mnist_workload(batch: int = 4, source: int = 3, target: int = 8, seed: int = 0, device="cpu") -> Workload:
    """The embedded model: steer ``batch`` generated ``source`` digits towards ``target`` (on the ``meta`` device:
    the networks' shapes only, no weights read, for ``sdo bench --plan``)."""
    device = torch.device(device)
    unet, classifier = _mnist_networks(device)
    classes = torch.full((batch,), source, device=device)
    noise = zoo.noise(batch, seed, device)
    reward = ClassifierReward(classifier, target)

    def make_sampler(steps: int, model: torch.nn.Module) -> Sampler:
        return zoo.ddim_sampler(model, classes, steps)

    return Workload(
        name="mnist",
        make_sampler=make_sampler,
        latent=noise,
        reward=reward,
        model=unet,
        device=device,
        dtype=torch.float32,
    )


def _mnist_networks(device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The embedded UNet and reward classifier, frozen; on the meta device built there, without weights."""
    if device.type == "meta":
        with device:
            return build_unet().requires_grad_(False), RewardNet().requires_grad_(False)
    return zoo.load_unet(device), zoo.load_reward_classifier(device)


def _frozen(network: type[torch.nn.Module], config: dict, device: torch.device, dtype: torch.dtype):
    """``network(**config)`` frozen in eval mode, in ``dtype`` on ``device`` (on the meta device built there: shapes
    only, nothing allocated)."""
    with device if device.type == "meta" else contextlib.nullcontext():
        module = network(**config)
    return module.to(device, dtype).eval().requires_grad_(False)


def sd15_workload(
    batch: int = 1,
    seed: int = 0,
    device="cuda",
    dtype: torch.dtype = torch.bfloat16,
    width: float = 1.0,
    resolution: int = 512,
    checkpoint_decoder: bool = False,
    vae_slicing: bool = False,
) -> Workload:
    """SD-1.5-sized UNet + VAE decoder with random weights; reward = mean of a fixed random projection of the image.

    ``width`` < 1 and a smaller ``resolution`` shrink the architecture (CPU smoke tests); 1.0 and 512 are the
    real sizes. ``checkpoint_decoder`` recomputes the decoder's activations in backward; ``vae_slicing`` decodes
    one image at a time (diffusers' ``enable_slicing``). On the ``meta`` device: shapes only (``sdo bench --plan``).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    device = torch.device(device)
    torch.manual_seed(seed)
    unet_config, vae_config = scaled_config(SD15_UNET_CONFIG, width), scaled_config(SD15_VAE_CONFIG, width)
    unet = _frozen(UNet2DConditionModel, unet_config, device, dtype)
    vae = _frozen(AutoencoderKL, vae_config, device, dtype)
    if vae_slicing:
        vae.enable_slicing()
    tokens, dim = 77, unet_config["cross_attention_dim"]
    text = torch.randn(batch, tokens, dim, device=device, dtype=dtype)

    def make_sampler(steps: int, model: torch.nn.Module) -> Sampler:
        negative = torch.zeros_like(text[:1])
        denoiser = Denoiser(
            model, encoder_hidden_states=text, negative_encoder_hidden_states=negative, guidance_scale=7.5
        )
        return Sampler(denoiser, scheduler, steps)

    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    size = resolution // 8
    latent = torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
    projection = torch.randn(3, resolution, resolution, generator=torch.Generator().manual_seed(seed + 1))
    projection = projection.to(device, dtype) / resolution

    def decode(z: torch.Tensor) -> torch.Tensor:
        return vae.decode(z / vae.config.scaling_factor).sample

    def reward(x0: torch.Tensor, cond: object = None) -> torch.Tensor:
        if checkpoint_decoder and torch.is_grad_enabled():
            image = torch.utils.checkpoint.checkpoint(decode, x0, use_reentrant=False)
        else:
            image = decode(x0)
        return (image * projection).flatten(1).sum(dim=1).float()

    return Workload(
        name="sd15",
        make_sampler=make_sampler,
        latent=latent,
        reward=reward,
        model=unet,
        device=device,
        dtype=dtype,
        others=(vae,),
    )


def scaled_config(config: dict, width: float) -> dict:
    """``config`` with channel counts multiplied by ``width`` (rounded to multiples of 32, the group-norm size)."""
    if width == 1.0:
        return dict(config)
    scaled = dict(config)
    scaled["block_out_channels"] = [max(32, int(c * width) // 32 * 32) for c in config["block_out_channels"]]
    if "cross_attention_dim" in config:
        scaled["cross_attention_dim"] = max(32, int(config["cross_attention_dim"] * width) // 32 * 32)
    return scaled
