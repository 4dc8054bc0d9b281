"""Video frame utilities: frame loading (single and multi-scale), spatial pooling, frame causal masks.

The user-facing names of ``lmms_engine.video`` gathered in one place:

- ``MultiScaleVideoFrameLoader``: sample and decode frames (``lmms_engine.video.decode``, sampling
  rules in ``lmms_engine.video.sampling``) and pool patch features (``lmms_engine.video.pooling``).
- ``FrameLevelMaskGenerator``: DINO-WM's frame-level causal mask (``lmms_engine.video.masks``), its
  additive form and a picture of it.
- ``VideoReadError`` and ``spatial_pool``, re-exported.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import torch

from lmms_engine.video.decode import DecodedVideo, VideoReadError, read_video
from lmms_engine.video.masks import frame_causal_mask, plot_mask, to_additive_mask
from lmms_engine.video.pooling import spatial_pool
from lmms_engine.video.sampling import SamplingSpec

__all__ = [
    "DecodedVideo",
    "FrameLevelMaskGenerator",
    "MultiScaleVideoFrameLoader",
    "VideoReadError",
    "spatial_pool",
]

DEFAULT_SCALE_FACTORS: tuple[float, ...] = (1.0, 0.75, 0.5)


def _check_size(target_size: object) -> tuple[int, int] | None:
    if target_size is None:
        return None
    if (not isinstance(target_size, (tuple, list)) or len(target_size) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in target_size)):
        raise ValueError(f"target_size must be (height, width) with two integers >= 1, got {target_size!r}")
    return int(target_size[0]), int(target_size[1])


def _check_scales(enable_multiscale: bool, scale_factors: Sequence[float] | None) -> list[float] | None:
    if not enable_multiscale:
        if scale_factors is not None:
            raise ValueError(f"scale_factors={list(scale_factors)!r} given with enable_multiscale=False; "
                             "set enable_multiscale=True to get one tensor per scale")
        return None
    factors = list(DEFAULT_SCALE_FACTORS if scale_factors is None else scale_factors)
    if not factors or any(isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s < float("inf")
                          for s in factors):
        raise ValueError(f"scale_factors must be a non-empty list of numbers > 0, got {scale_factors!r}")
    return [float(s) for s in factors]


class MultiScaleVideoFrameLoader:
    """Loads sampled video frames as uint8 RGB tensors, at one or several scales, and pools features.

    Args:
        num_threads: cores per video read: independent keyframe intervals decode in parallel
            decoder contexts, then FFmpeg frame threads inside them (``lmms_engine.video.decode``); 0 = auto:
            the cores, shared out among the DataLoader's workers inside one (one thread each when
            workers >= cores, the measured best there); 1 = one single-threaded decoder.
    """

    def __init__(self, num_threads: int = 0) -> None:
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 0:
            raise ValueError(f"num_threads must be an integer >= 0 (0 = auto), got {num_threads!r}")
        self.num_threads = num_threads

    def load_video(
        self,
        video_path: str | Path,
        *,
        max_frames: int = 8,
        sample_rate: int = 1,
        fps: float | None = None,
        force_sample: bool = False,
        start_time: float | None = None,
        end_time: float | None = None,
        target_size: tuple[int, int] | None = None,
        enable_multiscale: bool = False,
        scale_factors: Sequence[float] | None = None,
        timeout: float | None = None,
    ) -> DecodedVideo:
        """Sample frames of ``video_path``, decode them, and say which frames they are.

        Sampling (full rules in ``lmms_engine.video.sampling``):

        - uniform (default): ``max_frames`` frames by linspace over the frames, first and last included:
          index ``floor(i * (N - 1) / (max_frames - 1))`` (LLaVA-NeXT's ``np.linspace(..., dtype=int)``).
          A video with ``N <= max_frames`` frames returns each of its frames once (fewer than asked).
        - ``sample_rate=n``: every n-th frame (0, n, 2n, ...) first, then the same linspace over those
          when there are more than ``max_frames``.
        - ``fps=f`` (LLaVA-NeXT style, fractional f allowed): the frame on screen every ``1/f`` s; if that
          gives more than ``max_frames`` frames (the upper bound), or ``force_sample=True``, exactly
          ``max_frames`` frames by linspace over all frames instead. Not combinable with sample_rate.
        - ``force_sample=True``: exactly ``max_frames`` frames; when the video (or range) has fewer
          frames, linspace repeats frames, as LLaVA-NeXT does; ``frame_indices`` shows the repeats.
        - ``start_time``/``end_time`` (seconds from the first frame): only frames with
          ``start_time <= t < end_time`` are sampled; an ``end_time`` past the end is clipped.

        Args:
            video_path: a video file (any container/codec FFmpeg reads).
            target_size: ``(H, W)``; frames are resized inside FFmpeg (bilinear, aspect ratio not kept).
                None = the video's size.
            enable_multiscale: return one tensor per scale factor, all from one decode pass.
            scale_factors: with ``enable_multiscale`` (default ``[1.0, 0.75, 0.5]``): each output is
                ``round(s * H) x round(s * W)`` (halves up, at least 1 pixel) of ``target_size`` or,
                without it, of the video's size; each is scaled directly from the decoded frame.
            timeout: seconds the read may take (None = no limit). A read that blocks (a pipe nobody
                writes, a stalled mount) or runs too long is abandoned and ``DecodeTimeout`` (a
                ``VideoReadError``) raised; the abandoned decode stops at its next packet.

        Returns:
            ``DecodedVideo`` with ``frames`` uint8 RGB ``[T, 3, H, W]`` (or a list, one per scale), the
            ``frame_indices`` and ``timestamps`` of those frames, ``video_fps``, ``duration`` (s),
            ``total_frames``. A file cut short yields the frames it still holds; a requested frame that
            fails to decode is left out (``frame_indices`` says which came back), never replaced by a
            repeat of another.

        Raises:
            VideoReadError: the file is missing, empty, not a video, has no video stream or no
                decodable frame (the message names the path and the cause); ``DecodeTimeout`` past
                ``timeout``.
            ValueError: invalid arguments, or a time range holding no frame.
        """
        spec = SamplingSpec(max_frames=max_frames, sample_rate=sample_rate, fps=fps, force_sample=force_sample,
                            start_time=start_time, end_time=end_time)
        return read_video(video_path, spec, target_size=_check_size(target_size),
                          scale_factors=_check_scales(enable_multiscale, scale_factors),
                          num_threads=self.num_threads, timeout=timeout)

    def load_video_frames(
        self,
        video_path: str | Path,
        max_frames: int = 8,
        sample_rate: int = 1,
        target_size: tuple[int, int] | None = None,
        enable_multiscale: bool = False,
        scale_factors: Sequence[float] | None = None,
        timeout: float | None = None,
        **sampling: object,
    ) -> torch.Tensor | list[torch.Tensor]:
        """The frames of ``load_video`` alone: uint8 RGB ``[T, 3, H, W]``, or a list, one per scale.

        ``timeout``: seconds the read may take, as in ``load_video`` (None = no limit, the default for a
        direct call; the training dataset reads with ``dataset_config.decode_timeout``, 120 s by
        default). Past it ``DecodeTimeout`` is raised, also for a read that blocks (a FIFO nobody writes).
        ``**sampling`` takes ``load_video``'s other keywords: ``fps``, ``force_sample``, ``start_time``,
        ``end_time``.
        """
        allowed = {"fps", "force_sample", "start_time", "end_time"}
        unknown = sorted(set(sampling) - allowed)
        if unknown:
            raise TypeError(f"load_video_frames() got unexpected keyword(s) {unknown}; "
                            f"valid sampling keywords: {sorted(allowed)}")
        return self.load_video(video_path, max_frames=max_frames, sample_rate=sample_rate,
                               target_size=target_size, enable_multiscale=enable_multiscale,
                               scale_factors=scale_factors, timeout=timeout,
                               **sampling).frames  # type: ignore[arg-type]

    @staticmethod
    def apply_spatial_pooling(video_features: torch.Tensor, stride: int = 2, mode: str = "average") -> torch.Tensor:
        """LLaVA-NeXT ``get_2dPool`` on ``[T, P, D]`` (or ``[..., P, D]``) patch features.

        ``average``/``max``: ``floor(sqrt(P) / stride)`` per side (729 -> 169 at stride 2);
        ``bilinear``: ``ceil(sqrt(P) / stride)`` per side (729 -> 196). See ``lmms_engine.video.pooling``.
        Returns ``[T, P', D]``.
        """
        return spatial_pool(video_features, stride=stride, mode=mode)


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_") or "mask"


class FrameLevelMaskGenerator:
    """DINO-WM's frame-level causal mask: block lower-triangular over frames, full inside a frame."""

    def create_causal_frame_mask(self, num_frames: int, num_patches_per_frame: int,
                                 device: torch.device | str | None = None) -> torch.Tensor:
        """Boolean ``[N, N]``, ``N = num_frames * num_patches_per_frame`` (frame-major tokens).

        ``mask[i, j]`` is True when token ``i`` may attend to token ``j``: ``j``'s frame is at or before
        ``i``'s (SDPA's boolean convention).
        """
        return frame_causal_mask(num_frames, num_patches_per_frame, device=device)

    @staticmethod
    def to_additive(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Additive float form of a boolean mask: 0 where it may attend, the dtype's minimum elsewhere."""
        return to_additive_mask(mask, dtype)

    def visualize_mask(self, mask: torch.Tensor, title: str = "Frame Causal Mask",
                       save_path: str | Path | None = None, tokens_per_frame: int | None = None) -> str:
        """Save a picture of a boolean ``[N, N]`` mask as PNG, print where, and return its path.

        Dark = may attend; red lines mark frame boundaries (``tokens_per_frame``, inferred from a
        frame-causal mask when not given); a legend says which is which. ``save_path`` defaults to
        ``./<title as snake_case>.png`` in the current directory (``./frame_causal_mask.png`` for the
        default title). See :func:`lmms_engine.video.masks.plot_mask`.
        """
        path = Path(save_path) if save_path is not None else Path.cwd() / f"{_slug(title)}.png"
        path = plot_mask(mask, path, title, tokens_per_frame)
        print(f"{title}: mask picture saved to {path.resolve()}")
        return str(path)
