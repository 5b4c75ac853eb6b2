"""Tasks: what a run optimizes and how it is scored.

- ``latent``: latent-optimization tasks (``sdo optimize`` / ``sdo demo``): class steering, style, adversarial,
  or a local pipeline with a CLIP-based reward.
- ``finetune``: what reward fine-tuning trains (the embedded model or a local pipeline) and its held-out metrics.
- ``bench``: the fixed work every estimator shares in ``sdo bench`` (the embedded model, or an SD-1.5-sized
  random-weight architecture for cost).
"""
