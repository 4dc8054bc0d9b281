"""Frame preprocessing without torchvision, and what the data side needs to know about the model.

``frames_to_pixel_values``: uint8 ``[T, 3, H, W]`` -> float ``[T, 3, S, S]`` rescaled to [0, 1] and
normalised with the vision config's mean/std (SigLIP: 0.5/0.5, i.e. [-1, 1]). Frames normally arrive at
``S x S`` already (the frame loader resizes inside the decoder); other sizes are resized here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from lmms_engine.models.layout import VideoLayoutConfig
from lmms_engine.utils.config import from_mapping

SIGLIP_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
SIGLIP_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)


def _triple(value: float | Sequence[float], name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (float(value),) * 3
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"{name} must be a number or 3 numbers (R, G, B), got {value!r}")
    return values  # type: ignore[return-value]


@dataclass(frozen=True)
class ProcessorInfo:
    """What turning a video into model inputs needs from the model config.

    ``image_size``/``patch_size``: the vision tower's (frames are resized to ``image_size`` square; the
    patch grid side is ``image_size // patch_size``). ``image_mean``/``image_std``: per-channel
    normalisation. ``layout``: the video-token layout (token count per video). ``video_token``: the
    placeholder string, a single token of the tokenizer (``config.video_token_id``). Images:
    ``image_token`` (``config.image_token_id``), ``image_grid_pinpoints`` (anyres tiling; empty = one
    ``image_size`` tile), ``vision_aspect_ratio`` (``anyres_max_N``) and ``select_strategy``
    (``vision_feature_select_strategy``), as in the model config.
    """

    image_size: int
    patch_size: int
    image_mean: tuple[float, float, float] = SIGLIP_MEAN
    image_std: tuple[float, float, float] = SIGLIP_STD
    layout: VideoLayoutConfig = field(default_factory=VideoLayoutConfig)
    video_token: str = "<video>"
    image_token: str = "<image>"
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()
    vision_aspect_ratio: str = "anyres_max_9"
    select_strategy: str = "full"

    def __post_init__(self) -> None:
        if self.image_size < 1 or self.patch_size < 1 or self.patch_size > self.image_size:
            raise ValueError(f"need 1 <= patch_size <= image_size, got image_size={self.image_size}, "
                             f"patch_size={self.patch_size}")
        object.__setattr__(self, "image_mean", _triple(self.image_mean, "image_mean"))
        object.__setattr__(self, "image_std", _triple(self.image_std, "image_std"))
        pinpoints = tuple(tuple(int(v) for v in p) for p in self.image_grid_pinpoints)
        object.__setattr__(self, "image_grid_pinpoints", pinpoints or ((self.image_size, self.image_size),))
        if any(s <= 0 for s in self.image_std):
            raise ValueError(f"image_std must be > 0, got {self.image_std}")

    @property
    def patch_side(self) -> int:
        """Patches per side of a frame (SigLIP 384/14 -> 27; the conv drops the remainder)."""
        from lmms_engine.models.vision import patch_grid_side

        return patch_grid_side(self)

    def video_token_count(self, num_frames: int) -> int:
        """Tokens a ``<video>`` of ``num_frames`` frames expands to."""
        return self.layout.video_token_count(num_frames, self.patch_side)

    def image_token_count(self, height: int, width: int, tiled: bool) -> int:
        """Tokens an ``<image>`` of ``height x width`` pixels expands to (``lmms_engine.data.images``);
        ``tiled``: anyres tiling (a record's only image) or one padded tile (one of several)."""
        from lmms_engine.data.images import image_token_count

        return image_token_count(height, width, tiled=tiled, image_size=self.image_size, patch_size=self.patch_size,
                                 grid_pinpoints=self.image_grid_pinpoints, vision_aspect_ratio=self.vision_aspect_ratio,
                                 select_strategy=self.select_strategy)

    @classmethod
    def from_model_config(cls, config: Any, layout: VideoLayoutConfig | None = None,
                          video_token: str = "<video>") -> "ProcessorInfo":
        """Read a LLaVA-OneVision-style config: ``config.vision_config.{image_size, patch_size}``;
        ``image_mean``/``image_std`` from the config or its vision config (default 0.5); the layout from
        ``layout``, else the config's ``video_layout`` dict (the engine's models store it there), else
        its attributes named like :class:`VideoLayoutConfig` fields, else the defaults."""
        vision = getattr(config, "vision_config", config)

        def pick(name: str, default: Any) -> Any:
            for source in (config, vision):
                value = getattr(source, name, None)
                if value is not None:
                    return value
            return default

        if layout is None:
            stored = getattr(config, "video_layout", None)  # where the engine's model config keeps it
            if isinstance(stored, Mapping):
                layout = from_mapping(VideoLayoutConfig, stored, "model config video_layout")
            else:
                names = [f.name for f in fields(VideoLayoutConfig)]
                layout = VideoLayoutConfig(**{n: getattr(config, n) for n in names
                                              if getattr(config, n, None) is not None})
        return cls(image_size=int(vision.image_size), patch_size=int(vision.patch_size),
                   image_mean=pick("image_mean", SIGLIP_MEAN), image_std=pick("image_std", SIGLIP_STD),
                   layout=layout, video_token=video_token,
                   image_grid_pinpoints=tuple(map(tuple, getattr(config, "image_grid_pinpoints", None) or ())),
                   vision_aspect_ratio=getattr(config, "vision_aspect_ratio", None) or "anyres_max_9",
                   select_strategy=getattr(config, "vision_feature_select_strategy", None) or "full")


def frames_to_pixel_values(
    frames: torch.Tensor,
    image_size: int,
    mean: Sequence[float] = SIGLIP_MEAN,
    std: Sequence[float] = SIGLIP_STD,
) -> torch.Tensor:
    """uint8 RGB frames ``[T, 3, H, W]`` -> float32 ``[T, 3, S, S]``, ``(x / 255 - mean) / std``.

    Frames not already ``S x S`` are resized (aspect ratio not kept) with the training resize filter,
    :data:`lmms_engine.video.decode.RESIZE_FILTER` (antialiased, as PIL resizes).
    """
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(f"expected uint8 frames [T, 3, H, W], got {frames.dtype} {tuple(frames.shape)}")
    pixels = frames.float()
    if tuple(pixels.shape[-2:]) != (image_size, image_size):
        from lmms_engine.video.decode import RESIZE_FILTER

        pixels = F.interpolate(pixels, size=(image_size, image_size), mode=RESIZE_FILTER, align_corners=False,
                               antialias=True).clamp_(0, 255)
    mean_t = torch.tensor(_triple(mean, "mean"), dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(_triple(std, "std"), dtype=torch.float32).view(1, 3, 1, 1)
    return pixels.div_(255.0).sub_(mean_t).div_(std_t)


__all__ = ["SIGLIP_MEAN", "SIGLIP_STD", "ProcessorInfo", "frames_to_pixel_values"]
