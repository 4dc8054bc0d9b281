"""Which evaluators reproduce a checkpoint exactly, and how to run each (``python -m lmms_engine.export
routes --checkpoint DIR``).

Three routes exist; which ones apply follows from the checkpoint's config alone:

- ``lmms_engine.eval``: the engine's own evaluator, always (it runs the model as trained);
- lmms-eval ``llava_hf`` on the checkpoint as saved: only for transformers' own LLaVA-OneVision video
  layout (bilinear pooling at stride 2, one newline token, no faster frames), the only one plain
  transformers builds. Any other layout is saved with ``model_type: lmms_video_llava``, which plain
  transformers refuses (:class:`~lmms_engine.models.llava_video.LlavaVideoConfig`);
- lmms-eval ``llava_vid`` on a LLaVA-NeXT-format export: when LLaVA-NeXT's model code computes what
  the model computes (:func:`~lmms_engine.export.llava_next.llava_next_incompatibilities` is empty).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EvaluationRoute:
    """One evaluator and whether it reproduces the checkpoint: ``command`` when it does, ``reasons`` why
    not otherwise."""

    name: str
    exact: bool
    command: str | None = None
    reasons: tuple[str, ...] = ()


def evaluation_routes(config: Any, checkpoint: str | os.PathLike = "CHECKPOINT",
                      max_frames: int = 32) -> list[EvaluationRoute]:
    """The three routes (module docstring) for a LLaVA-OneVision HF ``config`` saved at ``checkpoint``."""
    from lmms_engine.data.preprocess import ProcessorInfo
    from lmms_engine.export.llava_next import llava_next_incompatibilities

    layout = ProcessorInfo.from_model_config(config).layout
    routes = [EvaluationRoute(
        "lmms_engine.eval", True,
        f"python -m lmms_engine.eval --checkpoint {checkpoint} --data-path HELD_OUT.json")]
    if layout.is_hf_native:
        routes.append(EvaluationRoute(
            "lmms-eval llava_hf", True,
            f"python -m lmms_eval --model llava_hf --model_args pretrained={checkpoint},device_map=auto,"
            f"max_frames_num={max_frames} --tasks TASKS --batch_size 1 --force_simple --output_path ./logs/"))
    else:
        routes.append(EvaluationRoute(
            "lmms-eval llava_hf", False,
            reasons=(f"video layout {layout.to_dict()} is not transformers' LLaVA-OneVision one (bilinear, "
                     f"stride 2, one_token, no faster video): plain transformers would build other video tokens; "
                     f"the checkpoint's model_type lmms_video_llava makes it refuse to load",)))
    problems = llava_next_incompatibilities(config)
    if problems:
        routes.append(EvaluationRoute("lmms-eval llava_vid (LLaVA-NeXT export)", False, reasons=tuple(problems)))
    else:
        export = f"{os.fspath(checkpoint).rstrip('/')}-llava-qwen"  # llava_vid reads the class from the name
        routes.append(EvaluationRoute(
            "lmms-eval llava_vid (LLaVA-NeXT export)", True,
            f"python -m lmms_engine.export llava-next --checkpoint {checkpoint} --output {export}  "
            f"(then the lmms-eval command it prints)"))
    return routes


def describe_routes(routes: list[EvaluationRoute]) -> str:
    """The routes as lines of text: each one exact (with its command) or not (with why)."""
    lines = []
    for route in routes:
        if route.exact:
            lines.append(f"- {route.name}: reproduces this checkpoint\n    {route.command}")
        else:
            lines.append(f"- {route.name}: does not reproduce this checkpoint\n"
                         + "\n".join(f"    {reason}" for reason in route.reasons))
    return "\n".join(lines)


__all__ = ["EvaluationRoute", "describe_routes", "evaluation_routes"]
