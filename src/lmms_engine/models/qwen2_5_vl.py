"""Qwen2.5-VL with the engine's video training: the autoregressive loss, packing, freezing.

``Qwen2_5_VLVideoForConditionalGeneration`` subclasses transformers' ``Qwen2_5_VLForConditionalGeneration``
(same modules and parameter names: hub checkpoints load as they are, saved checkpoints load in plain
transformers); what it adds is :class:`~lmms_engine.models.qwen_vl_common.QwenVideoMixin`. Qwen2.5-VL
specifics: patches of 14, window attention in most vision blocks (the pre-merger features come out in
window order and are put back in raster order for the targets), temporal positions scaled by
``second_per_grid_ts * tokens_per_second``.
"""

from __future__ import annotations

import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from lmms_engine.models.qwen_vl_common import QwenVideoMixin, raster_merge_units, register_weight_renaming


class Qwen2_5_VLVideoForConditionalGeneration(QwenVideoMixin, Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL for video training (module docstring)."""

    family = "qwen2_5_vl"
    uses_second_per_grid = True

    def _targets_in_raster_order(self, features: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        return raster_merge_units(features, grid_thw, self.config.vision_config)


register_weight_renaming(Qwen2_5_VLVideoForConditionalGeneration, Qwen2_5_VLForConditionalGeneration)

__all__ = ["Qwen2_5_VLVideoForConditionalGeneration"]
