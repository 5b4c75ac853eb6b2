"""Latent optimization of a local Stable Diffusion folder for CLIP similarity (weights must already be on disk).

python examples/stable_diffusion.py /path/to/sd15 /path/to/clip-vit-large-patch14 "a watercolor fox"
"""

import sys

import sdo
from sdo.clip_rewards import ClipScoreReward

pipeline_dir, clip_dir, prompt = sys.argv[1:4]
parts = sdo.from_pipeline(pipeline_dir, prompt, guidance_scale=5.0)
reward = ClipScoreReward(prompt, path=clip_dir, cutouts=4)
result = sdo.optimize_latent(
    parts.sampler(50), parts.initial_latent(seed=0), lambda x0, c: reward(parts.decode(x0)), iters=50, lr=0.01
)
sdo.save_latent("latent.safetensors", result.latent)
