"""Averaging named loss components over a logging window, across gradient accumulation and ranks.

Each micro-batch adds, per component, a weighted sum and a weight (``add_sum``; ``add`` takes a mean and
multiplies it by the weight). In training the trainer adds each micro-batch's share of the step's value
(its loss terms normalised by the step's units, see :mod:`lmms_engine.models.loss_terms`) with weight
``1 / (micro-batches x ranks)``, so the window holds the mean over its steps of exactly the quantity
the optimiser minimised (the same number HF logs as ``loss`` for the total); reconstruction metrics
are weighted by their share of the step's targets, so steps without targets do not count. Values stay
on the device until logging time: no host sync per step.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.distributed as dist


class LossWindow:
    """Weighted sums of scalar components between two logging steps.

    Non-finite values are left out (with their weight), so one NaN batch does not poison the window.
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._weights: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._sums)

    def add(self, components: Mapping[str, torch.Tensor | float], weight: torch.Tensor | float) -> None:
        """Add one micro-batch: ``components`` are scalar means over it, ``weight`` its share."""
        for name, value in components.items():
            value = torch.as_tensor(value).detach().float()
            if value.numel() != 1:
                raise ValueError(f"loss component {name!r} must be a scalar, got shape {tuple(value.shape)}")
            value = value.reshape(())
            w = torch.as_tensor(weight, dtype=torch.float32, device=value.device).detach().reshape(())
            finite = torch.isfinite(value)
            self._accumulate(name, torch.where(finite, value * w, torch.zeros_like(value)),
                             torch.where(finite, w, torch.zeros_like(w)))

    def add_sum(self, name: str, value: torch.Tensor | float, weight: torch.Tensor | float) -> None:
        """Add ``value`` (already weighted: this micro-batch's share of a step's value) and its ``weight``."""
        value = torch.as_tensor(value).detach().float().reshape(())
        w = torch.as_tensor(weight, dtype=torch.float32, device=value.device).detach().reshape(())
        finite = torch.isfinite(value)
        self._accumulate(name, torch.where(finite, value, torch.zeros_like(value)),
                         torch.where(finite, w, torch.zeros_like(w)))

    def _accumulate(self, name: str, contribution: torch.Tensor, counted: torch.Tensor) -> None:
        if name in self._sums:
            self._sums[name] = self._sums[name] + contribution
            self._weights[name] = self._weights[name] + counted
        else:
            self._sums[name] = contribution
            self._weights[name] = counted

    def reset(self) -> None:
        self._sums.clear()
        self._weights.clear()

    def reduce(self, device: torch.device | str | None = None) -> dict[str, float]:
        """Sum over ranks (a collective: every rank must call it), average, reset; ``{name: mean}``.

        ``device``: where the collective runs (the backend's device; CPU for gloo). Components no rank
        saw a finite value of are left out.
        """
        names = sorted(self._sums)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed:
            gathered: list[list[str] | None] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, names)
            names = sorted({n for ranks in gathered for n in (ranks or [])})
        if not names:
            self.reset()
            return {}
        if device is None:
            device = next(iter(self._sums.values())).device if self._sums else torch.device("cpu")
        zero = torch.zeros((), dtype=torch.float32, device=device)
        table = torch.stack([
            torch.stack([self._sums.get(n, zero).to(device), self._weights.get(n, zero).to(device)])
            for n in names
        ])  # [K, 2]: weighted sum, total weight
        if distributed:
            dist.all_reduce(table, op=dist.ReduceOp.SUM)
        self.reset()
        values = table.double().cpu().tolist()
        return {name: total / weight for name, (total, weight) in zip(names, values) if weight > 0}


__all__ = ["LossWindow"]
