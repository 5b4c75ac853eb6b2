"""Latent optimization of a Stable Diffusion pipeline for CLIP similarity; each model is a folder or a Hub id.

python examples/stable_diffusion.py stable-diffusion-v1-5/stable-diffusion-v1-5 openai/clip-vit-large-patch14 "a fox"
"""

import sys

import torch

import sdo
from sdo.app.images import save_images
from sdo.clip_rewards import ClipScoreReward

pipeline, clip, prompt = sys.argv[1:4]
steps = 50
parts = sdo.from_pipeline(pipeline, prompt)  # the family's own guidance (7.5 for SD)
reward = parts.latent_reward(ClipScoreReward(prompt, path=clip, cutouts=4))  # scores decoded images in [0, 1]
result = sdo.optimize_latent(parts.sampler(steps), parts.initial_latent(seed=0), reward, iters=50, lr=0.01)
height, width = parts.image_size
settings = dict(prompt=prompt, guidance_scale=parts.model_fn.guidance_scale, num_inference_steps=steps)
settings.update(height=height, width=width, scheduler=type(parts.scheduler).__name__, start_step=0)
settings.update(pipeline=pipeline, scheduler_config=parts.scheduler.to_json_string())
sdo.save_latent("latent.safetensors", result.latent, **settings)  # replays as the README shows
with torch.no_grad():
    save_images(parts.decode(result.sample), "images", "after")
