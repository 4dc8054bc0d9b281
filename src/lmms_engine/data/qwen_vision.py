"""Qwen-VL video preprocessing (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) without torchvision.

A video becomes what transformers' Qwen2-VL / Qwen3-VL processors produce from it:

- **Frame size** (:func:`smart_resize`): both sides multiples of ``factor = patch_size * merge_size``
  (28 for Qwen2-VL and Qwen2.5-VL, 32 for Qwen3-VL), the aspect ratio kept as closely as possible, the area
  within ``[min_pixels, max_pixels]`` per frame. A total budget over the whole video
  (``total_pixels``, qwen-vl-utils' ``VIDEO_TOTAL_PIXELS`` rule) lowers the per-frame cap to
  ``max(min(max_pixels, total_pixels * temporal_patch_size / T), 1.05 * min_pixels)``; one size for all
  frames of a video.
- **Frames**: decoded by our PyAV reader at native size (sampling by fps, Qwen's default 2, or by count),
  resized with PIL's antialiased bicubic filter (:func:`resize_frames`, as transformers' PIL
  processor does), rescaled by 1/255 and normalised with the family's mean/std
  (Qwen2-VL, Qwen2.5-VL: OpenAI CLIP's; Qwen3-VL: 0.5/0.5). An odd frame count is padded by repeating the last
  frame (``temporal_patch_size`` 2), as transformers' ``patchify`` does.
- **Patches** (:func:`patchify`): ``[grid_t * grid_h * grid_w, 3 * temporal_patch_size * p * p]`` in
  transformers' order: temporal group, then 2x2 merge windows in raster order, then the 4 patches of
  each window in raster order; each row is ``(channel, time, y, x)`` flattened. ``video_grid_thw`` =
  ``(grid_t, grid_h, grid_w)`` in patches; the LLM sees ``grid_h * grid_w / merge_size**2`` tokens per
  temporal group.
- **Text** (:meth:`QwenVideoProcessing.placeholder_text`): Qwen2-VL and Qwen2.5-VL replace the chat template's
  ``<|vision_start|><|video_pad|><|vision_end|>`` with the start token, one ``<|video_pad|>`` per LLM
  token and the end token. Qwen3-VL replaces it with, per temporal group, ``<{t:.1f} seconds>`` (the
  mean time of the group's two frames) and its own vision_start / video_pads / vision_end, as Qwen's
  reference processor does.
- **Images** (:meth:`QwenVideoProcessing.preprocess_image`): ``smart_resize`` within the checkpoint's image
  ``size`` (``image_min_pixels`` / ``image_max_pixels``: its ``preprocessor_config.json``, else transformers'
  ``56 * 56`` / ``28 * 28 * 1280``), the same resize and normalisation, and one temporal group holding the
  image ``temporal_patch_size`` times (transformers' ``Qwen2VLImageProcessorPil``): ``image_grid_thw`` ``(1, h,
  w)``, ``h * w / merge_size**2`` ``<|image_pad|>`` tokens between one vision_start / vision_end pair.
- **Token types** (:func:`mm_token_type_ids`): 0 text, 1 image (``<|image_pad|>``), 2 video (``<|video_pad|>``), as the model's
  rope-index function expects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch

#: transformers' OPENAI_CLIP_MEAN / STD (Qwen2-VL and Qwen2.5-VL) and IMAGENET_STANDARD (Qwen3-VL).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
HALF: tuple[float, float, float] = (0.5, 0.5, 0.5)

VIDEO_PAD = "<|video_pad|>"
IMAGE_PAD = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
#: What Qwen's chat templates render for a ``{"type": "video"}`` content part.
TEMPLATE_VIDEO_TEXT = VISION_START + VIDEO_PAD + VISION_END
#: What they render for a ``{"type": "image"}`` content part.
TEMPLATE_IMAGE_TEXT = VISION_START + IMAGE_PAD + VISION_END
#: transformers' ``Qwen2VLImageProcessor`` defaults (``size``'s ``shortest_edge`` / ``longest_edge``), used when
#: a checkpoint has no ``preprocessor_config.json``.
IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS = 56 * 56, 28 * 28 * 1280

QWEN_FAMILIES: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
#: Token-type ids of ``mm_token_type_ids`` (transformers' convention).
TEXT_TYPE, IMAGE_TYPE, VIDEO_TYPE = 0, 1, 2
#: Qwen's default sampling rate (qwen-vl-utils' FPS, transformers' Qwen3-VL ``fps``).
DEFAULT_FPS = 2.0


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """``(H', W')``: multiples of ``factor``, area within ``[min_pixels, max_pixels]``, aspect kept.

    Each side is first rounded to the nearest multiple of ``factor``; an area above ``max_pixels`` is
    scaled down by ``sqrt(H * W / max_pixels)`` with sides floored to multiples (at least ``factor``),
    an area below ``min_pixels`` scaled up with sides ceiled. Qwen2-VL's rule (transformers'
    ``smart_resize``); aspect ratios above 200 are rejected as there.
    """
    if height < 1 or width < 1:
        raise ValueError(f"frame size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio of a {height}x{width} frame is above 200; Qwen-VL cannot take it")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def pad_to_groups(frames: torch.Tensor, temporal_patch_size: int) -> torch.Tensor:
    """``[T, ...]`` -> ``[ceil(T / tp) * tp, ...]``, repeating the last frame (transformers' padding)."""
    pad = -frames.shape[0] % temporal_patch_size
    if pad:
        frames = torch.cat([frames, frames[-1:].expand(pad, *frames.shape[1:])], dim=0)
    return frames


def patchify(pixels: torch.Tensor, patch_size: int, temporal_patch_size: int = 2,
             merge_size: int = 2) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Normalised frames ``[T, C, H, W]`` -> ``(patches [t*h*w, C*tp*p*p], (t, h, w))`` (module docstring).

    ``T`` is padded to a multiple of ``temporal_patch_size`` by repeating the last frame; ``H`` and
    ``W`` must be multiples of ``patch_size * merge_size``.
    """
    if pixels.dim() != 4:
        raise ValueError(f"expected frames [T, C, H, W], got {tuple(pixels.shape)}")
    factor = patch_size * merge_size
    _, channels, height, width = pixels.shape
    if height % factor or width % factor:
        raise ValueError(f"frame size {height}x{width} is not a multiple of patch_size * merge_size = {factor}")
    pixels = pad_to_groups(pixels, temporal_patch_size)
    grid_t = pixels.shape[0] // temporal_patch_size
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = pixels.reshape(grid_t, temporal_patch_size, channels, grid_h // merge_size, merge_size, patch_size,
                             grid_w // merge_size, merge_size, patch_size)
    # -> (t, h/m, w/m, m_h, m_w, C, tp, p_y, p_x)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    flat = patches.reshape(grid_t * grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size)
    return flat, (grid_t, grid_h, grid_w)


def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 ``[T, 3, H, W]`` -> uint8 ``[T, 3, *size]`` with PIL's antialiased ``BICUBIC`` filter.

    transformers' Qwen-VL processors resize with it (its PIL backend; the torchvision backend's
    antialiased bicubic differs from PIL's by up to ~20 grey levels at some sizes: torch's kernel has
    a = -0.75, PIL's -0.5, and PIL orders its two passes by the image's shape), so PIL itself is used:
    the pixels equal transformers' PIL processor's exactly.
    """
    import numpy as np
    from PIL import Image

    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    out_h, out_w = size
    hwc = frames.permute(0, 2, 3, 1).contiguous().numpy()
    resized = [np.asarray(Image.fromarray(frame).resize((out_w, out_h), Image.Resampling.BICUBIC)) for frame in hwc]
    return torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).contiguous()


