"""Qwen2-VL with the engine's video training: the autoregressive loss, packing, freezing.

``Qwen2VLVideoForConditionalGeneration`` subclasses transformers' ``Qwen2VLForConditionalGeneration``
(same modules and parameter names); what it adds is
:class:`~lmms_engine.models.qwen_vl_common.QwenVideoMixin`. Qwen2-VL specifics: patches of 14, full
attention per temporal group in every vision block (pre-merger features in raster order), the block
width in ``vision_config.embed_dim`` (``hidden_size`` there is the LLM's), no temporal position scaling.
"""

from __future__ import annotations

from transformers import Qwen2VLForConditionalGeneration

from lmms_engine.models.qwen_vl_common import QwenVideoMixin, register_weight_renaming


class Qwen2VLVideoForConditionalGeneration(QwenVideoMixin, Qwen2VLForConditionalGeneration):
    """Qwen2-VL for video training (module docstring)."""

    family = "qwen2_vl"


register_weight_renaming(Qwen2VLVideoForConditionalGeneration, Qwen2VLForConditionalGeneration)

__all__ = ["Qwen2VLVideoForConditionalGeneration"]
