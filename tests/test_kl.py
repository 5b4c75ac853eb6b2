"""The base-model regularizer of fine-tuning (``--kl-weight``): zero at initialization, positive after an update."""

from __future__ import annotations

import json

import pytest
import torch

from sdo import zoo
from sdo.app.finetuning import FinetuneConfig, add_lora, finetune
from sdo.errors import ConfigError
from sdo.gradients import Full, NoGrad, Shortcut, Truncated
from sdo.kl import TrajectoryKL, adapters_disabled


def test_kl_is_zero_at_initialization_and_positive_after_an_update(tmp_path):
    config = FinetuneConfig(
        task="bold",
        steps=3,
        sample_steps=4,
        batch_size=2,
        eval_every=0,
        eval_per_class=1,
        lr=1e-2,
        kl_weight=1.0,
        out=str(tmp_path / "kl"),
    )
    finetune(config, progress=False)
    records = [json.loads(line) for line in (tmp_path / "kl" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["kl"] == 0.0  # LoRA's B starts at zero: the fine-tuned model is the base model
    assert records[1]["kl"] > 0 and records[2]["kl"] > 0


@pytest.mark.parametrize("grad", [Full(), Shortcut(step="random"), Truncated(2)], ids=repr)
def test_the_penalty_is_recorded_at_the_trained_steps_and_reaches_the_adapter(grad):
    unet = add_lora(zoo.load_unet(), rank=2, targets="to_q,to_v")
    for name, parameter in unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 7])
    sampler = zoo.ddim_sampler(unet, labels, steps=4)
    model_fn = sampler.model_fn

    def base_fn(x, t):
        with adapters_disabled(unet):
            return model_fn(x, t)

    kl = TrajectoryKL(model_fn, base_fn)
    wrapped = type(sampler)(kl, sampler.scheduler, 4)
    wrapped.sample(zoo.noise(2, 0), grad=grad, generator=torch.Generator().manual_seed(0))
    expected = {"Full": 4, "Shortcut": 1, "Truncated": 2}[type(grad).__name__]
    assert len(kl.terms) == expected
    penalty = kl.penalty()
    assert penalty.shape == (2,) and (penalty > 0).all()
    lora = [p for name, p in unet.named_parameters() if "lora_" in name]
    assert all(p.requires_grad for p in lora)  # restored after each base forward
    grads = torch.autograd.grad(penalty.sum(), lora, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    wrapped.sample(zoo.noise(2, 0), grad=NoGrad())
    assert len(kl.terms) == expected  # no longer recording


def test_negative_kl_weight_is_refused():
    with pytest.raises(ConfigError, match="kl_weight"):
        FinetuneConfig(kl_weight=-1.0)