def mm_token_type_ids(input_ids: torch.Tensor, video_token_id: int, image_token_id: int | None = None) -> torch.Tensor:
    """``[..., L]`` int: 2 where ``input_ids`` is the video pad token, 1 for the image pad, else 0."""
    types = torch.where(input_ids == video_token_id, VIDEO_TYPE, TEXT_TYPE)
    if image_token_id is not None:
        types = torch.where(input_ids == image_token_id, IMAGE_TYPE, types)
    return types.to(torch.int32)


def group_timestamps(timestamps: Sequence[float], temporal_patch_size: int = 2) -> list[float]:
    """Mean time of the first and last frame of each temporal group (the last frame repeats to fill)."""
    stamps = list(timestamps)
    if not stamps:
        return []
    while len(stamps) % temporal_patch_size:
        stamps.append(stamps[-1])
    return [(stamps[i] + stamps[i + temporal_patch_size - 1]) / 2 for i in range(0, len(stamps), temporal_patch_size)]


@dataclass(frozen=True)
class QwenVideoInputs:
    """One video, ready for the model.

    Attributes:
        pixel_values: ``[t*h*w, 3*tp*p*p]`` float32 patches (``pixel_values_videos`` rows of this video).
        grid_thw: ``(t, h, w)`` in patches (this video's ``video_grid_thw`` row).
        group_times: ``t`` seconds, the mean time of each temporal group (Qwen3-VL's timestamps).
        second_per_grid: seconds per temporal group (Qwen2.5-VL's ``second_per_grid_ts``).
        frame_size: ``(H, W)`` pixels after resizing.
    """

    pixel_values: torch.Tensor
    grid_thw: tuple[int, int, int]
    group_times: list[float]
    second_per_grid: float
    frame_size: tuple[int, int]


