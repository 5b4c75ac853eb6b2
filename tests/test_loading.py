"""Loading what the user gives: images at their true values and of a bounded size, model folders complete or
refused (issue 26, Deliver 4 and 5)."""

from __future__ import annotations

import logging
import shutil
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import sdo
from sdo.io import image_size, load_image
from tiny_pipelines import PROMPT

pytest.importorskip("transformers")


# --- images at their true values ---------------------------------------------------------------------------------


def grey_values(image: torch.Tensor) -> torch.Tensor:
    """The one grey channel of ``[1, 3, H, W]`` (checking the three are equal)."""
    assert image.shape[:2] == (1, 3) and image.dtype == torch.float32
    assert torch.equal(image[:, 0], image[:, 1]) and torch.equal(image[:, 1], image[:, 2])
    return image[0, 0]


@pytest.mark.parametrize(
    ("mode", "suffix", "stored", "white"),
    [
        ("I;16", ".png", np.array([[0, 32768], [65535, 1000]], dtype=np.uint16), 65535),
        ("I;16B", ".tif", np.array([[0, 32768], [65535, 1000]], dtype=">u2"), 65535),
        ("I", ".tif", np.array([[0, 40000], [65535, 255]], dtype=np.int32), 65535),
        ("F", ".tif", np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32), 1),
    ],
)
def test_high_bit_grey_images_load_at_their_true_values(tmp_path, mode, suffix, stored, white):
    path = tmp_path / f"grey{suffix}"
    Image.fromarray(stored).save(path)
    with Image.open(path) as opened:
        assert opened.mode == mode  # the mode under test is the one Pillow reads back
    expected = torch.from_numpy(stored.astype(np.float64) / white).float()
    torch.testing.assert_close(grey_values(load_image(path)), expected)  # mid-grey stays mid-grey: no clipping
    resized = grey_values(load_image(path, size=(4, 4)))
    assert resized.shape == (4, 4) and resized.min() >= 0 and resized.max() <= 1
    assert abs(float(resized.mean() - expected.mean())) < 0.1


@pytest.mark.parametrize(
    ("stored", "shown"),
    [
        (np.array([[0, 70000]], dtype=np.int32), r"mode I\) with values in \[0, 70000\], outside \[0, 65535\]"),
        (np.array([[-3, 5]], dtype=np.int32), r"values in \[-3, 5\]"),
        (np.array([[0.5, 1.5]], dtype=np.float32), r"mode F\) with values in \[0.5, 1.5\], outside \[0, 1\]"),
        (np.array([[0.5, np.nan]], dtype=np.float32), r"mode F\)"),
    ],
)
def test_integer_and_float_images_beyond_their_range_are_refused(tmp_path, stored, shown):
    path = tmp_path / "wide.tif"
    Image.fromarray(stored).save(path)
    with pytest.raises(sdo.CorruptFileError, match=shown) as error:
        load_image(path)
    assert "wide.tif" in str(error.value) and "\n" not in str(error.value)


def other_mode_images():
    """``(mode, image, expected RGB of pixel (0, 0) and (1, 0) in 0..255)`` for the modes Pillow converts."""
    la = Image.fromarray(np.array([[[100, 0], [200, 255]]], dtype=np.uint8), "LA")
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * 759)
    palette.putdata([1, 2])
    palette.info["transparency"] = 1  # the red entry is transparent: its colour is kept, alpha dropped
    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putdata([(0, 255, 0, 0), (0, 0, 0, 255)])
    bits = Image.new("1", (2, 1))
    bits.putdata([255, 0])
    return [
        ("LA", la, [(100, 100, 100), (200, 200, 200)]),
        ("P", palette, [(255, 0, 0), (0, 0, 255)]),
        ("CMYK", cmyk, [(255, 0, 255), (0, 0, 0)]),
        ("1", bits, [(255, 255, 255), (0, 0, 0)]),
    ]


