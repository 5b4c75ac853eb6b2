"""LoRA (peft) on the fine-tuned network, and the files a fine-tuning run leaves for others to load.

- ``adapter.safetensors``: sdo's own file (peft tensor names, ``lora_rank``/``lora_targets``/``lora_alpha`` in the
  metadata); ``load_adapter`` reads it into any network, including the embedded zoo ``UNet2DModel``.
- ``pytorch_lora_weights.safetensors``: the file diffusers' ``save_lora_weights`` writes for the pipeline's class
  (keys prefixed ``unet.`` or ``transformer.``, the adapter's rank, alpha and targets in its metadata), so a plain
  ``pipe.load_lora_weights(OUT)`` loads it.
- ``unet/`` or ``transformer/``: a full-weight run's network, written with ``save_pretrained``.
- ``fuse_lora(pipe, OUT)``: the adapter merged into plain weights, peft's wrappers removed, so that
  ``pipe.save_pretrained`` writes a pipeline plain diffusers loads.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from sdo.errors import ConfigError
from sdo.io import DIR_MODE, CorruptFileError, load_tensors, make_dir, save_tensors

__all__ = [
    "ADAPTER_NAME",
    "DIFFUSERS_LORA_NAME",
    "ZOO_LORA_TARGETS",
    "add_lora",
    "fuse_lora",
    "load_adapter",
    "load_trainable",
    "merge_lora",
    "network_of",
    "remove_lora",
    "save_adapter",
    "save_for_diffusers",
    "trainable_state",
]

ADAPTER_NAME = "adapter.safetensors"
DIFFUSERS_LORA_NAME = "pytorch_lora_weights.safetensors"
ZOO_LORA_TARGETS = "to_q,to_k,to_v,to_out.0,conv1,conv2"


def add_lora(network: torch.nn.Module, rank: int, targets: str, alpha: float | None = None) -> torch.nn.Module:
    """Inject LoRA adapters (peft) of ``rank`` and scale ``alpha / rank`` (``alpha`` defaults to ``rank``) into the
    ``targets`` modules (comma-separated names) of ``network``; only they stay trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        target_modules=[t.strip() for t in targets.split(",")],
        init_lora_weights="gaussian",
    )
    network.requires_grad_(False)
    return inject_adapter_in_model(config, network)


def trainable_state(network: torch.nn.Module, lora: bool) -> dict[str, torch.Tensor]:
    """The weights a checkpoint holds: the LoRA tensors (peft naming), or every weight."""
    if lora:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(network)
    return network.state_dict()


def load_trainable(network: torch.nn.Module, weights: dict[str, torch.Tensor], lora: bool, source: object) -> None:
    """Load exactly the trainable tensors into ``network``: a missing, unexpected or mis-shaped tensor is a
    ``CorruptFileError`` naming ``source`` (the file) and the first offending tensor; nothing is loaded then."""
    expected = {name: tuple(value.shape) for name, value in trainable_state(network, lora).items()}
    if not weights:
        raise CorruptFileError(f"{source}: holds no tensors; expected the {len(expected)} trainable tensors.")
    problems = [f"unexpected tensor {name!r}" for name in sorted(set(weights) - set(expected))]
    problems += [f"missing tensor {name!r}" for name in sorted(set(expected) - set(weights))]
    problems += [
        f"tensor {name!r} has shape {tuple(weights[name].shape)}, the model's is {expected[name]}"
        for name in sorted(set(expected) & set(weights))
        if tuple(weights[name].shape) != expected[name]
    ]
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise CorruptFileError(f"{source}: does not fit the model: {problems[0]}{more}.")
    if lora:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(network, weights)
    else:
        network.load_state_dict(weights)


def save_adapter(network: torch.nn.Module, path: str | Path, rank: int, targets: str) -> None:
    """Write ``network``'s trainable weights as sdo's ``adapter.safetensors`` (``rank`` 0: every weight)."""
    metadata = {"lora_rank": str(rank), "lora_targets": targets}
    save_tensors(trainable_state(network, rank > 0), path, metadata=metadata)


