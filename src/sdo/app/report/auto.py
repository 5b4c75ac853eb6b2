"""The README's ``auto-guide`` block: what ``--method auto`` chooses for each job on Stable Diffusion 1.5 at 512x512
and 50 steps, at budgets of 8, 24 and 80 GiB, from the plan alone (SD-1.5's UNet and VAE, random weights built from
their configs on the ``meta`` device in bfloat16, as ``sdo bench --model sd15`` runs on CUDA; batch 1; fine-tuning
with LoRA rank 4 on the attention projections)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from sdo.app.auto import GIB, BudgetError, Job, choose, profile_job, resident_modules, trained_bytes
from sdo.app.report import markdown_table
from sdo.app.report.blocks import block
from sdo.methods import MethodOptions
from sdo.pipelines.parts import UNET_LORA_TARGETS

__all__ = ["BUDGETS_GIB", "auto_guide"]

BUDGETS_GIB = (8, 24, 80)
STEPS = 50
EDIT_STEP = 40
LORA_RANK = 4


def _jobs() -> dict[str, Job]:
    from sdo.app.tasks.bench import sd15_workload

    workload = sd15_workload(batch=1, device="meta", dtype=torch.bfloat16)
    sampler = workload.make_sampler(STEPS, workload.model)
    noise = Job(
        "noise",
        STEPS,
        sampler.model_fn,
        lambda x0: workload.reward(x0, None),
        workload.latent,
        sampler.timesteps[0],
        modules=resident_modules(workload.model, *workload.others),
    )
    return {
        "steer from the initial noise (`sdo optimize`)": noise,
        f"edit from step {EDIT_STEP} (`sdo optimize --start-step {EDIT_STEP}`, or a real image)": replace(
            noise, target="latent", start_step=EDIT_STEP, timestep=sampler.timesteps[EDIT_STEP]
        ),
        f"fine-tune with LoRA rank {LORA_RANK} (`sdo finetune`)": replace(
            noise, target="weights", trainable=trained_bytes(workload.model, LORA_RANK, UNET_LORA_TARGETS)
        ),
    }


def auto_guide(results: Path | None = None) -> str:
    """The table (module docstring): per job and budget, the choice and its planned memory, or what nothing fitting
    needs."""
    rows = []
    for words, job in _jobs().items():
        cells, profiles = [words], profile_job(job)
        for budget in BUDGETS_GIB:
            options = MethodOptions(job.variable)
            try:
                choice = choose(job, budget * GIB, options, replays_only=job.variable == "latent", profiles=profiles)
            except BudgetError:
                cells.append("nothing fits")
                continue
            cells.append(f"`{choice.method}`{_settings(choice.options)}, {choice.parts.total / GIB:.1f} GiB")
        rows.append(cells)
    return markdown_table(("job", *(f"{budget} GiB" for budget in BUDGETS_GIB)), rows)


def _settings(options: dict) -> str:
    """A row's settings in words: `` (cosine, beta2 0.999)``, or nothing for the defaults."""
    words = ["cosine"] if options.get("lr_schedule") == "cosine" else []
    words += [f"beta2 {options['adam_beta2']:g}"] if "adam_beta2" in options else []
    return f" ({', '.join(words)})" if words else ""


block("auto-guide")(auto_guide)
