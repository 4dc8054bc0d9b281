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


@pytest.mark.parametrize("target_encoder", ["shared", "copy"])
def test_a_list_of_layers_sets_the_model_and_the_autoregressive_targets_alike(target_encoder: str) -> None:
    """``vision_feature_layer: [-2, -1]`` in autoregressive_config (as in the model): the targets are the
    same concatenated features the projector reads, 2 x 64 wide, read through one function."""
    from model_support import AR_SMALL, video_batch

    torch.manual_seed(0)
    layers = [-2, -1]
    model = build_model({"tiny_config": {"vision_feature_layer": layers}, "enable_autoregressive": True,
                         "freeze_vision_tower": target_encoder == "shared",
                         "autoregressive_config": {**AR_SMALL, "vision_feature_layer": layers,
                                                   "target_encoder": target_encoder}})
    module = model.autoregressive_module
    assert module.target_encoder_mode == target_encoder
    assert module.config.vision_feature_layer == layers and module.config.embedding_dim == 128
    frames = torch.randn(1, 3, 3, 64, 64)
    with torch.no_grad():
        features, _ = model.encode_frames(frames[0])
        torch.testing.assert_close(module.encode_targets(frames)[0], features, rtol=0, atol=0)
    out = model(**video_batch(model, [4, 3], max_frames=4))
    assert int(out.loss_terms.autoregressive["all"].count) > 0 and torch.isfinite(out.loss)
    with pytest.raises(ValueError, match=r"vision_feature_layer=\[-1\] differs from the model's"):
        build_model({"tiny_config": {"vision_feature_layer": layers}, "enable_autoregressive": True,
                     "autoregressive_config": {**AR_SMALL, "vision_feature_layer": [-1]}})
