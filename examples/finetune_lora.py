"""Fine-tune LoRA adapters of the embedded model so every digit is drawn bolder (SDO, random kept step).

Run it twice with the same `out` and the second run resumes. For 2 CPU processes:
    accelerate launch --multi_gpu --num_processes 2 -m sdo finetune --device cpu --task bold --steps 20 \
        --out sdo-finetune
(`--multi_gpu` with `--device cpu` starts 2 CPU processes over gloo; Accelerate 1.15's own `--cpu` flag starts one).
"""

from sdo.finetuning import FinetuneConfig, finetune

config = FinetuneConfig(
    method="sdo",
    task="bold",
    steps=20,
    sample_steps=20,
    batch_size=8,
    lora_rank=4,
    lr=2e-3,
    eval_every=10,
    out="sdo-finetune",
)
print(finetune(config))
