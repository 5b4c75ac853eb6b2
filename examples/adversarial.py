"""Adversarial samples: the reward classifier must see 8s while the independent judge still sees 3s."""

import torch

import sdo
from sdo import zoo
from sdo.rewards import AdversarialReward

unet, attacked, judge = zoo.load_unet(), zoo.load_reward_classifier(), zoo.load_judge()
sampler = sdo.Sampler(zoo.denoiser(unet, torch.full((4,), 3)), zoo.scheduler("ddim"), num_inference_steps=20)
noise = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(2))
with torch.no_grad():
    original = sampler.sample(noise, grad=sdo.NoGrad())

reward = AdversarialReward(attacked, target=8, original=original, proximity=20.0)
result = sdo.optimize_latent(sampler, noise, reward, iters=20, lr=0.05)
print(reward.verdicts(result.sample, judge))  # {"attacked": [...], "judge": [...]}
