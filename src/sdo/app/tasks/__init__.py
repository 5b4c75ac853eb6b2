"""Tasks: what a run optimizes and how it is scored.

- ``latent``: latent-optimization tasks (``sdo optimize`` / ``sdo demo``): class steering, style, adversarial,
  or a local pipeline with a CLIP-based reward, or editing real images on a pipeline.
- ``edit``: editing's pieces (the input images fitted to the pipeline's size, the pixel term), which ``latent``
  builds its editing task from; ``edit`` imports nothing of ``latent``.
- ``finetune``: what reward fine-tuning trains (the embedded model or a local pipeline) and its held-out metrics.
- ``bench``: the fixed work every estimator shares in ``sdo bench`` (the embedded model, or an SD-1.5-sized
  random-weight architecture for cost).
"""