@pytest.mark.parametrize(
    ("mode", "image", "expected"), other_mode_images(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_other_modes_go_through_pillows_rgb_conversion(tmp_path, mode, image, expected):
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    image.save(path)
    with Image.open(path) as opened:
        assert opened.mode == mode
    loaded = load_image(path)
    assert loaded.shape == (1, 3, 1, 2)
    torch.testing.assert_close(loaded[0, :, 0].T * 255, torch.tensor(expected, dtype=torch.float32))


# --- image size bounded ------------------------------------------------------------------------------------------


def png_header(path, width: int, height: int):
    """A PNG holding only its header (1-bit grey ``width x height``) and no pixels: what Pillow reads lazily."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


def test_an_image_beyond_max_pixels_is_one_line_from_its_header(tmp_path):
    huge = png_header(tmp_path / "huge.png", 20000, 20000)  # Pillow's own guard raises DecompressionBombError
    pillow_limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        for read in (load_image, image_size):
            with pytest.raises(sdo.ConfigError, match=r"huge\.png: the image is 400,000,000 pixels.*--max-pixels"):
                read(huge)
        with pytest.raises(sdo.ConfigError, match=r"10x10 \(100 pixels\), more than --max-pixels 99"):
            load_image(png_header(tmp_path / "small.png", 10, 10), max_pixels=99)
        assert image_size(huge, max_pixels=400_000_000) == (20000, 20000)  # a raised bound lifts Pillow's too
        with pytest.raises(sdo.CorruptFileError, match=r"huge\.png: not a valid PNG"):  # then decoding fails
            load_image(huge, max_pixels=400_000_000)
    assert pillow_limit == Image.MAX_IMAGE_PIXELS


def test_max_pixels_is_checked_before_any_model_loads(tmp_path, capsys):
    from sdo.app.cli import main

    huge = png_header(tmp_path / "huge.png", 20000, 20000)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    nowhere = str(tmp_path / "no-pipeline")  # loading it would fail: the image must be refused first
    runs = [
        ["optimize", "--pipeline", nowhere, "--prompt", "a cat", "--image", str(huge)],
        ["optimize", "--pipeline", nowhere, "--prompt", "a cat", "--reward", "style", "--style-image", str(huge)],
        ["finetune", "--pipeline", nowhere, "--prompts", str(prompts), "--task", "style", "--style-image", str(huge)],
    ]
    for index, argv in enumerate(runs):
        out = tmp_path / f"out{index}"
        assert main([*argv, "--out", str(out)]) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and "huge.png" in error and "--max-pixels 64000000" in error, error
        assert not out.exists()
    raised = ["--max-pixels", "400000000", "--out", str(tmp_path / "out")]
    assert main([*runs[0], *raised]) == 2  # past the bound, the header-only file is read, and found corrupt
    assert "not a valid PNG" in capsys.readouterr().err


# --- model folders complete or refused ---------------------------------------------------------------------------


def broken_copy(folder, tmp_path, name, *, remove=(), drop_weight=None, empty=()):
    """A copy of ``folder`` with the paths ``remove`` deleted, the folders ``empty`` emptied, and one tensor
    dropped from the safetensors file ``drop_weight``."""
    copy = tmp_path / name
    shutil.copytree(folder, copy)
    for relative in remove:
        target = copy / relative
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    for relative in empty:
        shutil.rmtree(copy / relative)
        (copy / relative).mkdir()
    if drop_weight:
        tensors = sdo.io.load_tensors(copy / drop_weight)
        tensors.pop(sorted(tensors)[-1])
        sdo.io.save_tensors(tensors, copy / drop_weight)
    return copy


def one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def test_a_clip_folder_is_complete_or_refused(clip_dir, pipeline_dir, tmp_path):
    from sdo.clip_rewards import AestheticReward, ClipImageEncoder, ClipScoreReward

    with pytest.raises(sdo.MissingWeightsError, match=r"not a CLIP model folder.*'clip_text_model'") as e:
        ClipImageEncoder(pipeline_dir / "text_encoder")  # a text encoder alone: the vision weights would be random
    assert str(pipeline_dir / "text_encoder") in one_line(e)
    clip = clip_dir / "clip"
    trimmed = broken_copy(clip, tmp_path, "trimmed", drop_weight="model.safetensors")
    with pytest.raises(sdo.MissingWeightsError, match=r"trimmed: the CLIP model is incomplete: 1 weight is missing"):
        ClipImageEncoder(trimmed)
    for name, remove in [("empty", ["config.json", "model.safetensors"]), ("no-weights", ["model.safetensors"])]:
        with pytest.raises(sdo.MissingWeightsError, match=rf"{name}: the CLIP model could not be loaded") as e:
            ClipImageEncoder(broken_copy(clip, tmp_path, name, remove=remove))
        one_line(e)
    tokenizer_files = ["vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"]
    untokenized = broken_copy(clip, tmp_path, "untokenized", remove=tokenizer_files)
    with pytest.raises(
        sdo.MissingWeightsError, match=r"untokenized: the CLIP model's tokenizer has no tokenizer files"
    ):
        ClipScoreReward(PROMPT, path=untokenized)
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    head = clip_dir / "head.safetensors"
    expected = AestheticReward(head, path=clip)(images)  # an image-only reward needs no tokenizer
    torch.testing.assert_close(AestheticReward(head, path=untokenized)(images), expected)


def test_weights_the_model_does_not_use_are_a_warning_not_a_refusal(clip_dir, caplog):
    import transformers

    source = sdo.hub.model_source(clip_dir / "clip", "CLIP model")
    with caplog.at_level(logging.WARNING, logger="sdo.hub"):
        vision = sdo.hub.load_model(transformers.CLIPVisionModel, source, "CLIP vision model")
    assert isinstance(vision, transformers.CLIPVisionModel)
    (record,) = [r for r in caplog.records if r.name == "sdo.hub"]
    assert "weight(s) of the checkpoint are not used by the CLIP vision model" in record.getMessage()
    assert "text_model." in record.getMessage() and "\n" not in record.getMessage()


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (dict(remove=["tokenizer"]), sdo.MissingWeightsError, r"its `tokenizer` \(CLIPTokenizer\) is missing"),
        (
            dict(empty=["tokenizer"]),
            sdo.MissingWeightsError,
            r"tokenizer: the pipeline's `tokenizer` has no tokenizer",
        ),
        (dict(remove=["tokenizer/tokenizer_config.json"]), sdo.CorruptFileError, r"its text encoder has 16 positions"),
        (dict(drop_weight="unet/diffusion_pytorch_model.safetensors"), sdo.MissingWeightsError, r"unet: .*incomplete"),
        (dict(drop_weight="text_encoder/model.safetensors"), sdo.MissingWeightsError, r"`text_encoder`.*incomplete"),
    ],
    ids=["no-tokenizer", "empty-tokenizer", "no-tokenizer-config", "unet-weight", "text-encoder-weight"],
)
def test_a_pipeline_missing_a_component_or_a_weight_is_one_line(pipeline_dir, tmp_path, change, error, message):
    broken = broken_copy(pipeline_dir, tmp_path, "broken", **change)
    with pytest.raises(error, match=message) as raised:
        sdo.pipelines.load_pipeline(broken)
    assert str(broken) in one_line(raised)


def test_the_cli_refuses_a_pipeline_without_its_tokenizer_in_one_line(pipeline_dir, clip_dir, tmp_path, capsys):
    from sdo.app.cli import main

    broken = broken_copy(pipeline_dir, tmp_path, "broken", remove=["tokenizer"])
    out = tmp_path / "out"
    argv = ["optimize", "--pipeline", str(broken), "--prompt", PROMPT, "--clip-path", str(clip_dir / "clip")]
    assert main([*argv, "--steps", "2", "--iters", "1", "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "`tokenizer`" in error and "Traceback" not in error
    assert not out.exists()
