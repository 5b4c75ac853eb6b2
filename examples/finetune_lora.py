"""Fine-tune LoRA adapters of the embedded model so every digit is drawn bolder (SDO, random kept step).

Run it twice with the same `out` and the second run resumes. For 2 CPU processes:
    accelerate launch --cpu --num_processes 2 -m sdo finetune --task bold --steps 20 --out sdo-finetune
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
