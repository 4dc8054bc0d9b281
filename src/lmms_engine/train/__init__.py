"""Training: ``AutoregressiveTrainer`` (transformers' Trainer with the autoregressive loss logged and
checkpoints saved atomically) and ``TrainingArguments`` (transformers' own, runnable on a CPU-only
machine with ``bf16=True``).

Names load lazily: ``import lmms_engine.train`` does not import transformers until a name is used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "AutoregressiveTrainer": "autoregressive_trainer",
    "TrainingArguments": "arguments",
    "LossWindow": "loss_window",
    "plot_loss_curves": "loss_plot",
    "is_complete_checkpoint": "checkpointing",
    "last_complete_checkpoint": "checkpointing",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lmms_engine.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