@dataclass(frozen=True)
class QwenImageInputs:
    """One image, ready for the model.

    Attributes:
        pixel_values: ``[h*w, 3*tp*p*p]`` float32 patches (``pixel_values`` rows of this image; the image is
            repeated ``temporal_patch_size`` times along time, as transformers' image processors do).
        grid_thw: ``(1, h, w)`` in patches (this image's ``image_grid_thw`` row).
        size: ``(H, W)`` pixels after resizing.
    """

    pixel_values: torch.Tensor
    grid_thw: tuple[int, int, int]
    size: tuple[int, int]


def checkpoint_image_pixels(folder: Any) -> dict[str, int]:
    """``{"image_min_pixels", "image_max_pixels"}`` from a checkpoint folder's image processor settings
    (``preprocessor_config.json``, else the ``image_processor`` entry of a nested ``processor_config.json``,
    :func:`~lmms_engine.export.processor.sub_processor_settings`): ``size.shortest_edge`` /
    ``size.longest_edge``, or the older ``min_pixels`` / ``max_pixels``; empty when the folder or the
    settings are missing."""
    from pathlib import Path

    from lmms_engine.export.processor import IMAGE_PROCESSOR_FILE, folder_processor_files, sub_processor_settings

    if not folder or not Path(str(folder)).is_dir():
        return {}
    data = sub_processor_settings(folder_processor_files(str(folder)), IMAGE_PROCESSOR_FILE) or {}
    size = data.get("size") if isinstance(data.get("size"), dict) else {}
    low = size.get("shortest_edge") or size.get("min_pixels") or data.get("min_pixels")
    high = size.get("longest_edge") or size.get("max_pixels") or data.get("max_pixels")
    return {k: int(v) for k, v in (("image_min_pixels", low), ("image_max_pixels", high)) if v}


