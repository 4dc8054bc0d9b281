"""Trainer callbacks: a JSON-lines training log and the loss-curve picture, written by the main process."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from lmms_engine.train.loss_plot import LOSS_PLOT_NAME, plot_loss_curves

LOG_FILE_NAME = "train_log.jsonl"
logger = logging.getLogger(__name__)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class JsonlLogCallback(TrainerCallback):
    """Append every log entry (step, epoch, losses, learning rate, ...) as one JSON line to
    ``output_dir/train_log.jsonl`` (a resumed run appends to the same file)."""

    def __init__(self, file_name: str = LOG_FILE_NAME) -> None:
        self.file_name = file_name

    def path(self, args: Any) -> Path:
        return Path(args.output_dir) / self.file_name

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D401 - HF callback signature
        if not state.is_world_process_zero or not logs:
            return
        entry = {"step": state.global_step, "time": round(time.time(), 3)}
        entry.update({key: _jsonable(value) for key, value in logs.items()})
        path = self.path(args)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")


class LossPlotCallback(TrainerCallback):
    """At the end of training, draw ``output_dir/loss_curve.png`` from the run's log history
    (main / autoregressive / total loss against the step; a resumed run's history includes the steps
    before the resume, restored from the checkpoint's trainer state)."""

    def __init__(self, file_name: str = LOSS_PLOT_NAME) -> None:
        self.file_name = file_name
        self.last_path: Path | None = None

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.last_path = plot_loss_curves(state.log_history, Path(args.output_dir) / self.file_name)


class NothingLoggedWarningCallback(TrainerCallback):
    """Warn at the start of training when the run will log no training step (``logging_steps`` larger
    than the steps left, e.g. the default 500 on a run of 96 steps): no losses, no curve, no log lines."""

    def on_train_begin(self, args, state, control, **kwargs):
        strategy = getattr(args.logging_strategy, "value", args.logging_strategy)
        every = state.logging_steps or args.logging_steps
        if strategy != "steps" or args.logging_first_step or not every or state.max_steps <= 0:
            return
        every = math.ceil(every)
        if state.max_steps // every > state.global_step // every:
            return
        if state.is_world_process_zero:
            logger.warning("no training step will be logged: logging_steps=%s but the run trains steps %d-%d; "
                           "losses, train_log.jsonl and the loss curve stay empty: set logging_steps (e.g. %d)",
                           args.logging_steps, state.global_step + 1, state.max_steps,
                           max(1, (state.max_steps - state.global_step) // 10))


__all__ = ["JsonlLogCallback", "LOG_FILE_NAME", "LossPlotCallback", "NothingLoggedWarningCallback"]
