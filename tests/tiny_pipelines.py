"""The tiny random models every test shares (no network): diffusers pipelines of each supported family (SD 1.x, SDXL,
SD3, Flux) and a CLIP model with an aesthetic head, each written to a folder as ``save_pretrained`` does, plus the
small UNets the core tests use and the helpers around them (test vocabulary, a PNG, an offline Hugging Face cache).

``tests/conftest.py`` exposes the folders as session fixtures (``pipeline_dir``, ``clip_dir``, ``sd3_dir``,
``sdxl_dir``, ``flux_dir``, ``offline_cache``); test files import the builders and constants from here, never
fixtures from one another."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import sys
from pathlib import Path

import torch

VOCAB = [
    "l",
    "o",
    "w",
    "e",
    "r",
    "s",
    "t",
    "i",
    "d",
    "n",
    "lo",
    "l</w>",
    "w</w>",
    "r</w>",
    "t</w>",
    "low</w>",
    "er</w>",
    "lowest</w>",
    "newer</w>",
    "wider",
    "<unk>",
    "<|startoftext|>",
    "<|endoftext|>",
]
MERGES = ["#version: 0.2", "l o", "lo w</w>", "e r</w>"]
PROMPT = "lower newer"
HEIGHT, WIDTH = 32, 48  # the SDXL and Flux tests' non-square size
# One tiny CLIP text encoder: every family's text encoders and the CLIP reward's text tower.
TEXT = dict(
    vocab_size=len(VOCAB),
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=16,
    bos_token_id=21,
    eos_token_id=22,
    pad_token_id=22,
)
REVISION = "0123456789abcdef0123456789abcdef01234567"  # the snapshot name in the offline Hub cache


def write_tokenizer(folder: Path):
    """A CLIP tokenizer over :data:`VOCAB`, its files written to ``folder``."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(VOCAB)}))
    (folder / "merges.txt").write_text("\n".join(MERGES) + "\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def write_png(path: Path) -> Path:
    """A 24x24 RGB PNG of fixed random pixels."""
    import matplotlib.image

    pixels = torch.rand(24, 24, 3, generator=torch.Generator().manual_seed(5))
    matplotlib.image.imsave(path, pixels.numpy())
    return path


def tiny_vae(**options):
    """A two-level ``AutoencoderKL`` with 4 latent channels (a 16x16 image is an 8x8 latent)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        **options,
    )


def tiny_unet(num_class_embeds: int | None = 11, dtype=torch.float64):
    """A real diffusers UNet2DModel, small enough for float64 tests on CPU."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=num_class_embeds,
    ).to(dtype)


