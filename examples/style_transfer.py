"""Give generated digits the stroke style of a real one: Gram matrices of classifier features (the paper's style
task), optimizing the latent at step 10 of 20 after a no-grad warm-up."""

import torch

import sdo
from sdo import zoo
from sdo.rewards import StyleReward

unet, features = zoo.load_unet(), zoo.load_reward_classifier()
images, labels = zoo.load_digits()
reward = StyleReward(features, images[labels == 0][:1])

sampler = sdo.Sampler(zoo.denoiser(unet, torch.full((4,), 7)), zoo.scheduler("ddim"), num_inference_steps=20)
noise = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    latent = sampler.sample(noise, grad=sdo.NoGrad(), stop_step=10)  # the warm-up: steps 0..9
result = sdo.optimize_latent(sampler, latent, reward, start_step=10, iters=15, lr=0.05)
print("style reward:", round(result.history[0]["reward"], 4), "->", round(result.history[-1]["reward"], 4))
