"""Aesthetic enhancement of a real photo (the paper's application): invert it to step 10 of 50, optimize from there.

python examples/edit_photo.py /path/to/sd15 /path/to/clip-vit-large-patch14 /path/to/aesthetic-head.safetensors \
    photo.jpg "a photo of a lake at dawn"
"""

import sys

import sdo
from sdo.app.images import save_images
from sdo.clip_rewards import AestheticReward

pipeline_dir, clip_dir, head, photo_path, prompt = sys.argv[1:6]
parts = sdo.from_pipeline(pipeline_dir, prompt, guidance_scale=1.0)  # the inversion's guidance, so `before` ~ photo
photo = sdo.io.load_image(photo_path, size=parts.image_size)
latent = parts.invert(photo, step=10)  # deterministic DDIM / flow inversion to step 10 of 50
sampler, reward = parts.sampler(50), parts.latent_reward(AestheticReward(head, path=clip_dir))
before = sampler.sample(latent, sdo.NoGrad(), start_step=10)
result = sdo.optimize_latent(sampler, latent, reward, start_step=10, iters=20, lr=0.01)
save_images(parts.decode(before), "edited", "before"), save_images(parts.decode(result.sample), "edited", "after")
