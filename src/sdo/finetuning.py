"""Shim: fine-tuning lives in ``sdo.app.finetuning`` and ``sdo.app.lora``; this module keeps the public
``sdo.finetuning.load_adapter`` (and ``FinetuneConfig``, ``finetune``) importable under their old path, and
offers ``fuse_lora(pipe, out)`` (a fine-tuned pipeline as plain weights). Importing it loads the application
layer."""

from sdo.app.finetuning import FinetuneConfig, finetune
from sdo.app.lora import fuse_lora, load_adapter

__all__ = ["FinetuneConfig", "finetune", "fuse_lora", "load_adapter"]
