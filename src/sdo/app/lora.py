"""LoRA (peft) on the fine-tuned network, and the files a fine-tuning run leaves for others to load.

- ``sdo/adapter.safetensors``: sdo's own file (peft tensor names; ``lora_rank``, ``lora_targets`` and the
  network's class ``network`` in the metadata); ``load_adapter`` reads it into any network, including the embedded
  zoo ``UNet2DModel``. It sits in the subfolder ``sdo/`` so that diffusers' ``pipe.load_lora_weights(OUT)``, which
  takes a folder's only top-level ``*.safetensors`` when ``pytorch_lora_weights.safetensors`` is absent, never
  picks it up; run folders written before it moved there hold it as ``OUT/adapter.safetensors``, still read.
- ``pytorch_lora_weights.safetensors``: the file diffusers' ``save_lora_weights`` writes for the pipeline's class
  (keys prefixed ``unet.`` or ``transformer.``, the adapter's rank, alpha and targets in its metadata), so a plain
  ``pipe.load_lora_weights(OUT)`` loads it. It is the first final file a run writes; an OUT without it has no
  top-level ``*.safetensors``, so ``load_lora_weights`` raises there rather than load nothing.
- ``unet/`` or ``transformer/``: a full-weight run's network, written with ``save_pretrained``.
- ``fuse_lora(pipe, OUT)``: the adapter merged into plain weights, peft's wrappers removed, so that
  ``pipe.save_pretrained`` writes a pipeline plain diffusers loads. The adapter is checked against the network
  (class, LoRA targets, rank, every tensor's name and shape) before the network is touched, so a refused one
  leaves ``pipe`` as it was.

A network into which sdo fused an adapter (``fuse_lora``, or ``finetune``'s ``save_pipeline``) carries the
attribute ``sdo_fused`` (``FUSED_MARK``): ``{"adapter": path of the adapter file, "sha256": its digest}``. A
second ``fuse_lora`` on it, and fine-tuning it further, are refused: either would apply the fine-tuning twice.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

import torch

from sdo.errors import ConfigError, MissingWeightsError
from sdo.io import DIR_MODE, CorruptFileError, file_sha256, load_tensors, make_dir, save_tensors

__all__ = [
    "ADAPTER_FOLDER",
    "ADAPTER_NAME",
    "DIFFUSERS_LORA_NAME",
    "FUSED_MARK",
    "ZOO_LORA_TARGETS",
    "adapter_file",
    "add_lora",
    "check_not_fused",
    "find_adapter",
    "fuse_lora",
    "load_adapter",
    "load_trainable",
    "mark_fused",
    "merge_lora",
    "meta_copy",
    "network_of",
    "remove_lora",
    "remove_old_adapter",
    "save_adapter",
    "save_for_diffusers",
    "trainable_state",
]

ADAPTER_FOLDER = "sdo"
"""The subfolder of a run's ``--out`` that holds sdo's own adapter file (out of diffusers' sight)."""
ADAPTER_NAME = "adapter.safetensors"
"""The name of sdo's adapter file: ``OUT/sdo/adapter.safetensors`` (``OUT/adapter.safetensors`` in older runs)."""
DIFFUSERS_LORA_NAME = "pytorch_lora_weights.safetensors"
FUSED_MARK = "sdo_fused"
"""The attribute sdo sets on a network into which it fused an adapter: ``{"adapter": path, "sha256": digest}``."""
ZOO_LORA_TARGETS = "to_q,to_k,to_v,to_out.0,conv1,conv2"


def adapter_file(out: str | Path) -> Path:
    """Where a run with ``--out out`` writes sdo's adapter: ``out/sdo/adapter.safetensors``."""
    return Path(out) / ADAPTER_FOLDER / ADAPTER_NAME


def find_adapter(path: str | Path) -> Path:
    """sdo's adapter file for ``path``: ``path`` itself when it is not a folder; for a run folder
    ``path/sdo/adapter.safetensors``, else the older ``path/adapter.safetensors``.

    Raises:
        MissingWeightsError: ``path`` is a folder holding neither file.
    """
    path = Path(path)
    if not path.is_dir():
        return path
    for candidate in (adapter_file(path), path / ADAPTER_NAME):
        if candidate.is_file():
            return candidate
    raise MissingWeightsError(
        f"{path}: holds no sdo adapter ({ADAPTER_FOLDER}/{ADAPTER_NAME} or {ADAPTER_NAME}); pass the --out folder "
        "of a finished `sdo finetune` run."
    )


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
    _check_fits(weights, expected, source)
    if lora:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(network, weights)
    else:
        network.load_state_dict(weights)


def remove_old_adapter(out: str | Path) -> None:
    """Remove ``out/adapter.safetensors`` when an earlier sdo run of this folder wrote it there (its metadata
    has ``lora_rank``): the adapter now lives in ``out/sdo/``, and a loose top-level ``*.safetensors`` is what
    diffusers' ``load_lora_weights(out)`` would pick up. Any other file of that name is left alone."""
    from safetensors import SafetensorError, safe_open

    old = Path(out) / ADAPTER_NAME
    if not old.is_file():
        return
    try:
        with safe_open(str(old), "pt") as handle:
            written_by_sdo = "lora_rank" in (handle.metadata() or {})
    except (OSError, SafetensorError):
        return
    if written_by_sdo:
        old.unlink()


def _check_fits(weights: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], source: object) -> None:
    """Refuse ``weights`` unless their names and shapes are exactly ``expected`` (``CorruptFileError`` naming
    ``source`` and the first offending tensor)."""
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


