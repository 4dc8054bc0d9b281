"""The tower layer the projector reads (``vision_feature_layer``) is honoured for every valid index."""

from __future__ import annotations

import pytest
import torch

from lmms_engine.models.builder import build_model


@pytest.mark.parametrize("layer", [0, 1, -1])
def test_encode_frames_reads_the_configured_layer(layer: int | list[int]) -> None:
    torch.manual_seed(0)
    model = build_model({}).eval()
    model.config.vision_feature_layer = layer
    frames = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        features, projected = model.encode_frames(frames)
        states = model.vision_tower(frames, output_hidden_states=True, return_dict=True).hidden_states
    layers = layer if isinstance(layer, list) else [layer]
    expected = torch.cat([states[i] for i in layers], dim=-1)
    assert features.shape == (3, 64, 64 * len(layers))
    torch.testing.assert_close(features, expected, rtol=0, atol=0)
    if layer == 0:
        # layer 0 = the patch embeddings (+ position embeddings), before any encoder layer
        torch.testing.assert_close(features, model.vision_tower.embeddings(frames), rtol=0, atol=0)
    assert projected.shape == (3, 64, model.config.text_config.hidden_size)
