"""Per-module learning rates: the optimizer's parameter groups by model part.

A model family describes its parts as parameter-name prefixes (:data:`FAMILY_PARTS`, keyed by
``config.model_type``; a model may instead define ``module_parts()`` returning the same mapping):

==================  ==========================================================  ==========================
part                LLaVA-OneVision (``llava_onevision``)                       Qwen2.5-VL / Qwen3-VL
==================  ==========================================================  ==========================
``vision_tower``    ``model.vision_tower.``                                      ``model.visual.`` (but the merger)
``projector``       ``model.multi_modal_projector.``, ``model.image_newline``,   ``model.visual.merger.``
                    ``faster_token``                                            (and deepstack mergers)
``language_model``  ``model.language_model.``, ``lm_head.``                      the same
``autoregressive``  ``autoregressive_module.``                                   the same
==================  ==========================================================  ==========================

The longest matching prefix wins (the Qwen merger sits inside ``model.visual.``). A parameter that
matches no part is an error naming it (a new module must be given a part, not silently trained at some
rate). ``TrainingArguments``' ``vision_tower_lr``, ``projector_lr``, ``language_model_lr`` and
``autoregressive_lr`` set a part's learning rate (None = ``learning_rate``; LLaVA-NeXT's
``mm_vision_tower_lr`` / ``mm_projector_lr``); the scheduler scales every group alike, so the ratios
hold through warm-up and decay. Each part is split into a weight-decay group and a no-decay group, as
transformers does (``get_decay_parameter_names``). Frozen parameters (``requires_grad=False``: the
``freeze_*`` keys of ``model_config``) are in no group. The groups are logged when the optimizer is built.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from torch import nn

from lmms_engine.utils.config import ConfigError

logger = logging.getLogger(__name__)

PARTS: tuple[str, ...] = ("vision_tower", "projector", "language_model", "autoregressive")
#: The TrainingArguments key of each part's learning rate.
LR_KEYS: dict[str, str] = {part: f"{part}_lr" for part in PARTS}

_QWEN_PARTS: dict[str, tuple[str, ...]] = {
    "vision_tower": ("model.visual.",),
    "projector": ("model.visual.merger.", "model.visual.deepstack_merger_list."),
    "language_model": ("model.language_model.", "lm_head."),
    "autoregressive": ("autoregressive_module.",),
}
#: Parameter-name prefixes of each part, per ``config.model_type``.
FAMILY_PARTS: dict[str, dict[str, tuple[str, ...]]] = {
    "llava_onevision": {
        "vision_tower": ("model.vision_tower.",),
        "projector": ("model.multi_modal_projector.", "model.image_newline", "faster_token"),
        "language_model": ("model.language_model.", "lm_head."),
        "autoregressive": ("autoregressive_module.",),
    },
    "qwen2_5_vl": _QWEN_PARTS,
    "qwen3_vl": _QWEN_PARTS,
}


def module_parts(model: nn.Module) -> Mapping[str, Sequence[str]]:
    """The model's part -> prefixes mapping: its own ``module_parts()``, else by ``config.model_type``."""
    own = getattr(model, "module_parts", None)
    if callable(own):
        return own()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILY_PARTS:
        raise ConfigError(f"per-module learning rates: no part description for model_type {model_type!r} "
                          f"(known: {', '.join(sorted(FAMILY_PARTS))}); give the model a module_parts() method")
    return FAMILY_PARTS[model_type]


def part_of(name: str, parts: Mapping[str, Sequence[str]]) -> str:
    """The part whose longest prefix matches parameter ``name``; ConfigError when none does."""
    best, length = None, -1
    for part, prefixes in parts.items():
        for prefix in prefixes:
            if name.startswith(prefix) and len(prefix) > length:
                best, length = part, len(prefix)
    if best is None:
        raise ConfigError(f"parameter {name!r} belongs to no model part ({', '.join(parts)}); add its module to the "
                          "model family's part description (lmms_engine.train.param_groups.FAMILY_PARTS)")
    return best


@dataclass(frozen=True)
class PartSummary:
    """One part's parameters: ``total`` and ``trainable`` counts, and its learning rate."""

    part: str
    total: int
    trainable: int
    lr: float


def part_learning_rates(args: Any) -> dict[str, float]:
    """Each part's learning rate from ``args`` (``<part>_lr``, else ``learning_rate``)."""
    base = float(args.learning_rate)
    rates = {}
    for part, key in LR_KEYS.items():
        value = getattr(args, key, None)
        if value is not None and value < 0:
            raise ConfigError(f"{key} must be >= 0 or null (= learning_rate), got {value}")
        rates[part] = base if value is None else float(value)
    return rates


def build_param_groups(model: nn.Module, args: Any, decay_names: Sequence[str]) -> tuple[list[dict], list[PartSummary]]:
    """Optimizer parameter groups, one decay and one no-decay group per part with trainable parameters
    (``name``: ``"<part>"`` or ``"<part>.no_decay"``), and a summary per part. ``decay_names``: the names
    weight decay applies to (transformers' ``get_decay_parameter_names``)."""
    parts = module_parts(model)
    rates = part_learning_rates(args)
    decay = set(decay_names)
    members: dict[str, dict[bool, list[nn.Parameter]]] = {p: {True: [], False: []} for p in parts}
    totals = {p: [0, 0] for p in parts}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen:  # tied weights appear once
            continue
        seen.add(id(param))
        part = part_of(name, parts)
        totals[part][0] += param.numel()
        if param.requires_grad:
            totals[part][1] += param.numel()
            members[part][name in decay].append(param)
    groups = []
    for part, by_decay in members.items():
        for decays in (True, False):
            if by_decay[decays]:
                groups.append({"params": by_decay[decays], "lr": rates.get(part, float(args.learning_rate)),
                               "weight_decay": float(args.weight_decay) if decays else 0.0,
                               "name": part if decays else f"{part}.no_decay"})
    summary = [PartSummary(p, totals[p][0], totals[p][1], rates.get(p, float(args.learning_rate))) for p in parts]
    return groups, summary


def describe_parts(summary: Sequence[PartSummary]) -> str:
    """The logged table: each part's parameters, trainable share and learning rate (or ``frozen``)."""
    lines = ["parameters by part:"]
    for s in summary:
        if not s.total:
            continue
        rate = "frozen" if not s.trainable else f"lr {s.lr:g}"
        lines.append(f"  {s.part:<15} {s.total / 1e6:10.3f} M, trainable {s.trainable / 1e6:10.3f} M  {rate}")
    return "\n".join(lines)


__all__ = ["FAMILY_PARTS", "LR_KEYS", "PARTS", "PartSummary", "build_param_groups", "describe_parts",
           "module_parts", "part_learning_rates", "part_of"]
