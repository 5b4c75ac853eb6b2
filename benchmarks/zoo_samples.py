"""The README's sample grid: 8 class-conditional DDIM-50 samples per digit from the shipped model (seed 0)."""

import sys

import torch

from sdo import zoo
from sdo.app.plots import save_image_grid

out = sys.argv[1] if len(sys.argv) > 1 else "docs/zoo-samples.png"
unet, judge = zoo.load_unet(), zoo.load_judge()
classes = torch.arange(10).repeat_interleave(8)
samples = zoo.sample_digits(unet, classes, guidance_scale=3.0, steps=50, seed=0)
verdicts = judge(samples).argmax(1)
rows = {f"{digit}": zoo.to_images(samples[classes == digit]) for digit in range(10)}
captions = {f"{digit}": [f"judge: {v}" for v in verdicts[classes == digit].tolist()] for digit in range(10)}
save_image_grid(rows, out, captions)
print(f"judge accuracy on these {len(classes)} samples: {(verdicts == classes).float().mean():.1%}")
