"""optimize_latent, inversion, saved latents, and zoo files that are damaged."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

import sdo
from sdo import zoo
from sdo.doodl import edict_sampler
from sdo.errors import ConfigError
from sdo.io import CorruptFileError
from sdo.latent import (
    LatentProblem,
    NonFiniteRewardError,
    invert,
    latent_stepper,
    load_latent,
    optimize_latent,
    save_latent,
)
from sdo.methods import METHODS
from sdo.rewards import ClassifierReward


@pytest.fixture(scope="module")
def unet():
    return zoo.load_unet()


def make_sampler(unet, classes, steps=6):
    return sdo.Sampler(zoo.denoiser(unet, torch.tensor(classes)), zoo.scheduler("ddim"), steps)


def noise(batch, seed=0):
    return torch.randn(batch, 1, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_optimize_latent_raises_the_reward_and_tracks_the_best_iterate(unet):
    sampler = make_sampler(unet, [3, 3])
    reward = ClassifierReward(zoo.load_reward_classifier(), 8)
    result = optimize_latent(sampler, noise(2), reward, iters=4, lr=0.1, progress=False)
    rewards = [record["reward"] for record in result.history]
    assert len(result.history) == 5 and rewards[-1] > rewards[0] + 0.5
    per_sample = torch.tensor([record["rewards"] for record in result.history])
    torch.testing.assert_close(result.best_reward, per_sample.max(dim=0).values)
    assert all(r["seconds"] > 0 for r in result.history[:-1])
    assert not any("peak_mem_bytes" in r for r in result.history)  # measuring is opt-in
    torch.testing.assert_close(reward(result.best_sample), result.best_reward, rtol=1e-5, atol=1e-5)


def test_measure_records_saved_activation_bytes_on_cpu(unet):
    sampler = make_sampler(unet, [3])
    reward = ClassifierReward(zoo.load_reward_classifier(), 8)
    kept = optimize_latent(sampler, noise(1), reward, iters=2, measure=True, progress=False).history
    full = optimize_latent(sampler, noise(1), reward, grad=sdo.Full(), iters=2, measure=True, progress=False).history
    assert [r["mem_kind"] for r in kept[:-1]] == ["cpu saved activations"] * 2
    assert "peak_mem_bytes" not in kept[-1]  # the final evaluation is not an iteration
    # Full keeps the 5 steps' activations, Shortcut one step's: several times more saved bytes.
    assert full[0]["peak_mem_bytes"] > 3 * kept[0]["peak_mem_bytes"] > 0


def test_saved_latent_replays_bit_identically(unet, tmp_path):
    sampler = make_sampler(unet, [1, 7])
    result = optimize_latent(
        sampler, noise(2, 1), ClassifierReward(zoo.load_reward_classifier(), 2), iters=2, progress=False
    )
    save_latent(tmp_path / "z.safetensors", result.latent, steps=6, classes="1,7")
    replay = sampler.sample(load_latent(tmp_path / "z.safetensors"), grad=sdo.NoGrad())
    assert torch.equal(replay, result.sample)


def test_truncated_modes_cannot_optimize_a_latent(unet):
    with pytest.raises(ValueError, match=r"Truncated\(k=2, checkpoint=False\) gives no gradient to the latent"):
        optimize_latent(
            make_sampler(unet, [0]),
            noise(1),
            lambda x, c: x.mean(dim=(1, 2, 3)),
            grad=sdo.Truncated(2),
            iters=1,
            progress=False,
        )


@pytest.mark.parametrize("method", ["adam", "doodl"])
def test_nan_reward_stops_with_the_last_finite_iterate(unet, method):
    """One behaviour for both loops: the error's result holds the run so far, whose latent and sample are the last
    iterate with a finite reward (here iteration 1, after one update), not the failing one."""
    sampler = make_sampler(unet, [5], steps=4)
    calls_per_evaluation = 2 if method == "doodl" else 1  # DOODL scores both EDICT outputs
    calls = []

    def reward(x0, cond):
        calls.append(1)
        value = x0.mean(dim=(1, 2, 3))
        return value if len(calls) <= 2 * calls_per_evaluation else value * float("nan")

    start = noise(1)
    with pytest.raises(NonFiniteRewardError, match="not finite at iteration 2") as caught:
        if method == "doodl":
            sdo.optimize_latent_doodl(edict_sampler(sampler), start, reward, iters=5, lr=10.0, progress=False)
        else:
            optimize_latent(sampler, start, reward, iters=5, lr=0.1, progress=False)
    result = caught.value.result
    assert [r["iter"] for r in result.history] == [0, 1]
    assert not torch.equal(result.latent, start)  # one update was taken
    if method == "doodl":
        replay = edict_sampler(sampler).sample(result.latent, grad=sdo.NoGrad())
    else:
        replay = sampler.sample(result.latent, grad=sdo.NoGrad(), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(replay, result.sample, rtol=0, atol=0)
    if method == "adam":  # DOODL's recorded reward averages the two EDICT outputs
        assert result.history[-1]["reward"] == pytest.approx(float(result.sample.mean()), abs=1e-6)


def test_reward_of_the_wrong_shape_is_refused(unet):
    with pytest.raises(ValueError, match=r"must return a \[batch\] tensor of shape \(1,\)"):
        optimize_latent(make_sampler(unet, [5]), noise(1), lambda x, c: x.sum(), iters=1, progress=False)


def test_ddim_inversion_reconstructs_a_real_digit(unet):
    images, labels = zoo.load_digits()
    x0 = images[labels == 4][:2]
    sampler = make_sampler(unet, [4, 4], steps=25)
    latent = invert(sampler, x0, step=10)
    reconstruction = sampler.sample(latent, grad=sdo.NoGrad(), start_step=10)
    error = (reconstruction - x0).square().mean()
    assert error < 0.02
    assert error < 0.1 * (x0 - images[labels == 1][:2]).square().mean()


def test_inversion_needs_deterministic_ddim(unet):
    sampler = sdo.Sampler(zoo.denoiser(unet, torch.tensor([1])), zoo.scheduler("ddpm"), 5)
    with pytest.raises(ValueError, match="supports the deterministic solvers DDIMScheduler"):
        invert(sampler, torch.zeros(1, 1, 32, 32), 0)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_damaged_weights_give_a_clear_error(tmp_path, damage):
    folder = tmp_path / "zoo"
    shutil.copytree(zoo.WEIGHTS_DIR, folder)
    path = folder / "unet.safetensors"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00\x01 not a safetensors file" * 10)
    else:
        path.unlink()
    with pytest.raises(CorruptFileError, match=r"unet\.safetensors: .*(truncated or corrupt|not found).*train-zoo"):
        zoo.load_unet(folder=folder)


def test_weights_of_another_architecture_are_refused(tmp_path):
    folder = tmp_path / "zoo"
    shutil.copytree(zoo.WEIGHTS_DIR, folder)
    shutil.copy(folder / "judge_classifier.safetensors", folder / "reward_classifier.safetensors")
    with pytest.raises(CorruptFileError, match="weights do not fit RewardNet"):
        zoo.load_reward_classifier(folder=folder)


# issue 28: learning-rate schedules of the Adam run.


def cosine_lrs(lr, iters):
    return [lr * (1 + math.cos(math.pi * k / iters)) / 2 for k in range(iters)]


def adam_stepper(unet, **adam):
    problem = LatentProblem(
        make_sampler(unet, [3], steps=4), noise(1), ClassifierReward(zoo.load_reward_classifier(), 8)
    )
    return latent_stepper(problem, sdo.Shortcut(), lr=0.1, **adam)


def test_cosine_schedule_uses_the_closed_form_lr_at_each_update(unet):
    stepper = adam_stepper(unet, lr_schedule="cosine", iters=4)
    used = []
    for _ in range(4):
        stepper.iterate()
        used.append(stepper.update.optimizer.param_groups[0]["lr"])  # the lr of the update just taken
    assert used == pytest.approx(cosine_lrs(0.1, 4), rel=1e-12)
    assert used == pytest.approx([0.1, 0.0853553390593, 0.05, 0.0146446609407], rel=1e-9)
    with pytest.raises(ConfigError, match=r"`lr_schedule` 'cosine' was set for a run of `iters`=4 updates; update 5"):
        stepper.iterate()  # past the run it was built for: refused, not a silently rising lr
    constant = adam_stepper(unet, iters=4)
    for _ in range(2):
        constant.iterate()
        assert constant.update.optimizer.param_groups[0]["lr"] == 0.1


def test_constant_schedule_is_bit_identical_and_stepping_equals_run(unet):
    sampler, reward = make_sampler(unet, [3], steps=4), ClassifierReward(zoo.load_reward_classifier(), 8)
    plain = optimize_latent(sampler, noise(1), reward, iters=3, lr=0.1, progress=False)
    constant = optimize_latent(sampler, noise(1), reward, iters=3, lr=0.1, lr_schedule="constant", progress=False)
    cosine = optimize_latent(sampler, noise(1), reward, iters=3, lr=0.1, lr_schedule="cosine", progress=False)
    assert [r["rewards"] for r in constant.history] == [r["rewards"] for r in plain.history]
    torch.testing.assert_close(constant.latent, plain.latent, rtol=0, atol=0)
    assert not torch.equal(cosine.latent, plain.latent)  # the schedule reaches the run
    stepped = adam_stepper(unet, lr_schedule="cosine", iters=3)
    for _ in range(3):
        stepped.iterate()
    result = stepped.finish()
    torch.testing.assert_close(result.latent, cosine.latent, rtol=0, atol=0)
    assert [r["rewards"] for r in result.history] == [r["rewards"] for r in cosine.history]


def test_unknown_or_unsized_lr_schedule_is_refused(unet):
    sampler, reward = make_sampler(unet, [3]), ClassifierReward(zoo.load_reward_classifier(), 8)
    with pytest.raises(ConfigError, match=r"`lr_schedule` must be one of constant, cosine, got 'linear'"):
        optimize_latent(sampler, noise(1), reward, iters=2, lr_schedule="linear", progress=False)
    with pytest.raises(ConfigError, match=r"`lr_schedule` 'cosine' needs the run's number of updates \(`iters`\)"):
        adam_stepper(unet, lr_schedule="cosine")


def test_best_so_far_is_each_samples_running_best_and_the_best_latent_is_that_iterate(unet):
    """Record k's ``best_so_far`` is the batch mean of each sample's best reward among iterates 0..k, where iterate
    k is the latent after k updates (the one record k evaluates); the final one is ``best_reward``'s mean, and
    ``best_latent`` is each sample's iterate of that reward (the first, on a tie)."""
    reward = ClassifierReward(zoo.load_reward_classifier(), 8)
    problem = LatentProblem(make_sampler(unet, [3, 5], steps=4), noise(2, 3), reward)
    stepper = latent_stepper(problem, sdo.Shortcut(), lr=1.0)  # large steps: the rewards go up and down
    iterates = []
    for _ in range(4):
        iterates.append(stepper.latent.detach().clone())
        stepper.iterate()
    iterates.append(stepper.latent.detach().clone())
    result = stepper.finish()
    per_sample = torch.tensor([record["rewards"] for record in result.history])  # [iterate, sample]
    running = per_sample.cummax(dim=0).values.mean(dim=1)
    assert [record["best_so_far"] for record in result.history] == pytest.approx(running.tolist(), abs=1e-6)
    assert (running > per_sample.mean(dim=1) + 1e-3).any()  # not the reward itself: some sample fell back
    assert result.history[-1]["best_so_far"] == pytest.approx(float(result.best_reward.mean()), abs=1e-6)
    for sample, k in enumerate(per_sample.argmax(dim=0).tolist()):
        assert torch.equal(result.best_latent[sample], iterates[k][sample])


def test_freedom_keeps_no_best_its_best_so_far_is_its_reward(unet):
    reward = ClassifierReward(zoo.load_reward_classifier(), 8)
    problem = LatentProblem(make_sampler(unet, [3], steps=4), noise(1), reward)
    result = METHODS["freedom"].optimize(problem, iters=1, progress=False)
    assert [r["best_so_far"] for r in result.history] == [r["reward"] for r in result.history]
    assert result.history[-1]["best_so_far"] == pytest.approx(float(result.best_reward.mean()), abs=1e-6)
