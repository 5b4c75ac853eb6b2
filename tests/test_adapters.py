"""Adapters are never half-applied (issue 26, Deliver 7 and the fused-pipeline part of 2): ``fuse_lora`` checks an
adapter before touching the pipeline, fusing twice or training a fused pipeline again is refused, and sdo's own
adapter file is out of diffusers' sight (``OUT/sdo/adapter.safetensors``); on the tiny random SD pipeline."""

from __future__ import annotations

import shutil

import pytest
import torch

import sdo
from sdo.app import finetuning
from sdo.app.finetuning import FinetuneConfig, finetune
from sdo.app.lora import (
    DIFFUSERS_LORA_NAME,
    ZOO_LORA_TARGETS,
    add_lora,
    fuse_lora,
    load_adapter,
    remove_old_adapter,
    save_adapter,
    trainable_state,
)
from sdo.errors import ConfigError, CorruptFileError, MissingWeightsError
from sdo.io import save_tensors
from tiny_pipelines import PROMPT, load

transformers = pytest.importorskip("transformers")

SMALL = dict(steps=1, sample_steps=2, batch_size=2, eval_every=0, lora_rank=2, lr=5e-2)
TARGETS = "to_q,to_k,to_v,to_out.0"


def brightness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    return images.mean(dim=(1, 2, 3))


def snapshot(network: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list[bool]]:
    """The network's state dict (keys and values, copied) and its parameters' ``requires_grad`` flags."""
    return {k: v.clone() for k, v in network.state_dict().items()}, [p.requires_grad for p in network.parameters()]


def assert_unchanged(network: torch.nn.Module, before) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    state, flags = snapshot(network)
    assert list(state) == list(before[0]) and all(torch.equal(state[k], before[0][k]) for k in state)
    assert flags == before[1]
    assert not any(isinstance(m, BaseTunerLayer) for m in network.modules()) and not hasattr(network, "peft_config")


@pytest.fixture(scope="module")
def lora_run(pipeline_dir, tmp_path_factory):
    """A LoRA run with --save-pipeline: ``(out, the trained pipeline object, whether the LoRA file existed when
    sdo's adapter was written)``."""
    root = tmp_path_factory.mktemp("adapters")
    config = FinetuneConfig(**SMALL, out=str(root / "ft"), save_pipeline=str(root / "fused"))
    written_first = []

    def save_adapter_after_lora(network, path, rank, targets):
        written_first.append((root / "ft" / DIFFUSERS_LORA_NAME).is_file())
        save_adapter(network, path, rank, targets)

    pipe = load(pipeline_dir)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(finetuning, "save_adapter", save_adapter_after_lora)
        finetune(config, reward=brightness, pipeline=pipe, prompts=[PROMPT], progress=False)
    return root / "ft", pipe, written_first


@pytest.fixture(scope="module")
def fused_state(lora_run, pipeline_dir):
    """The UNet state dict of the run's adapter fused into a freshly loaded pipeline."""
    return fuse_lora(load(pipeline_dir), lora_run[0]).unet.state_dict()


def wrong_adapter(kind: str, folder, pipeline_dir):
    """A run folder whose adapter does not fit the SD pipeline's UNet."""
    path = folder / "sdo" / "adapter.safetensors"
    if kind in ("zoo", "zoo-without-class"):  # a run of the embedded model
        tensors = trainable_state(add_lora(sdo.zoo.load_unet(), 2, ZOO_LORA_TARGETS), True)
        metadata = {"lora_rank": "2", "lora_targets": ZOO_LORA_TARGETS}
        if kind == "zoo":
            metadata["network"] = "UNet2DModel"
    else:
        tensors = trainable_state(add_lora(load(pipeline_dir).unet, 2, TARGETS), True)
        metadata = {
            "lora_rank": "3" if kind == "rank" else "2",
            "lora_targets": "nowhere" if kind == "targets" else TARGETS,
        }
    save_tensors(tensors, path, metadata=metadata)
    return folder


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("zoo", r"an adapter of a UNet2DModel, this network is a UNet2DConditionModel"),
        ("zoo-without-class", r"does not fit the model: (unexpected|missing) tensor"),
        ("rank", r"does not fit the model: tensor '.*' has shape \(2, .*the model's is \(3,"),
        ("targets", r"metadata 'lora_targets' do not fit the model"),
    ],
)
def test_refused_fuse_leaves_the_pipeline_as_it_was_and_the_right_one_fuses(
    lora_run, fused_state, pipeline_dir, tmp_path, kind, match
):
    out, _, _ = lora_run
    pipe = load(pipeline_dir)
    before = snapshot(pipe.unet)
    with pytest.raises(CorruptFileError, match=rf"adapter\.safetensors: {match}"):
        fuse_lora(pipe, wrong_adapter(kind, tmp_path / "wrong", pipeline_dir))
    assert_unchanged(pipe.unet, before)

    fuse_lora(pipe, out)  # the right one now fuses, exactly as into a fresh pipeline
    assert all(torch.equal(value, fused_state[key]) for key, value in pipe.unet.state_dict().items())


