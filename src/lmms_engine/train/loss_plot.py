"""The loss-curve picture: the losses, the held-out loss and the next-frame MSE against its copy-last
baseline, against the optimisation step."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

#: Training curves drawn, in order, with their legend labels. ``loss`` (HF's total) stands in for
#: ``total_loss`` in logs of models that report no components.
PLOTTED_KEYS: tuple[tuple[str, str], ...] = (
    ("main_loss", "main (language model)"),
    ("autoregressive_loss", "autoregressive (weighted)"),
    ("total_loss", "total"),
    ("ar_mse", "next-frame MSE (predictor)"),
    ("ar_copy_last_mse", "next-frame MSE (copy last frame)"),
)
#: Held-out curves (evaluation logs), drawn beside the training curve of the same quantity.
EVAL_KEYS: tuple[tuple[str, str], ...] = (
    ("eval_loss", "held-out total"),
    ("eval_ar_mse", "held-out next-frame MSE (predictor)"),
)
LOSS_PLOT_NAME = "loss_curve.png"
_COLORS = {"main_loss": "C0", "autoregressive_loss": "C1", "total_loss": "C2", "eval_loss": "C3", "ar_mse": "C4",
           "ar_copy_last_mse": "C7", "eval_ar_mse": "C6"}


def loss_series(log_history: Iterable[Mapping[str, float]]) -> dict[str, tuple[list[int], list[float]]]:
    """``{key: (steps, values)}`` for every plotted key found in the training logs (``state.log_history``)
    and, under the :data:`EVAL_KEYS` names, in its evaluation logs."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for entry in log_history:
        if "step" not in entry:
            continue
        if "loss" in entry:  # a training log
            values = {key: entry[key] for key, _ in PLOTTED_KEYS if key in entry}
            if "total_loss" not in values:
                values["total_loss"] = entry["loss"]
        elif "eval_loss" in entry:
            values = {key: entry[key] for key, _ in EVAL_KEYS if key in entry}
        else:  # the end-of-training summary and other entries
            continue
        for key, value in values.items():
            steps, ys = series.setdefault(key, ([], []))
            steps.append(int(entry["step"]))
            ys.append(float(value))
    return series


def plot_loss_curves(log_history: Iterable[Mapping[str, float]], path: str | os.PathLike,
                     title: str = "Training loss") -> Path | None:
    """Draw the curves of ``log_history`` into the PNG ``path``; None when no training step was logged.

    Panels: the language-model and total losses with the held-out loss; the weighted autoregressive
    term; the predictor's next-frame MSE against copying the last frame (the baseline it should beat),
    training and held-out. Rendered with matplotlib's Agg canvas (no display, no pyplot state).
    """
    series = loss_series(log_history)
    if not any(key in series for key, _ in PLOTTED_KEYS):
        return None
    # A bare Figure renders with Agg and never touches pyplot's global backend or a display.
    from matplotlib.figure import Figure

    labels = dict(PLOTTED_KEYS + EVAL_KEYS)
    # The autoregressive term is usually a few percent of the total: it gets its own panel and scale.
    panels = [([k for k in ("main_loss", "total_loss", "eval_loss") if k in series], "loss")]
    if "autoregressive_loss" in series:
        panels.append((["autoregressive_loss"], "loss"))
    if "ar_mse" in series:
        panels.append(([k for k in ("ar_mse", "ar_copy_last_mse", "eval_ar_mse") if k in series], "MSE"))
    figure = Figure(figsize=(7, 3.2 * len(panels)), dpi=120)
    for row, (keys, ylabel) in enumerate(panels):
        axes = figure.add_subplot(len(panels), 1, row + 1)
        for key in keys:
            steps, values = series[key]
            axes.plot(steps, values, color=_COLORS[key], marker="o" if len(steps) < 30 or key.startswith("eval")
                      else None, markersize=3, linestyle="--" if key == "ar_copy_last_mse" else "-",
                      label=labels[key])
        axes.set_ylabel(ylabel)
        if row == 0 and all(v > 0 for key in keys for v in series[key][1]):
            axes.set_yscale("log")  # the language-model loss falls by orders of magnitude
        axes.grid(True, alpha=0.3)
        axes.legend()
        if row == 0:
            axes.set_title(title)
        if row == len(panels) - 1:
            axes.set_xlabel("optimisation step")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


__all__ = ["EVAL_KEYS", "LOSS_PLOT_NAME", "PLOTTED_KEYS", "loss_series", "plot_loss_curves"]
