"""Training: ``AutoregressiveTrainer`` (transformers' Trainer with the autoregressive loss logged and
checkpoints saved atomically) and ``TrainingArguments`` (transformers' own, runnable on a CPU-only
machine with ``bf16=True``).

Names load lazily: ``import lmms_engine.train`` does not import transformers until a name is used.
"""

from __future__ import annotations

from lmms_engine.utils.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "AutoregressiveTrainer": "autoregressive_trainer",
    "TrainingArguments": "arguments",
    "limit_cpu_threads": "arguments",
    "LossWindow": "loss_window",
    "plot_loss_curves": "loss_plot",
    "is_complete_checkpoint": "checkpointing",
    "last_complete_checkpoint": "checkpointing",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