def load_adapter(network: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Load ``DIR/adapter.safetensors`` written by ``finetune`` into ``network`` (injecting LoRA when it is one).

    Raises:
        CorruptFileError: the file is damaged, its ``lora_rank`` metadata is missing or not an integer >= 0, its
            LoRA targets are not in ``network``, or its tensors are not exactly the trainable ones (a tensor
            missing, unexpected or of another shape); the message names the file and the first offending key.
    """
    from safetensors import safe_open

    tensors = load_tensors(path)
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() or {}
    if "lora_rank" not in metadata:
        raise CorruptFileError(f"{path}: no 'lora_rank' metadata; not an adapter written by `sdo finetune`.")
    try:
        rank = int(metadata["lora_rank"])
    except ValueError:
        rank = -1
    if rank < 0:
        raise CorruptFileError(f"{path}: metadata 'lora_rank' is {metadata['lora_rank']!r}, not an integer >= 0.")
    if rank:
        try:
            add_lora(network, rank, metadata.get("lora_targets", ZOO_LORA_TARGETS))
        except ValueError as error:
            raise CorruptFileError(f"{path}: metadata 'lora_targets' do not fit the model: {error}") from None
    load_trainable(network, tensors, lora=bool(rank), source=path)
    return network


def network_of(pipe) -> tuple[str, torch.nn.Module]:
    """The denoising network of a diffusers pipeline and its component name: ``transformer`` (SD3, Flux) or
    ``unet`` (SD 1.x/2.x, SDXL)."""
    transformer = getattr(pipe, "transformer", None)
    return ("transformer", transformer) if transformer is not None else ("unet", pipe.unet)


def save_for_diffusers(pipe, network: torch.nn.Module, out: str | Path, lora: bool) -> Path:
    """Write ``network`` (``pipe``'s fine-tuned denoising network) where plain diffusers loads it, atomically.

    LoRA: ``out/pytorch_lora_weights.safetensors`` through the pipeline class's own ``save_lora_weights`` (peft's
    state dict, converted with ``convert_state_dict_to_diffusers`` for a UNet as diffusers' SD/SDXL training scripts
    do, as it is for an SD3/Flux transformer as theirs do; the adapter's rank, alpha and targets as
    ``*_lora_adapter_metadata``), loaded by ``pipe.load_lora_weights(out)``. Full weights:
    ``out/unet/`` or ``out/transformer/`` by ``save_pretrained``, loaded by ``UNet2DConditionModel.from_pretrained``
    (or the transformer's class). Both are written into a temporary folder next to the result, then renamed.
    Returns the path written.
    """
    out = make_dir(out)
    name, _ = network_of(pipe)
    building = Path(tempfile.mkdtemp(prefix=".diffusers.", dir=out))
    os.chmod(building, DIR_MODE)
    try:
        if lora:
            _save_lora_layers(pipe, network, name, building)
            final, written = out / DIFFUSERS_LORA_NAME, building / DIFFUSERS_LORA_NAME
        else:
            network.save_pretrained(building / name, safe_serialization=True)
            final, written = out / name, building / name
            _move_aside(final, out, building)
        os.replace(written, final)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return final


def _move_aside(final: Path, out: Path, building: Path) -> None:
    """Before ``final`` (``out/unet`` or ``out/transformer``) is replaced: move an earlier one into ``building``,
    which is removed afterwards, when ``out`` is an sdo run folder (an earlier run of it wrote it); in any other
    folder sdo does not replace it (``ConfigError``)."""
    from sdo.app.runs import is_sdo_folder

    if not final.exists() and not final.is_symlink():
        return
    if not is_sdo_folder(out):
        raise ConfigError(
            f"{final} exists and {out} is not an sdo run folder; sdo replaces only what it wrote: move it away or "
            "choose another --out."
        )
    os.replace(final, building / f".replaced-{final.name}")


def _save_lora_layers(pipe, network: torch.nn.Module, name: str, folder: Path) -> None:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict

    layers = get_peft_model_state_dict(network)
    if name == "unet":  # as diffusers' own UNet training scripts save; the transformers' loaders take peft keys
        layers = convert_state_dict_to_diffusers(layers)
    options = {f"{name}_lora_layers": layers}
    peft_config = getattr(network, "peft_config", {}).get("default")
    if peft_config is not None:
        options[f"{name}_lora_adapter_metadata"] = peft_config.to_dict()
    type(pipe).save_lora_weights(str(folder), safe_serialization=True, **options)


def merge_lora(network: torch.nn.Module) -> torch.nn.Module:
    """Merge every peft LoRA layer of ``network`` into its base weight and put the plain base module back, so the
    state dict has the base model's keys again (no ``base_layer`` or ``lora_A``); no-op on a plain network."""
    return _unwrap(network, merge=True)


def remove_lora(network: torch.nn.Module) -> torch.nn.Module:
    """Take sdo's LoRA (peft adapter ``default``) out of ``network`` unmerged: the base weights as they were.

    Raises:
        ConfigError: ``network`` holds other adapters (e.g. from ``pipe.load_lora_weights``), which sdo would
            otherwise train on top of or drop; fuse or unload them first.
    """
    names = sorted(getattr(network, "peft_config", {}))
    if names and names != ["default"]:
        raise ConfigError(
            f"The pipeline's network holds LoRA adapters {names}; fuse them into its weights (`pipe.fuse_lora()` "
            "then `pipe.unload_lora_weights()`) or unload them before fine-tuning it."
        )
    return _unwrap(network, merge=False)


def _unwrap(network: torch.nn.Module, merge: bool) -> torch.nn.Module:
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [(name, module) for name, module in network.named_modules() if isinstance(module, BaseTunerLayer)]
    for name, module in wrapped:
        if merge:
            module.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(network.get_submodule(parent_name) if parent_name else network, child, module.get_base_layer())
    if hasattr(network, "peft_config"):
        del network.peft_config
    return network


def fuse_lora(pipe, out: str | Path):
    """``pipe`` with the fine-tuned weights of ``sdo finetune --out out`` in its denoising network, as plain
    weights: the run's ``adapter.safetensors`` is loaded (``load_adapter``) and LoRA merged (``merge_lora``), so
    ``pipe.save_pretrained(DIR)`` writes a pipeline that ``DiffusionPipeline.from_pretrained(DIR)`` loads.
    Returns ``pipe`` (changed in place)."""
    _, network = network_of(pipe)
    load_adapter(network, Path(out) / ADAPTER_NAME)
    merge_lora(network)
    return pipe
