"""The diffusers adapter: classifier-free guidance in one batched call, conditioning gradients."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

import sdo
from tiny_pipelines import tiny_conditional_unet, tiny_unet


def count_calls(module):
    calls = []
    module.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    return calls


def test_class_guidance_is_one_batched_call_and_matches_two_calls():
    unet = tiny_unet()
    labels = torch.tensor([1, 4, 9])
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    t = torch.tensor(500)
    denoiser = sdo.Denoiser(unet, class_labels=labels, null_class_label=10, guidance_scale=3.0)
    calls = count_calls(unet)
    guided = denoiser(x, t)
    assert calls == [6]
    cond = unet(x, t, class_labels=labels).sample
    uncond = unet(x, t, class_labels=torch.full_like(labels, 10)).sample
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond), rtol=1e-10, atol=1e-12)


def test_scale_one_is_a_single_conditional_call():
    unet = tiny_unet()
    labels = torch.tensor([2])
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    calls = count_calls(unet)
    out = sdo.Denoiser(unet, class_labels=labels, null_class_label=10)(x, torch.tensor(10))
    assert calls == [1]
    torch.testing.assert_close(out, unet(x, torch.tensor(10), class_labels=labels).sample)


def test_text_guidance_and_embedding_gradient_through_the_shortcut():
    unet = tiny_conditional_unet()
    embeds = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    negative = torch.zeros(1, 3, 8, dtype=torch.float64)
    denoiser = sdo.Denoiser(
        unet, encoder_hidden_states=embeds, negative_encoder_hidden_states=negative, guidance_scale=5.0
    )
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor(300)
    cond = unet(x, t, encoder_hidden_states=embeds).sample
    uncond = unet(x, t, encoder_hidden_states=negative.expand(2, 3, 8)).sample
    torch.testing.assert_close(denoiser(x, t), uncond + 5.0 * (cond - uncond), rtol=1e-10, atol=1e-12)

    sampler = sdo.Sampler(denoiser, DDIMScheduler(clip_sample=False), 4)
    (grad_shortcut,) = torch.autograd.grad(sampler.sample(x, grad=sdo.Shortcut()).sum(), embeds)
    (grad_nograd_net,) = torch.autograd.grad(sampler.sample(x, grad=sdo.Shortcut(step="last")).sum(), embeds)
    assert grad_shortcut.abs().sum() > 0 and grad_nograd_net.abs().sum() > 0
    assert not torch.allclose(grad_shortcut, grad_nograd_net)  # the kept step decides where the gradient enters


def test_guidance_without_an_unconditional_input_is_refused():
    with pytest.raises(ValueError, match="needs an unconditional input"):
        sdo.Denoiser(torch.nn.Identity(), class_labels=torch.tensor([1]), guidance_scale=2.0)


def test_batch_mismatch_is_refused():
    denoiser = sdo.Denoiser(tiny_unet(), class_labels=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="batch size 2 but `x` has 3"):
        denoiser(torch.zeros(3, 1, 8, 8, dtype=torch.float64), torch.tensor(1))
