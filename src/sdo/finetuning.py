"""Shim: fine-tuning lives in ``sdo.app.finetuning``; this module keeps the public ``sdo.finetuning.load_adapter``
(and ``FinetuneConfig``, ``finetune``) importable under their old path. Importing it loads the application layer."""

from sdo.app.finetuning import FinetuneConfig, finetune, load_adapter

__all__ = ["FinetuneConfig", "finetune", "load_adapter"]