def tiny_conditional_unet(dtype=torch.float64, cross_attention_dim: int = 8):
    """A real diffusers UNet2DConditionModel with cross-attention (4 latent channels, 8x8 samples), small enough for
    CPU tests; its weights come from seed 0 (the global generator is reseeded), so every call gives the same ones."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=2,
        norm_num_groups=4,
    ).to(dtype)


def save_sd(root: Path) -> Path:
    """A Stable-Diffusion-1.x-style pipeline (DDIM, 8x8 latents, 16x16 images) saved to ``root / "sd"``."""
    import transformers
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    with torch.random.fork_rng():
        unet = tiny_conditional_unet(torch.float32, cross_attention_dim=TEXT["hidden_size"])  # seeds 0 itself
        pipe = StableDiffusionPipeline(
            vae=tiny_vae(),
            text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT)),
            tokenizer=write_tokenizer(root / "tok"),
            unet=unet,
            scheduler=DDIMScheduler(clip_sample=False),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.save_pretrained(root / "sd")
    return root / "sd"


def save_clip(root: Path) -> Path:
    """A CLIP model with its tokenizer in ``root / "clip"`` and a LAION-style aesthetic head
    ``root / "head.safetensors"``; returns ``root``."""
    import transformers

    from sdo.io import save_tensors

    with torch.random.fork_rng():
        torch.manual_seed(1)
        vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2)
        vision.update(image_size=32, patch_size=8)
        config = transformers.CLIPConfig(text_config=dict(TEXT), vision_config=vision, projection_dim=8)
        transformers.CLIPModel(config).save_pretrained(root / "clip")
        write_tokenizer(root / "clip").save_pretrained(root / "clip")
        save_tensors({"weight": torch.randn(1, 8), "bias": torch.zeros(1)}, root / "head.safetensors")
    return root


def save_sd3(root: Path) -> Path:
    """An SD3-style pipeline (MMDiT transformer, flow matching, two CLIP encoders, no T5) saved to ``root / "sd3"``."""
    import transformers
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    with torch.random.fork_rng():
        torch.manual_seed(0)
        transformer = SD3Transformer2DModel(
            sample_size=8,
            patch_size=1,
            in_channels=4,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            caption_projection_dim=16,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            out_channels=4,
        )
        vae = tiny_vae(shift_factor=0.06, scaling_factor=1.5)
        config = transformers.CLIPTextConfig(**TEXT, projection_dim=16)
        encoders = [transformers.CLIPTextModelWithProjection(config) for _ in range(2)]
        pipe = StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=vae,
            text_encoder=encoders[0],
            tokenizer=write_tokenizer(root / "t1"),
            text_encoder_2=encoders[1],
            tokenizer_2=write_tokenizer(root / "t2"),
            text_encoder_3=None,
            tokenizer_3=None,
        )
    pipe.save_pretrained(root / "sd3")
    return root / "sd3"


def save_sdxl(root: Path) -> Path:
    """An SDXL-style pipeline (two text encoders, added time ids, Euler) saved to ``root / "sdxl"``."""
    import transformers
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,  # both encoders' hidden states, concatenated
            attention_head_dim=2,
            norm_num_groups=4,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=6 * 4 + 16,  # 6 time ids x 4 + the pooled projection
        )
        scheduler = EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            timestep_spacing="leading",
            steps_offset=1,
        )
        pipe = StableDiffusionXLPipeline(
            vae=tiny_vae(),
            text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT)),
            tokenizer=write_tokenizer(root / "t1"),
            text_encoder_2=transformers.CLIPTextModelWithProjection(
                transformers.CLIPTextConfig(**TEXT, projection_dim=16)
            ),
            tokenizer_2=write_tokenizer(root / "t2"),
            unet=unet,
            scheduler=scheduler,
            add_watermarker=False,
        )
    pipe.save_pretrained(root / "sdxl")
    return root / "sdxl"


def save_flux(root: Path) -> Path:
    """A Flux-style pipeline (packed 2x2 latents, dynamic shifting, a one-layer T5) saved to ``root / "flux"``."""
    import transformers
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    with torch.random.fork_rng():
        torch.manual_seed(0)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,  # 4 latent channels x a 2x2 patch
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=16,
            guidance_embeds=True,
            axes_dims_rope=(2, 2, 4),
        )
        t5 = transformers.T5EncoderModel(
            transformers.T5Config(vocab_size=len(VOCAB), d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
        )
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256
        )
        pipe = FluxPipeline(
            scheduler=scheduler,
            vae=tiny_vae(shift_factor=0.06, scaling_factor=1.5),
            text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT)),
            tokenizer=write_tokenizer(root / "t1"),
            text_encoder_2=t5,
            tokenizer_2=write_tokenizer(root / "t2"),  # any tokenizer: the T5 one needs files from the Hub
            transformer=transformer,
        )
    pipe.save_pretrained(root / "flux")
    return root / "flux"


def load(folder: Path, family: str = "sd"):
    """The saved pipeline as a diffusers object (SD3 without its absent third encoder)."""
    from diffusers import DiffusionPipeline

    absent = dict(text_encoder_3=None, tokenizer_3=None) if family == "sd3" else {}
    return DiffusionPipeline.from_pretrained(str(folder), local_files_only=True, **absent)


def file_digests(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` by relative path, with its SHA-256: the shared folders' contents, which no test may
    change."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def place_in_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """Put ``folder`` (a ``save_pretrained`` folder) in the Hugging Face cache ``cache`` as repo ``repo_id``, the way
    the Hub's client lays it out: ``models--org--name/snapshots/<revision>/...`` and ``refs/main``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)


def prompt_items_config(pipeline_dir: Path, clip_dir: Path, tmp_path: Path, lines: str, **overrides):
    """A minimal ``sdo optimize --pipeline --prompts FILE`` config: one item per prompt line of ``lines`` (written to
    ``tmp_path / "prompts.txt"``), results in ``tmp_path / "items"``; ``overrides`` replace or add fields."""
    from sdo.app.tasks.latent import LatentTaskConfig

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(lines)
    fields = dict(
        pipeline=str(pipeline_dir),
        prompts=str(prompts),
        clip_path=str(clip_dir / "clip"),
        steps=2,
        iters=1,
        batch=1,
        out=str(tmp_path / "items"),
    )
    return LatentTaskConfig(**{**fields, **overrides})


def two_cpu_processes_launch() -> list[str]:
    """The command prefix that starts a module under ``accelerate launch`` as 2 CPU processes (gloo) on a port that was
    free a moment ago, so that parallel test workers do not share one; append ``-m MODULE ARGS``."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
    ]
