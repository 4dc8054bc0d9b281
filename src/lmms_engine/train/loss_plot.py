"""The loss-curve picture: main / autoregressive / total loss against the optimisation step."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

#: Curves drawn, in order, with their legend labels. ``loss`` (HF's total) stands in for
#: ``total_loss`` in logs of models that report no components.
PLOTTED_KEYS: tuple[tuple[str, str], ...] = (
    ("main_loss", "main (language model)"),
    ("autoregressive_loss", "autoregressive (weighted)"),
    ("total_loss", "total"),
)
LOSS_PLOT_NAME = "loss_curve.png"


def loss_series(log_history: Iterable[Mapping[str, float]]) -> dict[str, tuple[list[int], list[float]]]:
    """``{key: (steps, values)}`` for every plotted key found in the training logs (``state.log_history``)."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for entry in log_history:
        if "step" not in entry or "loss" not in entry:  # training logs only (not eval or summary entries)
            continue
        values = {key: entry[key] for key, _ in PLOTTED_KEYS if key in entry}
        if "total_loss" not in values:
            values["total_loss"] = entry["loss"]
        for key, value in values.items():
            steps, ys = series.setdefault(key, ([], []))
            steps.append(int(entry["step"]))
            ys.append(float(value))
    return series


def plot_loss_curves(log_history: Iterable[Mapping[str, float]], path: str | os.PathLike,
                     title: str = "Training loss") -> Path | None:
    """Draw the loss curves of ``log_history`` into the PNG ``path``; None when nothing was logged.

    Rendered with matplotlib's Agg canvas (no display, no pyplot state).
    """
    series = loss_series(log_history)
    if not series:
        return None
    # A bare Figure renders with Agg and never touches pyplot's global backend or a display.
    from matplotlib.figure import Figure

    labels = dict(PLOTTED_KEYS)
    # The autoregressive term is usually a few percent of the total: it gets its own panel and scale.
    panels = [[k for k in ("main_loss", "total_loss") if k in series]]
    if "autoregressive_loss" in series:
        panels.append(["autoregressive_loss"])
    figure = Figure(figsize=(7, 3.2 * len(panels)), dpi=120)
    for row, keys in enumerate(panels):
        axes = figure.add_subplot(len(panels), 1, row + 1)
        for key in keys:
            steps, values = series[key]
            color = {"main_loss": "C0", "autoregressive_loss": "C1", "total_loss": "C2"}[key]
            axes.plot(steps, values, color=color, marker="o" if len(steps) < 30 else None, markersize=3,
                      label=labels[key])
        axes.set_ylabel("loss")
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


__all__ = ["LOSS_PLOT_NAME", "PLOTTED_KEYS", "loss_series", "plot_loss_curves"]
