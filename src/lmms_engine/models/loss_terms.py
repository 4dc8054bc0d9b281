"""The loss contract between a model family and the trainer: raw sums and their counts.

A model's forward returns :class:`LossTerms`: for each term of the objective the sum of a per-unit loss
over the micro-batch and the number of units it summed. Nothing is divided or weighted inside the
forward beyond the per-unit reduction itself. The trainer counts each term's units over the whole
optimisation step before the step's first forward (every micro-batch of gradient accumulation, every
rank: :meth:`SupportsLossTerms.count_loss_units`, summed and all-reduced) and calls
:meth:`LossTerms.objective` with those totals. The step's objective is then

    sum(lm.total) / N_lm  +  loss_weight * mean over streams s with N_s > 0 of  sum(ar[s].total) / N_s

(sums over every micro-batch and rank of the step), whatever the split into micro-batches and ranks.

Units:
- language model: label tokens after the causal shift (``labels[..., 1:] != -100``); the total is the
  token cross-entropy summed over them (transformers' ``num_items_in_batch`` normalisation).
- autoregressive reconstruction, per temporal stream (``"all"``, or ``"fast"`` and ``"slow"``):
  supervised target tokens; the total is the squared error summed over them, each token's error being
  the mean over the ``embedding_dim`` features. ``baseline`` holds the copy-last-frame baseline's sum
  over the same tokens.

One forward on its own is normalised by its own counts (:meth:`LossTerms.counts`): that is the ``loss``
a model returns for single-batch use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

#: Label value the language-model loss ignores (transformers' convention).
IGNORE_INDEX = -100
#: Unit-count key of the language-model term.
LM_KEY = "language_model"
#: Prefix of the unit-count keys of the autoregressive streams (``"autoregressive.all"``, ...).
AR_PREFIX = "autoregressive."
#: Logged names, in log order: the objective's parts, then the reconstruction metrics.
OBJECTIVE_NAMES: tuple[str, ...] = ("main_loss", "autoregressive_loss", "total_loss")
METRIC_NAMES: tuple[str, ...] = ("ar_mse", "ar_copy_last_mse", "ar_fast_loss", "ar_slow_loss")


@dataclass(frozen=True)
class LossTerm:
    """One term of one micro-batch: a sum over units and the number of units.

    Attributes:
        total: ``[]`` the per-unit loss summed over the units (carries the gradient).
        count: ``[]`` integer number of units summed.
        baseline: ``[]`` detached sum of a reference loss over the same units, or None.
    """

    total: torch.Tensor
    count: torch.Tensor
    baseline: torch.Tensor | None = None


@dataclass(frozen=True)
class LossTerms:
    """Raw loss terms of one forward (see the module docstring for the units).

    Attributes:
        language_model: token cross-entropy sum and label-token count.
        autoregressive: per stream name, squared-error sum and supervised-target-token count; empty
            without the autoregressive module.
        autoregressive_weight: ``loss_weight`` of the autoregressive term.
    """

    language_model: LossTerm
    autoregressive: Mapping[str, LossTerm] = field(default_factory=dict)
    autoregressive_weight: float = 0.0

    def counts(self) -> dict[str, torch.Tensor]:
        """This forward's unit counts, keyed as :meth:`SupportsLossTerms.count_loss_units` keys them."""
        return unit_counts(self.language_model.count, {k: t.count for k, t in self.autoregressive.items()})

    def objective(self, units: Mapping[str, torch.Tensor | int] | None = None) -> torch.Tensor:
        """This micro-batch's part of the objective normalised by ``units`` (default: its own counts)."""
        parts = self.parts(units)
        return parts["main_loss"] + parts["autoregressive_loss"]

    def parts(self, units: Mapping[str, torch.Tensor | int] | None = None) -> dict[str, torch.Tensor]:
        """This micro-batch's share under ``units`` (default: its own counts) of ``main_loss``,
        ``autoregressive_loss`` (weighted) and, with autoregressive terms, the unweighted ``ar_mse`` and
        ``ar_copy_last_mse``; differentiable where the terms are."""
        units = self.counts() if units is None else units
        lm = self.language_model
        parts = {"main_loss": lm.total / _count(units[LM_KEY], lm.total).clamp(min=1)}
        mse = self._stream_mean(units, baseline=False)
        parts["autoregressive_loss"] = self.autoregressive_weight * mse
        if self.autoregressive:
            parts["ar_mse"] = mse
            parts["ar_copy_last_mse"] = self._stream_mean(units, baseline=True).detach()
        return parts

    def metric_parts(self, units: Mapping[str, torch.Tensor | int] | None = None
                     ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Reconstruction metrics as ``{name: (this micro-batch's share of the value, its weight)}``.

        The weight is this micro-batch's share of the units the metric averages over (0 when ``units``
        has none), so a logging window averages each metric over the steps that had targets only:
        ``ar_mse`` and ``ar_copy_last_mse`` over the steps with any autoregressive target,
        ``ar_fast_loss`` / ``ar_slow_loss`` (weighted, as ``autoregressive_loss``) over the steps with
        targets in that stream.
        """
        if not self.autoregressive:
            return {}
        units = self.counts() if units is None else units
        parts = self.parts(units)
        like = self.language_model.total
        step = sum(_count(units[AR_PREFIX + k], like) for k in self.autoregressive)
        here = sum(_count(t.count, like) for t in self.autoregressive.values())
        weight = torch.where(step > 0, here / step.clamp(min=1), 0.0)
        out = {"ar_mse": (parts["ar_mse"].detach(), weight), "ar_copy_last_mse": (parts["ar_copy_last_mse"], weight)}
        for name, term in self.autoregressive.items():
            if name in ("fast", "slow"):
                total = _count(units[AR_PREFIX + name], like)
                value = self.autoregressive_weight * term.total.detach() / total.clamp(min=1)
                out[f"ar_{name}_loss"] = (value, torch.where(total > 0, _count(term.count, like) / total.clamp(min=1),
                                                             0.0))
        return out

    def _stream_mean(self, units: Mapping[str, torch.Tensor | int], baseline: bool) -> torch.Tensor:
        if not self.autoregressive:
            return self.language_model.total.new_zeros(())
        return autoregressive_mean(self.autoregressive, {k: units[AR_PREFIX + k] for k in self.autoregressive},
                                   baseline=baseline)

    def components(self) -> dict[str, torch.Tensor]:
        """Detached values of this forward alone (its own counts): ``main_loss``, ``autoregressive_loss``,
        ``total_loss``, and with autoregressive terms ``autoregressive_loss`` and the reconstruction
        metrics (NaN for a metric without targets in it)."""
        parts = {k: v.detach() for k, v in self.parts().items() if k in OBJECTIVE_NAMES}
        parts["total_loss"] = parts["main_loss"] + parts["autoregressive_loss"]
        if not self.autoregressive:
            del parts["autoregressive_loss"]
        for name, (value, weight) in self.metric_parts().items():
            parts[name] = torch.where(weight > 0, value / weight.clamp(min=1e-30), float("nan"))
        return parts


@runtime_checkable
class SupportsLossTerms(Protocol):
    """A model that follows the contract: its forward's output has ``loss_terms`` (:class:`LossTerms`),
    and it counts a batch's units without running the forward."""

    def count_loss_units(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Unit counts of one collated batch, keyed as :meth:`LossTerms.counts`; equal to what the
        forward on that batch will count."""
        ...


def unit_counts(language_model: torch.Tensor | int, autoregressive: Mapping[str, torch.Tensor | int]
                ) -> dict[str, torch.Tensor]:
    """The unit-count mapping: ``{"language_model": n, "autoregressive.<stream>": n, ...}``."""
    out = {LM_KEY: torch.as_tensor(language_model)}
    out.update({AR_PREFIX + name: torch.as_tensor(count) for name, count in autoregressive.items()})
    return out


def autoregressive_mean(terms: Mapping[str, LossTerm], units: Mapping[str, torch.Tensor | int],
                        baseline: bool = False) -> torch.Tensor:
    """Mean over the streams with units of each stream's ``total`` (or ``baseline``) per unit.

    ``units``: per stream, the units to divide by (the step's, or the terms' own counts). Streams
    without units count as absent; with none at all the result is a zero that still reaches whatever
    the totals reach (the autoregressive parameters: every rank's backward meets the same parameters).
    """
    values, active = [], []
    for name, term in terms.items():
        like = term.total
        count = _count(units[name], like)
        summed = term.total if not baseline else (term.baseline if term.baseline is not None
                                                  else torch.zeros_like(term.total))
        values.append(summed.float() / count.clamp(min=1))
        active.append((count > 0).float())
    on = torch.stack(active)
    return (torch.stack(values) * on).sum() / on.sum().clamp(min=1)


def label_token_count(labels: torch.Tensor) -> torch.Tensor:
    """Label tokens a causal LM predicts: ``labels[..., 1:] != -100`` (``[B, L]`` -> ``[]``)."""
    return (labels[..., 1:] != IGNORE_INDEX).sum()


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> LossTerm:
    """Causal-LM cross-entropy summed over label tokens: ``logits`` ``[B, L, V]``, ``labels`` ``[B, L]``
    (shifted inside, -100 ignored), computed in float32 as transformers does."""
    shifted = labels[..., 1:].reshape(-1).to(logits.device)
    flat = logits[..., :-1, :].float().reshape(-1, logits.shape[-1])
    total = F.cross_entropy(flat, shifted, ignore_index=IGNORE_INDEX, reduction="sum")
    return LossTerm(total=total, count=(shifted != IGNORE_INDEX).sum())


def _count(count: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(count, device=like.device).to(torch.float32)


__all__ = [
    "AR_PREFIX",
    "IGNORE_INDEX",
    "LM_KEY",
    "LossTerm",
    "LossTerms",
    "METRIC_NAMES",
    "OBJECTIVE_NAMES",
    "SupportsLossTerms",
    "autoregressive_mean",
    "label_token_count",
    "token_loss_sum",
    "unit_counts",
]