def test_fusing_twice_is_refused_and_the_pipeline_is_marked(lora_run, pipeline_dir):
    import hashlib

    out, _, _ = lora_run
    pipe = fuse_lora(load(pipeline_dir), out)  # the network holds the same weights as fused_state
    adapter = out / "sdo" / "adapter.safetensors"
    assert pipe.unet.sdo_fused == {"adapter": str(adapter), "sha256": hashlib.sha256(adapter.read_bytes()).hexdigest()}
    before = snapshot(pipe.unet)
    with pytest.raises(ConfigError, match=r"^fuse_lora: the pipeline already holds a fused sdo adapter \(.*adapter"):
        fuse_lora(pipe, out)
    assert_unchanged(pipe.unet, before)  # not 2x the delta


def test_fuse_refuses_a_pipeline_holding_other_lora_adapters(lora_run, pipeline_dir):
    out, _, _ = lora_run
    pipe = load(pipeline_dir)
    pipe.load_lora_weights(out)
    with pytest.raises(ConfigError, match=r"holds LoRA adapters \['default_0'\], which merging would fuse too"):
        fuse_lora(pipe, out)
    assert not hasattr(pipe.unet, "sdo_fused")


def test_a_fused_pipeline_is_refused_as_a_base_for_more_training(lora_run):
    out, pipe, _ = lora_run
    assert pipe.unet.sdo_fused["adapter"] == str(out / "sdo" / "adapter.safetensors")  # --save-pipeline fused it
    before = snapshot(pipe.unet)
    longer = FinetuneConfig(**{**SMALL, "steps": 2}, out=str(out))
    with pytest.raises(ConfigError, match=r"^finetune\(pipeline=pipe\): the pipeline already holds a fused sdo"):
        finetune(longer, reward=brightness, pipeline=pipe, prompts=[PROMPT], progress=False)
    with pytest.raises(ConfigError, match="reload the base pipeline"):
        fuse_lora(pipe, out)
    assert_unchanged(pipe.unet, before)


def test_diffusers_sees_only_the_lora_file(lora_run, pipeline_dir, tmp_path):
    out, _, written_first = lora_run
    assert written_first == [True]  # pytorch_lora_weights.safetensors was written before sdo's adapter
    assert sorted(p.name for p in out.glob("*.safetensors")) == [DIFFUSERS_LORA_NAME]
    assert (out / "sdo" / "adapter.safetensors").is_file()

    cut = shutil.copytree(out, tmp_path / "cut")  # as if killed before the LoRA file was written
    (cut / DIFFUSERS_LORA_NAME).unlink()
    with pytest.raises(OSError, match="no file named pytorch_lora_weights"):
        load(pipeline_dir).load_lora_weights(cut)


def test_a_full_weight_run_leaves_nothing_for_load_lora_weights(pipeline_dir, tmp_path):
    config = FinetuneConfig(**{**SMALL, "lora_rank": 0, "lr": 1e-3}, out=str(tmp_path / "full"))
    finetune(config, reward=brightness, pipeline=load(pipeline_dir), prompts=[PROMPT], progress=False)
    out = tmp_path / "full"
    assert not list(out.glob("*.safetensors")) and (out / "unet").is_dir()
    with pytest.raises(OSError, match="no file named pytorch_lora_weights"):
        load(pipeline_dir).load_lora_weights(out)
    tuned = load_adapter(load(pipeline_dir).unet, out)  # sdo's own file, found from the run folder
    assert any(not torch.equal(v, load(pipeline_dir).unet.state_dict()[k]) for k, v in tuned.state_dict().items())


def test_folders_of_the_old_layout_still_load(lora_run, fused_state, pipeline_dir, tmp_path):
    out, _, _ = lora_run
    old = shutil.copytree(out, tmp_path / "old")
    (old / "sdo" / "adapter.safetensors").rename(old / "adapter.safetensors")
    (old / "sdo").rmdir()
    fused = fuse_lora(load(pipeline_dir), old).unet.state_dict()
    assert all(torch.equal(value, fused_state[key]) for key, value in fused.items())
    with pytest.raises(MissingWeightsError, match=r"holds no sdo adapter \(sdo/adapter.safetensors or adapter"):
        load_adapter(load(pipeline_dir).unet, tmp_path)

    remove_old_adapter(old)  # a rerun into the old folder: sdo's stale top-level file goes
    assert not (old / "adapter.safetensors").exists()
    save_tensors({"w": torch.zeros(1)}, old / "adapter.safetensors")  # not sdo's: left alone
    remove_old_adapter(old)
    assert (old / "adapter.safetensors").is_file()