@dataclass(frozen=True)
class QwenVideoProcessing:
    """The video preprocessing of one Qwen-VL family (module docstring); build with :meth:`for_model`.

    Attributes:
        family: ``qwen2_vl``, ``qwen2_5_vl`` or ``qwen3_vl``.
        patch_size, temporal_patch_size, merge_size: the vision config's.
        min_pixels, max_pixels: per-frame area bounds (pixels).
        total_pixels: area budget over the whole video (pixels x frames); None = no total bound.
        image_mean, image_std: per-channel normalisation.
        timestamps: Qwen3-VL's per-group ``<t seconds>`` text and vision_start/end pair per group.
        image_min_pixels, image_max_pixels: area bounds of images (the checkpoint's image processor ``size``).
    """

    family: str
    patch_size: int
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 768 * 28 * 28
    total_pixels: int | None = None
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    timestamps: bool = False
    image_min_pixels: int = IMAGE_MIN_PIXELS
    image_max_pixels: int = IMAGE_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.family not in QWEN_FAMILIES:
            raise ValueError(f"unknown Qwen-VL family {self.family!r}; valid: {', '.join(QWEN_FAMILIES)}")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got min_pixels={self.min_pixels}, "
                             f"max_pixels={self.max_pixels}")
        if self.total_pixels is not None and self.total_pixels < self.min_pixels:
            raise ValueError(f"total_pixels={self.total_pixels} is below min_pixels={self.min_pixels}")
        if not 0 < self.image_min_pixels <= self.image_max_pixels:
            raise ValueError(f"need 0 < image_min_pixels <= image_max_pixels, got {self.image_min_pixels}, "
                             f"{self.image_max_pixels}")

    @property
    def factor(self) -> int:
        """Frame sides are multiples of this (``patch_size * merge_size``)."""
        return self.patch_size * self.merge_size

    @classmethod
    def for_model(cls, config: Any, **overrides: Any) -> "QwenVideoProcessing":
        """Defaults of the family of ``config`` (a Qwen2-VL / Qwen2.5-VL / Qwen3-VL HF config); ``overrides`` (None
        values ignored) set ``min_pixels``, ``max_pixels``, ``total_pixels``, ``image_min_pixels``,
        ``image_max_pixels``. Defaults (qwen-vl-utils): 128 to 768 LLM tokens' worth of pixels per frame, a
        total of 0.9 * 128000 tokens' worth; images: the checkpoint's ``preprocessor_config.json``
        (:func:`checkpoint_image_pixels` of ``config._name_or_path``), else transformers' defaults."""
        family = config.model_type
        if family not in QWEN_FAMILIES:
            raise ValueError(f"model_type {family!r} is not a Qwen-VL family ({', '.join(QWEN_FAMILIES)})")
        vision = config.vision_config
        factor = vision.patch_size * vision.spatial_merge_size
        qwen3 = family == "qwen3_vl"
        spec = cls(family=family, patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
                   merge_size=vision.spatial_merge_size, min_pixels=128 * factor * factor,
                   max_pixels=768 * factor * factor, total_pixels=int(0.9 * 128000 * factor * factor),
                   image_mean=HALF if qwen3 else CLIP_MEAN, image_std=HALF if qwen3 else CLIP_STD,
                   timestamps=qwen3, **checkpoint_image_pixels(getattr(config, "_name_or_path", None)))
        given = {k: v for k, v in overrides.items() if v is not None}
        return replace(spec, **given) if given else spec

    def frame_size(self, num_frames: int, height: int, width: int) -> tuple[int, int]:
        """``(H', W')`` of every frame of a video of ``num_frames`` frames at ``height x width``."""
        max_pixels = self.max_pixels
        if self.total_pixels is not None:
            share = self.total_pixels * self.temporal_patch_size / max(num_frames, 1)
            max_pixels = max(min(max_pixels, int(share)), int(self.min_pixels * 1.05))
        return smart_resize(height, width, self.factor, self.min_pixels, max_pixels)

    def grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """``video_grid_thw`` of a video of ``num_frames`` frames at native ``height x width``."""
        h, w = self.frame_size(num_frames, height, width)
        groups = -(-num_frames // self.temporal_patch_size)
        return groups, h // self.patch_size, w // self.patch_size

    def tokens_per_group(self, grid_thw: Sequence[int]) -> int:
        """LLM tokens of one temporal group: ``h * w / merge_size**2``."""
        return int(grid_thw[1]) * int(grid_thw[2]) // (self.merge_size ** 2)

    def video_token_count(self, grid_thw: Sequence[int]) -> int:
        """``<|video_pad|>`` tokens of a video (all groups)."""
        return int(grid_thw[0]) * self.tokens_per_group(grid_thw)

    def placeholder_text(self, grid_thw: Sequence[int], group_times: Sequence[float] = ()) -> str:
        """The text that replaces the template's ``<|vision_start|><|video_pad|><|vision_end|>``."""
        per_group = self.tokens_per_group(grid_thw)
        if not self.timestamps:
            return VISION_START + VIDEO_PAD * (int(grid_thw[0]) * per_group) + VISION_END
        if len(group_times) != int(grid_thw[0]):
            raise ValueError(f"Qwen3-VL needs one timestamp per temporal group: {grid_thw[0]} groups, "
                             f"{len(group_times)} timestamps")
        return "".join(f"<{t:.1f} seconds>" + VISION_START + VIDEO_PAD * per_group + VISION_END
                       for t in group_times)

    def image_size(self, height: int, width: int, max_pixels: int | None = None) -> tuple[int, int]:
        """``(H', W')`` an image of ``height x width`` is resized to: ``smart_resize`` within ``image_min_pixels``
        and ``image_max_pixels``, the latter lowered to ``max_pixels`` (``dataset_config.max_image_pixels``)."""
        upper = self.image_max_pixels if max_pixels is None else min(self.image_max_pixels, max_pixels)
        return smart_resize(height, width, self.factor, min(self.image_min_pixels, upper), upper)

    def image_grid(self, height: int, width: int) -> tuple[int, int, int]:
        """``image_grid_thw`` of an image resized to ``height x width`` (multiples of :attr:`factor`)."""
        return 1, height // self.patch_size, width // self.patch_size

    def image_token_count(self, grid_thw: Sequence[int]) -> int:
        """``<|image_pad|>`` tokens of an image: ``h * w / merge_size**2``."""
        return self.tokens_per_group(grid_thw)

    def image_placeholder_text(self, grid_thw: Sequence[int]) -> str:
        """The text that replaces the template's ``<|vision_start|><|image_pad|><|vision_end|>`` (all families:
        Qwen3-VL writes no timestamp for images)."""
        return VISION_START + IMAGE_PAD * self.image_token_count(grid_thw) + VISION_END

    def preprocess_image(self, image: torch.Tensor, size: tuple[int, int] | None = None) -> QwenImageInputs:
        """uint8 ``[3, H, W]`` -> :class:`QwenImageInputs`: resized to ``size`` (default :meth:`image_size`) with
        PIL's bicubic filter, normalised, patchified as one temporal group (the image repeated
        ``temporal_patch_size`` times), as transformers' ``Qwen2VLImageProcessorPil``."""
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a uint8 image [3, H, W], got {image.dtype} {tuple(image.shape)}")
        size = size or self.image_size(image.shape[1], image.shape[2])
        pixels = self.normalize(resize_frames(image[None], size))
        patches, grid = patchify(pixels, self.patch_size, self.temporal_patch_size, self.merge_size)
        return QwenImageInputs(pixel_values=patches, grid_thw=grid, size=size)

    def normalize(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 ``[T, 3, H, W]`` -> float32 ``(x / 255 - mean) / std``."""
        mean = torch.tensor(self.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        return frames.float().div_(255.0).sub_(mean).div_(std)

    def preprocess(self, frames: torch.Tensor, timestamps: Sequence[float] | None = None,
                   sampled_fps: float | None = None) -> QwenVideoInputs:
        """Frames as decoded (uint8 ``[T, 3, H, W]``, native size) -> :class:`QwenVideoInputs`.

        ``timestamps``: seconds of each frame (Qwen3-VL's group times; default ``i / 2``, Qwen's 2 fps).
        ``sampled_fps``: frames per second of the sampled frames (Qwen2.5-VL's ``second_per_grid_ts``
        = ``temporal_patch_size / sampled_fps``; default from ``timestamps``, else 2).
        """
        if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[1] != 3:
            raise ValueError(f"expected uint8 frames [T, 3, H, W], got {frames.dtype} {tuple(frames.shape)}")
        num_frames = frames.shape[0]
        if num_frames < 1:
            raise ValueError("a video needs at least one frame")
        size = self.frame_size(num_frames, frames.shape[2], frames.shape[3])
        pixels = self.normalize(resize_frames(frames, size))
        patches, grid = patchify(pixels, self.patch_size, self.temporal_patch_size, self.merge_size)
        stamps = list(timestamps) if timestamps is not None else [i / DEFAULT_FPS for i in range(num_frames)]
        if len(stamps) != num_frames:
            raise ValueError(f"{len(stamps)} timestamps for {num_frames} frames")
        if sampled_fps is None:
            span = stamps[-1] - stamps[0]
            sampled_fps = (num_frames - 1) / span if num_frames > 1 and span > 0 else DEFAULT_FPS
        return QwenVideoInputs(pixel_values=patches, grid_thw=grid,
                               group_times=group_timestamps(stamps, self.temporal_patch_size),
                               second_per_grid=self.temporal_patch_size / sampled_fps, frame_size=size)


__all__ = [
    "CLIP_MEAN", "CLIP_STD", "DEFAULT_FPS", "HALF", "IMAGE_PAD", "QWEN_FAMILIES", "TEMPLATE_IMAGE_TEXT",
    "TEMPLATE_VIDEO_TEXT", "VIDEO_PAD", "VIDEO_TYPE", "VISION_END", "VISION_START", "QwenImageInputs",
    "QwenVideoInputs", "QwenVideoProcessing", "checkpoint_image_pixels", "group_timestamps",
    "mm_token_type_ids", "pad_to_groups", "patchify", "resize_frames", "smart_resize",
]
