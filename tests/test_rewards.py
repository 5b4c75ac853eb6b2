"""Built-in rewards: exact values, gradients, and the reference/verdict properties the tasks rely on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sdo import zoo
from sdo.rewards import AdversarialReward, ClassifierReward, StyleReward, gram_matrix, latent_prior


@pytest.fixture(scope="module")
def digits():
    images, labels = zoo.load_digits()
    return images[::50][:6], labels[::50][:6]


@pytest.fixture(scope="module")
def reward_net():
    return zoo.load_reward_classifier()


def test_classifier_reward_is_the_target_log_probability(digits, reward_net):
    images, _ = digits
    x = images.clone().requires_grad_()
    rewards = ClassifierReward(reward_net, 8)(x)
    torch.testing.assert_close(rewards, F.log_softmax(reward_net(images), dim=1)[:, 8])
    (gradient,) = torch.autograd.grad(rewards.sum(), x)
    assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0
    with pytest.raises(ValueError, match=r"`target` must be a class index or a \[batch\] tensor"):
        ClassifierReward(reward_net, torch.tensor([1, 2]))(images)


def test_style_reward_is_zero_for_the_reference_and_negative_elsewhere(digits, reward_net):
    images, _ = digits
    reward = StyleReward(reward_net, images[:1])
    assert reward(images[:1]).item() == 0.0
    others = reward(images[1:])
    assert (others < 0).all()
    expected = sum(
        (gram_matrix(f) - gram_matrix(r)).square().sum(dim=(1, 2))
        for f, r in zip(reward_net.features(images[1:]), reward_net.features(images[:1]), strict=True)
    )
    torch.testing.assert_close(others, -1e3 * expected)


def test_gram_matrix_closed_form():
    features = torch.arange(8.0).reshape(1, 2, 2, 2)
    flat = features.reshape(2, 4)
    torch.testing.assert_close(gram_matrix(features)[0], flat @ flat.T / 8)


def test_adversarial_reward_and_both_verdicts(digits, reward_net):
    images, labels = digits
    judge = zoo.load_judge()
    moved = images + 0.1
    reward = AdversarialReward(reward_net, 8, images, proximity=20.0)
    expected = F.log_softmax(reward_net(moved), dim=1)[:, 8] - 20.0 * 0.01
    torch.testing.assert_close(reward(moved), expected)
    verdicts = reward.verdicts(images, judge)
    assert set(verdicts) == {"attacked", "judge"}
    assert torch.equal(verdicts["judge"], judge(images).argmax(1))
    assert (verdicts["attacked"] == labels).float().mean() >= 0.8  # real digits: the classifiers agree with labels
    with pytest.raises(ValueError, match="`x0` has shape"):
        reward(images[:2])


def test_latent_prior_is_zero_on_the_gaussian_shell():
    direction = torch.randn(3, 4, 4, 4)
    on_shell = direction / direction.flatten(1).norm(dim=1)[:, None, None, None] * 64**0.5
    torch.testing.assert_close(latent_prior(on_shell), torch.zeros(3), atol=1e-6, rtol=0)
    assert latent_prior(2 * on_shell) == pytest.approx(1.0, rel=1e-5)  # (2 sqrt(d) - sqrt(d))^2 / d
