"""The public surface: ``sdo.__all__`` is the library's entry points (about 20, ``finetune`` / ``FinetuneConfig``
included); errors, result types and protocols stay importable as ``sdo.X``; the three protocols a user implements
are typed once and structural."""

from __future__ import annotations

import importlib
import inspect
import typing

import pytest
import torch

import sdo
import sdo.edict
import sdo.errors
import sdo.kl

ENTRY_POINTS = {
    "Adjoint",
    "AlignProp",
    "Checkpointed",
    "Denoiser",
    "EDICTSampler",
    "FinetuneConfig",
    "Full",
    "Invertible",
    "NoGrad",
    "RandomTruncation",
    "Sampler",
    "Shortcut",
    "Truncated",
    "finetune",
    "freedom_sample",
    "from_pipeline",
    "invert",
    "load_latent",
    "optimize_latent",
    "optimize_latent_doodl",
    "save_latent",
}
# Importable as `sdo.X` for code written against earlier versions, but not entry points: errors (home `sdo.errors`),
# result and statistics types, the gradient modes' base type, the protocols a user's callables satisfy.
NOT_ENTRY_POINTS = {
    "ConfigError": "errors",
    "CorruptFileError": "errors",
    "MissingExtraError": "errors",
    "MissingWeightsError": "errors",
    "NonFiniteRewardError": "errors",
    "OutputLockedError": "errors",
    "ResumeMismatchError": "errors",
    "SdoError": "errors",
    "WriteFailedError": "errors",
    "AdjointStats": "adjoint",
    "GuidanceResult": "freedom",
    "OptimizationResult": "latent",
    "GradientMode": "gradients",
    "ImageReward": "protocols",
    "LatentReward": "protocols",
    "ModelFn": "protocols",
}


def test_all_is_the_library_entry_points_plus_the_two_finetuning_names():
    assert set(sdo.__all__) == ENTRY_POINTS and len(sdo.__all__) == len(ENTRY_POINTS) == 21
    assert sdo.__all__ == sorted(sdo.__all__, key=lambda name: (name[0].islower(), name))
    assert all(getattr(sdo, name).__doc__ for name in sdo.__all__)


@pytest.mark.parametrize("name", sorted(NOT_ENTRY_POINTS))
def test_errors_results_and_types_leave_all_and_keep_working(name):
    module = importlib.import_module(f"sdo.{NOT_ENTRY_POINTS[name]}")
    assert name not in sdo.__all__
    assert getattr(sdo, name) is getattr(module, name)
    if NOT_ENTRY_POINTS[name] == "errors":
        assert name in sdo.errors.__all__ and issubclass(getattr(sdo, name), sdo.errors.SdoError)


def test_unknown_names_still_raise_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        sdo.nothing  # noqa: B018


@pytest.mark.parametrize(
    ("protocol", "arguments"),
    [(sdo.ModelFn, ["x", "t"]), (sdo.LatentReward, ["x0", "cond"]), (sdo.ImageReward, ["images", "prompts"])],
)
def test_protocols_are_structural_with_positional_arguments(protocol, arguments):
    assert typing.Protocol in protocol.__mro__
    hints = typing.get_type_hints(protocol.__call__)
    assert list(hints) == [*arguments, "return"] and hints["return"] is torch.Tensor
    assert hints[arguments[0]] is torch.Tensor
    parameters = list(inspect.signature(protocol.__call__).parameters.values())[1:]
    assert [p.kind for p in parameters] == [inspect.Parameter.POSITIONAL_ONLY] * 2  # any parameter names fit


def test_the_library_types_its_callables_with_the_one_protocol():
    assert sdo.kl.ModelFn is sdo.ModelFn and sdo.edict.ModelFn is sdo.ModelFn


# Every name sdo.pipelines offered as one module stays importable from the package.
PIPELINES_NAMES = [
    "DEFAULT_GUIDANCE",
    "FAMILIES",
    "SUPPORTED",
    "DecodedReward",
    "PipelineParts",
    "from_pipeline",
    "load_pipeline",
    "lora_targets",
    "logger",
    "pack_latents",
    "size_multiple",
    "unpack_latents",
]


def test_the_pipelines_package_keeps_its_names_and_each_module_says_its_job():
    import importlib
    import pkgutil

    import sdo.pipelines

    assert all(hasattr(sdo.pipelines, name) for name in PIPELINES_NAMES)
    assert set(sdo.pipelines.__all__) <= set(PIPELINES_NAMES)
    modules = [info.name for info in pkgutil.iter_modules(sdo.pipelines.__path__)]
    assert {"loading", "sd", "sdxl", "sd3", "flux", "codec", "inversion", "parts"} <= set(modules)
    for name in modules:
        module = importlib.import_module(f"sdo.pipelines.{name}")
        assert module.__doc__ and module.__doc__.strip(), f"sdo.pipelines.{name} has no docstring"
    assert sdo.pipelines.FAMILIES == {
        "StableDiffusionPipeline": "sd",
        "StableDiffusionXLPipeline": "sdxl",
        "StableDiffusion3Pipeline": "sd3",
        "FluxPipeline": "flux",
    }
    assert sdo.pipelines.DEFAULT_GUIDANCE == {"sd": 7.5, "sdxl": 5.0, "sd3": 7.0, "flux": 3.5}
