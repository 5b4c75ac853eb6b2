"""DDIM-invert a real digit to the latent at step 8 of 20, then push it towards class 9 from there."""

import torch

import sdo
from sdo import zoo
from sdo.rewards import ClassifierReward

unet, classifier, judge = zoo.load_unet(), zoo.load_reward_classifier(), zoo.load_judge()
images, labels = zoo.load_digits()
real = images[labels == 4][:2]
sampler = sdo.Sampler(zoo.denoiser(unet, torch.tensor([4, 4])), zoo.scheduler("ddim"), num_inference_steps=20)

latent = sdo.invert(sampler, real, step=8)
result = sdo.optimize_latent(
    sampler, latent, ClassifierReward(classifier, 9), start_step=8, iters=15, lr=0.05, prior_weight=0.0
)
print("judge:", judge(result.sample).argmax(1).tolist())
