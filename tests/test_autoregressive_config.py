"""AutoregressiveConfig: the guide's keys and defaults, dict round trip, and every bad-config error."""

from __future__ import annotations

import pytest

from lmms_engine.models.autoregressive_config import AutoregressiveConfig
from lmms_engine.utils.config import ConfigError

# The guide's three parameter tables, key by key.
GUIDE_DEFAULTS = {
    "embedding_dim": 1152, "num_hist": 3, "loss_weight": 0.1, "num_heads": 8, "num_layers": 3,
    "use_frame_causal_mask": True,
    "use_fast_slow_frames": False, "fast_stride": 1, "slow_stride": 4, "num_fast": 8, "num_slow": 8,
    "enable_multiscale_pooling": False, "mm_spatial_pool_stride": 2, "mm_spatial_pool_mode": "average",
    "add_faster_video": False,
}


def test_defaults_are_the_guides_and_design_keys_exist():
    cfg = AutoregressiveConfig()
    got = cfg.to_dict()
    assert {k: got[k] for k in GUIDE_DEFAULTS} == GUIDE_DEFAULTS
    for key, type_ in {k: type(v) for k, v in GUIDE_DEFAULTS.items()}.items():
        assert type(got[key]) is type_, key
    assert (cfg.target_encoder, cfg.window, cfg.vision_feature_layer, cfg.vision_feature_select_strategy) == \
        ("auto", "sliding", -1, "full")


def test_round_trip_and_int_for_float():
    cfg = AutoregressiveConfig.from_dict({"embedding_dim": 64, "loss_weight": 1, "dropout": 0, "num_heads": 4})
    assert isinstance(cfg.loss_weight, float) and cfg.loss_weight == 1.0
    assert AutoregressiveConfig.from_dict(cfg.to_dict()) == cfg
    assert AutoregressiveConfig.from_dict(None) == AutoregressiveConfig()


def test_layout_overrides_only_with_multiscale():
    assert AutoregressiveConfig(add_faster_video=True).layout_overrides() == {}
    cfg = AutoregressiveConfig(enable_multiscale_pooling=True, mm_spatial_pool_stride=4,
                               mm_spatial_pool_mode="max", add_faster_video=True)
    assert cfg.layout_overrides() == {"mm_spatial_pool_stride": 4, "mm_spatial_pool_mode": "max",
                                      "add_faster_video": True}


@pytest.mark.parametrize(
    "data, fragments",
    [
        ({"num_hsit": 3}, ["autoregressive_config", "'num_hsit'", "did you mean 'num_hist'"]),
        ({"loss_wieght": 0.1}, ["'loss_wieght'", "did you mean 'loss_weight'"]),
        ({"mm_spatial_pool_mod": "average"}, ["did you mean 'mm_spatial_pool_mode'"]),
        ({"num_hist": "3"}, ["autoregressive_config.num_hist", "expected int", "'3'"]),
        ({"num_hist": True}, ["num_hist", "expected int"]),
        ({"use_frame_causal_mask": "yes"}, ["use_frame_causal_mask", "expected bool"]),
        ({"loss_weight": "0.1"}, ["loss_weight", "expected float"]),
        ({"num_hist": 0}, ["num_hist must be >= 1, got 0"]),
        ({"num_layers": 0}, ["num_layers must be >= 1"]),
        ({"slow_stride": 0}, ["slow_stride must be >= 1"]),
        ({"num_fast": 1}, ["num_fast must be >= 2"]),
        ({"embedding_dim": 100}, ["embedding_dim (100) must be divisible by num_heads (8)"]),
        ({"loss_weight": -0.5}, ["loss_weight must be a finite number >= 0, got -0.5"]),
        ({"loss_weight": float("nan")}, ["loss_weight must be a finite number"]),
        ({"dropout": 1.0}, ["dropout must be in [0, 1)"]),
        ({"mlp_ratio": 0}, ["mlp_ratio must be > 0"]),
        ({"mm_spatial_pool_mode": "mean"}, ["unknown spatial pool mode 'mean'", "average, max, bilinear"]),
        ({"mm_spatial_pool_stride": 0}, ["spatial pool stride must be an integer >= 1"]),
        ({"target_encoder": "frozen"}, ["target_encoder", "'frozen'", "'auto', 'shared', 'copy'"]),
        ({"window": "one"}, ["window", "'all', 'random'"]),
        ({"vision_feature_select_strategy": "cls"}, ["'default', 'full'"]),
    ],
)
def test_bad_config_errors_name_the_key(data, fragments):
    with pytest.raises(ConfigError) as info:
        AutoregressiveConfig.from_dict(data)
    assert isinstance(info.value, ValueError)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_not_a_mapping_and_direct_construction_are_checked():
    with pytest.raises(ConfigError, match="expected a mapping"):
        AutoregressiveConfig.from_dict([("num_hist", 3)])
    with pytest.raises(ValueError, match="num_hist: expected int, got '3'"):
        AutoregressiveConfig(num_hist="3")
    with pytest.raises(ValueError, match="window: invalid value 'some'"):
        AutoregressiveConfig(window="some")


def test_vision_feature_layer_takes_what_the_model_takes_a_layer_or_a_list():
    assert AutoregressiveConfig.from_dict({"vision_feature_layer": [-2, -1]}).vision_feature_layer == [-2, -1]
    assert AutoregressiveConfig(vision_feature_layer=(0, 1)).vision_feature_layer == [0, 1]
    with pytest.raises(ConfigError, match=r"vision_feature_layer: expected int or list\[int\], got \['a'\]"):
        AutoregressiveConfig.from_dict({"vision_feature_layer": ["a"]})
    with pytest.raises(ConfigError, match="vision_feature_layer"):
        AutoregressiveConfig.from_dict({"vision_feature_layer": 1.5})
