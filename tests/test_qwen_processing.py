"""Qwen-VL video preprocessing: sizes, grids, token counts, patches, text, against hand-computed values
and transformers' own PIL image processor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from lmms_engine.data.qwen_vision import (
    CLIP_MEAN,
    CLIP_STD,
    HALF,
    QwenVideoProcessing,
    group_timestamps,
    mm_token_type_ids,
    patchify,
    smart_resize,
)

QWEN25 = QwenVideoProcessing(family="qwen2_5_vl", patch_size=14)
QWEN3 = QwenVideoProcessing(family="qwen3_vl", patch_size=16, min_pixels=128 * 32 * 32, max_pixels=768 * 32 * 32,
                            image_mean=HALF, image_std=HALF, timestamps=True)


@pytest.mark.parametrize("height, width, factor, lo, hi, expected", [
    (90, 130, 28, 4 * 784, 16 * 784, (84, 140)),          # nearest multiples, inside the bounds
    (720, 1280, 28, 128 * 784, 768 * 784, (560, 1008)),   # above max: beta = sqrt(921600 / 602112)
    (48, 64, 28, 128 * 784, 768 * 784, (280, 392)),       # below min: beta = sqrt(100352 / 3072), ceil
    (720, 1280, 32, 128 * 1024, 768 * 1024, (640, 1152)),  # Qwen3-VL's factor: beta = sqrt(921600 / 786432)
])
def test_smart_resize_hand_computed_and_equal_to_transformers(height, width, factor, lo, hi, expected):
    assert smart_resize(height, width, factor, lo, hi) == expected
    assert smart_resize(height, width, factor, lo, hi) == tuple(hf_smart_resize(height, width, factor, lo, hi))


def test_smart_resize_rejects_extreme_aspect_ratio():
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2100, 28, 784, 784 * 100)


def test_grid_and_token_counts():
    # 720p, 8 frames, no total budget: 560x1008 -> 40x72 patches, 4 groups, 720 LLM tokens per group
    spec = QwenVideoProcessing(family="qwen2_5_vl", patch_size=14, total_pixels=None)
    assert spec.grid(8, 720, 1280) == (4, 40, 72)
    assert spec.tokens_per_group((4, 40, 72)) == 720
    assert spec.video_token_count((4, 40, 72)) == 2880
    # an odd frame count is padded to whole groups
    assert spec.grid(5, 720, 1280)[0] == 3
    # a total budget of 1000 tokens' worth of pixels over 16 frames caps each frame at
    # max(min(602112, 1000 * 784 * 2 / 16), 1.05 * 100352) = 105369 px -> 238 x 434 -> 224 x 420 (multiples of 28)
    capped = QwenVideoProcessing(family="qwen2_5_vl", patch_size=14, total_pixels=1000 * 784)
    assert capped.frame_size(16, 720, 1280) == smart_resize(720, 1280, 28, 100352, 105369) == (224, 420)
    assert capped.grid(16, 720, 1280) == (8, 16, 30)
    # Qwen3-VL: factor 32
    assert QWEN3.grid(4, 720, 1280) == (2, 40, 72)
    assert QWEN3.tokens_per_group((2, 40, 72)) == 720


@pytest.mark.parametrize("spec, mean, std", [(QWEN25, CLIP_MEAN, CLIP_STD), (QWEN3, HALF, HALF)])
@pytest.mark.parametrize("size", [(90, 130), (300, 200), (40, 50)])
def test_equal_to_transformers_pil_image_processor(spec, mean, std, size):
    """Two equal frames = transformers' image path (which repeats the image over the temporal patch)."""
    f = spec.factor
    small = QwenVideoProcessing(family=spec.family, patch_size=spec.patch_size, min_pixels=4 * f * f,
                                max_pixels=16 * f * f, total_pixels=None, image_mean=mean, image_std=std)
    image = torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(sum(size)))
    hf = Qwen2VLImageProcessorPil(patch_size=spec.patch_size, merge_size=2, temporal_patch_size=2,
                                  min_pixels=4 * f * f, max_pixels=16 * f * f, image_mean=list(mean),
                                  image_std=list(std))
    expected = hf(images=[Image.fromarray(image.permute(1, 2, 0).numpy())], return_tensors="pt")
    ours = small.preprocess(image[None].expand(2, -1, -1, -1).contiguous())
    assert list(ours.grid_thw) == expected["image_grid_thw"][0].tolist()
    diff = (ours.pixel_values - expected["pixel_values"]).abs().max().item()
    assert diff < 1e-6, f"max abs diff {diff}"


