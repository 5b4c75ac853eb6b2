"""Overhead of ``Sampler(...).sample(x, grad=NoGrad())`` over a plain diffusers loop on the embedded UNet.

Both run the same model, scheduler and steps; repeats are interleaved, and the medians are compared.
Usage: python benchmarks/sampler_overhead.py [--repeats 15] [--steps 50] [--batch 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import sdo
from sdo import zoo


def plain_loop(denoiser, noise, steps):
    scheduler = zoo.scheduler("ddim")
    scheduler.set_timesteps(steps)
    x = noise
    for t in scheduler.timesteps:
        x = scheduler.step(denoiser(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    return x


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    unet = zoo.load_unet()
    denoiser = zoo.denoiser(unet, torch.arange(args.batch) % 10)
    sampler = sdo.Sampler(denoiser, zoo.scheduler("ddim"), args.steps)
    noise = torch.randn(args.batch, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    timings = {"plain": [], "sdo": []}
    with torch.no_grad():
        torch.testing.assert_close(sampler.sample(noise, grad=sdo.NoGrad()), plain_loop(denoiser, noise, args.steps))
        for _ in range(args.repeats):
            for name, run in (
                ("plain", lambda: plain_loop(denoiser, noise, args.steps)),
                ("sdo", lambda: sampler.sample(noise, grad=sdo.NoGrad())),
            ):
                started = time.perf_counter()
                run()
                timings[name].append(time.perf_counter() - started)
    plain, ours = statistics.median(timings["plain"]), statistics.median(timings["sdo"])
    print(
        f"plain diffusers loop: {plain:.3f} s, sdo.Sampler NoGrad: {ours:.3f} s (medians of {args.repeats}); "
        f"overhead {100 * (ours / plain - 1):+.1f}%"
    )


if __name__ == "__main__":
    main()
