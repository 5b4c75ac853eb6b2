"""Steer generated 3s into 8s by optimizing their initial noise with the SDO one-step gradient."""

import torch

import sdo
from sdo import zoo
from sdo.rewards import ClassifierReward

unet, classifier, judge = zoo.load_unet(), zoo.load_reward_classifier(), zoo.load_judge()
sampler = sdo.Sampler(zoo.denoiser(unet, torch.full((4,), 3)), zoo.scheduler("ddim"), num_inference_steps=20)
noise = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))

reward = ClassifierReward(classifier, 8, views=4)  # averaged over 4 shifted copies: fewer pixel-level exploits
result = sdo.optimize_latent(sampler, noise, reward, grad=sdo.Shortcut(), iters=15, lr=0.05, project_to_shell=True)
print("judge says:", judge(result.sample).argmax(1).tolist())
print("reward per iteration:", [round(r["reward"], 3) for r in result.history])