def save_adapter(network: torch.nn.Module, path: str | Path, rank: int, targets: str) -> None:
    """Write ``network``'s trainable weights as sdo's adapter file (``rank`` 0: every weight), with its rank,
    LoRA targets and the network's class in the metadata."""
    metadata = {"lora_rank": str(rank), "lora_targets": targets, "network": _class_name(network)}
    save_tensors(trainable_state(network, rank > 0), path, metadata=metadata)


def load_adapter(network: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Load sdo's adapter written by ``finetune`` into ``network`` (injecting LoRA when it is one): ``path`` is the
    file, or a run's ``--out`` folder (``OUT/sdo/adapter.safetensors``, or ``OUT/adapter.safetensors`` of older
    runs). Everything is checked before ``network`` is touched; a refused adapter leaves it as it was.

    Raises:
        MissingWeightsError: ``path`` is a folder without an adapter.
        CorruptFileError: the file is damaged, its ``lora_rank`` metadata is missing or not an integer >= 0, it was
            trained on another class of network, its LoRA targets are not in ``network``, or its tensors are not
            exactly the trainable ones (a tensor missing, unexpected or of another shape, as another rank gives);
            the message names the file and the first offending key.
    """
    path = find_adapter(path)
    tensors = load_tensors(path)
    rank, targets = _check_adapter(network, tensors, path)
    if rank:
        add_lora(network, rank, targets)
    load_trainable(network, tensors, lora=bool(rank), source=path)
    return network


def _check_adapter(network: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> tuple[int, str]:
    """The adapter's rank and LoRA targets, once its metadata and tensors are known to fit ``network`` exactly
    (else ``CorruptFileError``); ``network`` is not touched."""
    from safetensors import safe_open

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
    trained_on = metadata.get("network")
    if trained_on and trained_on != _class_name(network):
        raise CorruptFileError(
            f"{path}: an adapter of a {trained_on}, this network is a {_class_name(network)}; load it into the "
            "model family the run fine-tuned."
        )
    targets = metadata.get("lora_targets", ZOO_LORA_TARGETS)
    if not rank:
        expected = {name: tuple(value.shape) for name, value in network.state_dict().items()}
    else:
        skeleton = meta_copy(network)
        try:
            add_lora(skeleton, rank, targets)
        except ValueError as error:
            raise CorruptFileError(f"{path}: metadata 'lora_targets' do not fit the model: {error}") from None
        expected = {name: tuple(value.shape) for name, value in trainable_state(skeleton, True).items()}
    _check_fits(tensors, expected, path)
    return rank, targets


def meta_copy(network: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``network``'s modules whose weights are on the ``meta`` device (no memory, no values): what
    injecting LoRA would make of it, without touching it. Accelerate's offload hooks are left out of the copy."""
    memo: dict[int, object] = {}
    for tensor in (*network.parameters(), *network.buffers()):
        empty = torch.empty_like(tensor, device="meta")
        is_parameter = isinstance(tensor, torch.nn.Parameter)
        memo[id(tensor)] = torch.nn.Parameter(empty, requires_grad=tensor.requires_grad) if is_parameter else empty
    for module in network.modules():
        hook = getattr(module, "_hf_hook", None)
        if hook is not None:
            memo[id(hook)] = None
    return copy.deepcopy(network, memo)


def _class_name(network: torch.nn.Module) -> str:
    """The class of ``network`` (of the module ``torch.compile`` wraps)."""
    return type(getattr(network, "_orig_mod", network)).__name__


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


def mark_fused(network: torch.nn.Module, adapter: str | Path) -> None:
    """Mark ``network`` as holding the fused adapter file ``adapter``: its ``FUSED_MARK`` attribute
    ``{"adapter": path, "sha256": digest}``, which ``check_not_fused`` refuses."""
    setattr(network, FUSED_MARK, {"adapter": str(adapter), "sha256": file_sha256(adapter)})


def check_not_fused(network: torch.nn.Module, doing: str) -> None:
    """Refuse (``ConfigError``, one line) to do ``doing`` on a network into which sdo already fused an adapter:
    it would apply the fine-tuning twice."""
    mark = getattr(network, FUSED_MARK, None)
    if mark:
        raise ConfigError(
            f"{doing}: the pipeline already holds a fused sdo adapter ({mark.get('adapter')}), which this would "
            "apply twice; reload the base pipeline (DiffusionPipeline.from_pretrained) and use that."
        )


def fuse_lora(pipe, out: str | Path):
    """``pipe`` with the fine-tuned weights of ``sdo finetune --out out`` in its denoising network, as plain
    weights: the run's adapter (``out`` a run folder or the adapter file) is loaded (``load_adapter``) and LoRA
    merged (``merge_lora``), so ``pipe.save_pretrained(DIR)`` writes a pipeline that
    ``DiffusionPipeline.from_pretrained(DIR)`` loads. The network is then marked (its ``sdo_fused`` attribute,
    ``FUSED_MARK``). Returns ``pipe`` (changed in place).

    Raises:
        ConfigError: ``pipe`` already holds an adapter sdo fused, or LoRA adapters other than sdo's (e.g. from
            ``pipe.load_lora_weights``), which merging would fuse too.
        MissingWeightsError, CorruptFileError: as ``load_adapter``: no adapter in ``out``, or one that does not fit
            ``pipe``'s network; ``pipe`` is left unchanged then.
    """
    _, network = network_of(pipe)
    check_not_fused(network, "fuse_lora")
    others = sorted(set(getattr(network, "peft_config", {})) - {"default"})
    if others:
        raise ConfigError(
            f"fuse_lora: the pipeline's network holds LoRA adapters {others}, which merging would fuse too; "
            "`pipe.unload_lora_weights()` first, or fuse them with `pipe.fuse_lora()` yourself."
        )
    path = find_adapter(out)
    load_adapter(network, path)
    merge_lora(network)
    mark_fused(network, path)
    return pipe
