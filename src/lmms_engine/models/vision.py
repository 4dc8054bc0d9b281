"""Facts of a ViT-style vision tower (SigLIP in LLaVA-OneVision) that several parts read.

- :func:`vision_width`: width of the tower's blocks, read from its config.
- :func:`patch_grid_side`: patches per side of a frame, ``image_size // patch_size`` (the conv drops
  the remainder; SigLIP 384/14 -> 27).
- :func:`feature_size`: width of the features read at ``vision_feature_layer`` (a list of layers is
  concatenated: width x layers).
- :func:`select_features`: those features for a stack of frames, after the select strategy.

The model's video path and the autoregressive targets read features through the same function, so
both see exactly the same tensor.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

FeatureLayer = int | Sequence[int]


def vision_width(vision_config: Any) -> int:
    """Width of the vision tower's blocks: ``embed_dim`` where the config has one (Qwen2-VL, whose vision
    ``hidden_size`` is the LLM's), else ``hidden_size`` (SigLIP, Qwen2.5-VL, Qwen3-VL)."""
    return int(getattr(vision_config, "embed_dim", None) or vision_config.hidden_size)


def patch_grid_side(vision_config: Any) -> int:
    """Patches per side of a frame for a config with ``image_size`` and ``patch_size``."""
    return int(vision_config.image_size) // int(vision_config.patch_size)


def feature_size(vision_width: int, layer: FeatureLayer) -> int:
    """Width of the features at ``layer``: the tower width, times the number of layers for a list."""
    return vision_width if isinstance(layer, int) else vision_width * len(layer)


def select_features(tower: nn.Module, pixel_values: torch.Tensor, layer: FeatureLayer, strategy: str) -> torch.Tensor:
    """Tower features of frames ``[N, 3, H, W]`` -> ``[N, P, D]``.

    ``hidden_states[layer]`` (0 = the patch embeddings; a list of layers is concatenated on the
    feature axis), then ``strategy``: ``default`` drops the first token, ``full`` keeps all.
    """
    # output_hidden_states, not a layer index argument: layer 0 is falsy and would return nothing
    states = tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
    if isinstance(layer, int):
        features = states[layer]
    else:
        features = torch.cat([states[i] for i in layer], dim=-1)
    return features[:, 1:] if strategy == "default" else features


__all__ = ["FeatureLayer", "feature_size", "patch_grid_side", "select_features"]
