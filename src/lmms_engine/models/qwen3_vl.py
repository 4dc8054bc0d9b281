"""Qwen3-VL with the engine's video training: the autoregressive loss, packing, freezing.

``Qwen3VLVideoForConditionalGeneration`` subclasses transformers' ``Qwen3VLForConditionalGeneration``
(same modules and parameter names); what it adds is
:class:`~lmms_engine.models.qwen_vl_common.QwenVideoMixin`. Qwen3-VL specifics: patches of 16, full
attention per temporal group in every vision block (pre-merger features already in raster order),
deepstack features of some vision layers added to the first LLM layers (handed over with the main
vision output), per-group ``<t seconds>`` text and vision_start/vision_end pairs in the sequence, so the
rope index sees one video run per group.
"""

from __future__ import annotations

from transformers import Qwen3VLForConditionalGeneration

from lmms_engine.models.qwen_vl_common import QwenVideoMixin, register_weight_renaming


class Qwen3VLVideoForConditionalGeneration(QwenVideoMixin, Qwen3VLForConditionalGeneration):
    """Qwen3-VL for video training (module docstring)."""

    family = "qwen3_vl"


register_weight_renaming(Qwen3VLVideoForConditionalGeneration, Qwen3VLForConditionalGeneration)

__all__ = ["Qwen3VLVideoForConditionalGeneration"]
