"""Spatial pooling (LLaVA-NeXT get_2dPool arithmetic) and the frame-level causal mask, on hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from lmms_engine.models.video_frame_utils import FrameLevelMaskGenerator, MultiScaleVideoFrameLoader, spatial_pool
from lmms_engine.video.pooling import pooled_side

pool = MultiScaleVideoFrameLoader.apply_spatial_pooling


def grid_features(side: int, dim: int = 1) -> torch.Tensor:
    """``[1, side*side, dim]``: patch (r, c) holds ``r * side + c`` in channel 0 and ``100 + that`` in channel 1."""
    values = torch.arange(side * side, dtype=torch.float32)
    channels = [values + 100 * d for d in range(dim)]
    return torch.stack(channels, dim=-1)[None]


# --- pooling ------------------------------------------------------------------------------------------

def test_average_and_max_on_a_4x4_grid():
    # grid 0..15 row-major; 2x2 windows: {0,1,4,5} {2,3,6,7} {8,9,12,13} {10,11,14,15}
    x = grid_features(4, dim=2)
    avg = pool(x, stride=2, mode="average")
    assert avg.shape == (1, 4, 2)
    assert avg[0, :, 0].tolist() == [2.5, 4.5, 10.5, 12.5]
    assert avg[0, :, 1].tolist() == [102.5, 104.5, 110.5, 112.5]  # channels pooled independently
    assert pool(x, stride=2, mode="max")[0, :, 0].tolist() == [5.0, 7.0, 13.0, 15.0]


def test_odd_grid_floors_for_average_and_max():
    x = grid_features(3)  # 0..8; floor(3 / 2) = 1: only the top-left window {0, 1, 3, 4}
    assert pool(x, 2, "average")[0, :, 0].tolist() == [2.0]
    assert pool(x, 2, "max")[0, :, 0].tolist() == [4.0]
    y = grid_features(5)  # 5x5 -> 2x2; window {0,1,5,6} -> 3.0, {2,3,7,8} -> 5.0, {10,11,15,16}, {12,13,17,18}
    assert pool(y, 2, "average")[0, :, 0].tolist() == [3.0, 5.0, 13.0, 15.0]


def test_bilinear_ceils_and_interpolates_without_corner_alignment():
    # 3x3 -> ceil(3/2) = 2 per side; align_corners=False samples source coords (i + 0.5) * 1.5 - 0.5 =
    # 0.25 and 1.75. Values are linear (3r + c), so bilinear reproduces them exactly:
    # (0.25, 0.25) -> 1.0, (0.25, 1.75) -> 2.5, (1.75, 0.25) -> 5.5, (1.75, 1.75) -> 7.0
    out = pool(grid_features(3), stride=2, mode="bilinear")
    torch.testing.assert_close(out[0, :, 0], torch.tensor([1.0, 2.5, 5.5, 7.0]))
    # 4x4 -> 2x2 samples (0.5, 0.5), (0.5, 2.5), ...: the 2x2 window means, same as average here
    torch.testing.assert_close(pool(grid_features(4), 2, "bilinear")[0, :, 0], torch.tensor([2.5, 4.5, 10.5, 12.5]))


@pytest.mark.parametrize("stride, counts", [(2, (169, 169, 196)), (4, (36, 36, 49))])
def test_siglip_27x27_token_counts(stride, counts):
    x = torch.randn(3, 729, 8)  # [T, P, D]
    got = tuple(pool(x, stride, mode).shape[1] for mode in ("average", "max", "bilinear"))
    assert got == counts
    assert tuple(pooled_side(27, stride, m) ** 2 for m in ("average", "max", "bilinear")) == counts


def test_leading_dims_and_stride_one():
    x = torch.randn(2, 3, 16, 5)  # [B, T, P, D]
    out = spatial_pool(x, 2, "average")
    assert out.shape == (2, 3, 4, 5)
    torch.testing.assert_close(out[1, 2], pool(x[1, 2], 2, "average"))
    assert torch.equal(spatial_pool(x, 1, "max"), x)


def test_gradient_flows_through_pooling():
    x = torch.randn(2, 9, 4, requires_grad=True)
    pool(x, 2, "bilinear").sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("args, match", [
    ((torch.randn(2, 10, 4), 2, "average"), "square"),
    ((torch.randn(2, 9, 4), 0, "average"), "stride"),
    ((torch.randn(2, 9, 4), 2.0, "average"), "stride"),
    ((torch.randn(2, 9, 4), 2, "avg"), "average, max, bilinear"),
    ((torch.randn(2, 4, 4), 3, "max"), "stride > side"),
    ((torch.randn(9), 2, "average"), r"\[\.\.\., P, D\]"),
])
def test_pooling_errors(args, match):
    with pytest.raises(ValueError, match=match):
        pool(*args)


# --- frame causal mask --------------------------------------------------------------------------------

def test_causal_frame_mask_matches_the_hand_written_block_pattern():
    T, F = True, False
    expected = torch.tensor([  # 3 frames x 2 patches: block lower-triangular, full inside a frame
        [T, T, F, F, F, F],
        [T, T, F, F, F, F],
        [T, T, T, T, F, F],
        [T, T, T, T, F, F],
        [T, T, T, T, T, T],
        [T, T, T, T, T, T],
    ])
    mask = FrameLevelMaskGenerator().create_causal_frame_mask(num_frames=3, num_patches_per_frame=2)
    assert mask.dtype == torch.bool and torch.equal(mask, expected)


def test_guide_mask_shape_and_structure():
    mask = FrameLevelMaskGenerator().create_causal_frame_mask(num_frames=4, num_patches_per_frame=9)
    assert mask.shape == (36, 36)
    for i in range(36):
        for j in range(36):
            assert bool(mask[i, j]) == (j // 9 <= i // 9)


def test_additive_form_blocks_exactly_the_masked_keys():
    gen = FrameLevelMaskGenerator()
    mask = gen.create_causal_frame_mask(2, 2)
    additive = gen.to_additive(mask, torch.bfloat16)
    assert additive.dtype == torch.bfloat16
    assert torch.equal(additive == 0, mask)
    assert (additive[~mask] == torch.finfo(torch.bfloat16).min).all()
    # in attention: a query of frame 0 gives zero weight to frame 1's keys
    scores = torch.zeros(4, 4) + gen.to_additive(mask)
    weights = scores.softmax(-1)
    torch.testing.assert_close(weights[0], torch.tensor([0.5, 0.5, 0.0, 0.0]))
    torch.testing.assert_close(weights[3], torch.full((4,), 0.25))


def test_mask_errors():
    gen = FrameLevelMaskGenerator()
    with pytest.raises(ValueError, match="num_frames"):
        gen.create_causal_frame_mask(0, 4)
    with pytest.raises(TypeError, match="boolean"):
        gen.to_additive(torch.ones(2, 2))
    with pytest.raises(TypeError, match="boolean"):
        gen.visualize_mask(torch.ones(4, 4))


def _is_png(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_guide_mask_debugging_snippet_saves_a_picture(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile('''
from lmms_engine.models.video_frame_utils import FrameLevelMaskGenerator

mask_gen = FrameLevelMaskGenerator()
mask = mask_gen.create_causal_frame_mask(num_frames=4, num_patches_per_frame=9)
mask_gen.visualize_mask(mask, title="Frame Causal Mask")   # saves a picture
''', "guide", "exec"), scope)
    assert _is_png(tmp_path / "frame_causal_mask.png")
    assert f"Frame Causal Mask: mask picture saved to {tmp_path / 'frame_causal_mask.png'}" in capsys.readouterr().out
    path = scope["mask_gen"].visualize_mask(scope["mask"], title="x", save_path=tmp_path / "sub" / "m.png")
    assert path == str(tmp_path / "sub" / "m.png") and _is_png(path)


def test_mask_picture_draws_frame_boundaries_and_a_legend(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from lmms_engine.video.masks import frame_block_size

    mask = FrameLevelMaskGenerator().create_causal_frame_mask(num_frames=4, num_patches_per_frame=9)
    assert frame_block_size(mask) == 9 and frame_block_size(torch.eye(6, dtype=torch.bool)) is None
    drawn: dict = {"h": [], "v": [], "legend": []}
    for name, key in (("axhline", "h"), ("axvline", "v")):
        original = getattr(Axes, name)
        monkeypatch.setattr(Axes, name, lambda self, y, *a, _o=original, _k=key, **k: (drawn[_k].append(y), _o(self, y, *a, **k))[1])
    original_legend = Axes.legend
    monkeypatch.setattr(Axes, "legend", lambda self, *a, **k: (drawn["legend"].append([h.get_label() for h in k["handles"]]),
                                                               original_legend(self, *a, **k))[1])
    FrameLevelMaskGenerator().visualize_mask(mask, save_path=tmp_path / "m.png")
    assert drawn["h"] == drawn["v"] == [8.5, 17.5, 26.5]  # between frames 0|1, 1|2, 2|3 (9 tokens each)
    assert drawn["legend"] == [["may attend", "masked", "frame boundary (9 tokens)"]]