def test_patch_layout_time_and_merge_windows():
    """Frame k filled with value k (one value per channel): each patch row is (C, t, y, x); rows go by
    group, then 2x2 merge window in raster order, then the window's patches in raster order."""
    p, frames = 2, 4
    h, w = 8, 12  # 4 x 6 patches, 2 x 3 merge windows
    pixels = torch.zeros(frames, 3, h, w)
    for k in range(frames):
        pixels[k] = torch.tensor([k, 10 + k, 20 + k]).view(3, 1, 1)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pixels[:, 0] += (ys * 100 + xs * 1000).float()  # channel 0 also says where the pixel is
    patches, grid = patchify(pixels, patch_size=p)
    assert grid == (2, 4, 6)
    rows = patches.view(2, 2, 3, 2, 2, 3, 2, p, p)  # group, win_y, win_x, in_y, in_x, C, t, py, px
    for g in range(2):
        for t in range(2):
            assert torch.all(rows[g, :, :, :, :, 1, t] == 10 + 2 * g + t)
    # window (1, 2), patch (0, 1) in it, pixel (1, 0): y = 1*4 + 0*2 + 1 = 5, x = 2*4 + 1*2 + 0 = 10
    assert rows[1, 1, 2, 0, 1, 0, 0, 1, 0] == 2 + 5 * 100 + 10 * 1000


def test_odd_frame_count_repeats_last_frame():
    frames = torch.randint(0, 256, (3, 3, 56, 56), dtype=torch.uint8)
    spec = QwenVideoProcessing(family="qwen2_5_vl", patch_size=14, min_pixels=56 * 56, max_pixels=56 * 56)
    odd = spec.preprocess(frames)
    even = spec.preprocess(torch.cat([frames, frames[-1:]]))
    assert odd.grid_thw == (2, 4, 4)
    assert torch.equal(odd.pixel_values, even.pixel_values)


def test_qwen3_timestamps_text_and_token_types():
    assert group_timestamps([0.0, 0.5, 1.0, 1.5, 2.0]) == [0.25, 1.25, 2.0]
    text = QWEN3.placeholder_text((2, 4, 6), [0.25, 1.25])
    per_group = "<|vision_start|>" + "<|video_pad|>" * 6 + "<|vision_end|>"
    assert text == "<0.2 seconds>" + per_group + "<1.2 seconds>" + per_group
    assert QWEN25.placeholder_text((2, 4, 6)) == "<|vision_start|>" + "<|video_pad|>" * 12 + "<|vision_end|>"
    ids = torch.tensor([[5, 7, 7, 9, 8]])
    assert mm_token_type_ids(ids, video_token_id=7, image_token_id=8).tolist() == [[0, 2, 2, 0, 1]]


def test_second_per_grid_and_group_times_from_timestamps():
    frames = torch.zeros(4, 3, 56, 56, dtype=torch.uint8)
    out = QWEN25.preprocess(frames, timestamps=[0.0, 0.5, 1.0, 1.5])
    assert out.second_per_grid == pytest.approx(1.0)  # 2 frames per group at 2 fps
    assert out.group_times == [0.25, 1.25]
    assert np.isclose(QWEN25.preprocess(frames, sampled_fps=4.0).second_per_grid, 0.5)
