"""Overhead of ``Sampler(...).sample(x, grad=NoGrad())`` over a plain diffusers loop on the embedded UNet.

Both run the same model, scheduler and steps; repeats are interleaved (``sdo.app.comparison.interleave``), and the
medians are compared.
Usage: python benchmarks/sampler_overhead.py [--repeats 15] [--steps 50] [--batch 8]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import sdo
from sdo import zoo
from sdo.app.comparison import interleave


def plain_loop(denoiser, noise, steps):
    scheduler = zoo.scheduler("ddim")
    scheduler.set_timesteps(steps)
    x = noise
    for t in scheduler.timesteps:
        x = scheduler.step(denoiser(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    return x


class TimedRun:
    """One contender of ``sdo.app.comparison.interleave``: ``rounds`` timed calls of ``run``."""

    def __init__(self, name: str, rounds: int, run: Callable[[], object]) -> None:
        self.name, self.rounds, self.run, self.seconds = name, rounds, run, []

    def iterate(self) -> None:
        started = time.perf_counter()
        self.run()
        self.seconds.append(time.perf_counter() - started)


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
    runs = [
        TimedRun("plain", args.repeats, lambda: plain_loop(denoiser, noise, args.steps)),
        TimedRun("sdo", args.repeats, lambda: sampler.sample(noise, grad=sdo.NoGrad())),
    ]
    with torch.no_grad():
        torch.testing.assert_close(sampler.sample(noise, grad=sdo.NoGrad()), plain_loop(denoiser, noise, args.steps))
        interleave(runs, "sampler overhead", progress=False)
    plain, ours = (statistics.median(run.seconds) for run in runs)
    print(
        f"plain diffusers loop: {plain:.3f} s, sdo.Sampler NoGrad: {ours:.3f} s (medians of {args.repeats}); "
        f"overhead {100 * (ours / plain - 1):+.1f}%"
    )


if __name__ == "__main__":
    main()
