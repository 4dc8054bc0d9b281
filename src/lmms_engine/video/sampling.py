"""Which frames to sample from a video: pure index arithmetic on the frames' timestamps.

Every rule works on frame indices (0-based, presentation order) and the frames' timestamps (seconds
from the first frame). The rules, in order:

1. Range: ``start_time``/``end_time`` keep the frames with ``start_time <= timestamp < end_time``
   (``end_time`` beyond the video is clipped to its end; a range holding no frame is an error).
2. Candidates: every frame of the range (``sample_rate=1``), every ``sample_rate``-th frame of it
   (``sample_rate=n``: range frames 0, n, 2n, ...), or with ``fps`` the frame on screen at each of the
   times ``t0, t0 + 1/fps, t0 + 2/fps, ...`` (``t0`` = the range's first frame; "on screen" = the last
   frame whose timestamp is ``<= t``; a frame is never taken twice, so ``fps`` above the video's rate
   gives every frame). Fractional ``fps`` (e.g. 0.5) works. LLaVA-NeXT instead takes every
   ``round(video_fps / fps)``-th frame; both agree when that ratio is an integer (30 fps video, 1 fps).
3. Cap (``linspace``): if there are more than ``max_frames`` candidates, keep ``max_frames`` of them at
   positions ``floor(i * (n - 1) / (k - 1))``, ``i = 0..k-1`` (numpy's ``linspace(0, n - 1, k)`` cast to
   int, as LLaVA-NeXT does, in exact integer arithmetic; first and last candidates included; ``k = 1``
   keeps the first). With ``fps``, like LLaVA-NeXT, the cap spreads ``max_frames`` over all frames of
   the range, not over the fps candidates.
4. ``force_sample=True``: always exactly ``max_frames`` by that linspace (over the range's frames with
   ``fps``, over the candidates otherwise), even when there are fewer candidates. A range with fewer
   frames than ``max_frames`` then yields repeated indices, as LLaVA-NeXT's linspace does; without
   ``force_sample`` such a video yields each of its candidate frames once (fewer than ``max_frames``).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Sequence

# Timestamps come from integer pts times a rational time base; a microsecond absorbs float rounding.
_EPS = 1e-6


@dataclass(frozen=True)
class SamplingSpec:
    """The sampling arguments of ``MultiScaleVideoFrameLoader.load_video`` (see the module docstring)."""

    max_frames: int = 8
    sample_rate: int = 1
    fps: float | None = None
    force_sample: bool = False
    start_time: float | None = None
    end_time: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_frames, bool) or not isinstance(self.max_frames, int) or self.max_frames < 1:
            raise ValueError(f"max_frames must be an integer >= 1, got {self.max_frames!r}")
        if isinstance(self.sample_rate, bool) or not isinstance(self.sample_rate, int) or self.sample_rate < 1:
            raise ValueError(f"sample_rate must be an integer >= 1, got {self.sample_rate!r}")
        if self.fps is not None:
            if isinstance(self.fps, bool) or not isinstance(self.fps, (int, float)) or not self.fps > 0 \
                    or not math.isfinite(self.fps):
                raise ValueError(f"fps must be a finite number > 0 or None, got {self.fps!r}")
            if self.sample_rate != 1:
                raise ValueError(f"give either fps={self.fps!r} or sample_rate={self.sample_rate!r}, not both "
                                 "(fps picks frames by time, sample_rate by count)")
        for name in ("start_time", "end_time"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value < 0):
                raise ValueError(f"{name} must be a finite number of seconds >= 0 or None, got {value!r}")
        if self.start_time is not None and self.end_time is not None and self.end_time <= self.start_time:
            raise ValueError(f"end_time ({self.end_time}) must be greater than start_time ({self.start_time})")


def linspace_indices(n: int, k: int) -> list[int]:
    """``floor(linspace(0, n - 1, k))`` in exact integer arithmetic (repeats positions when ``k > n``)."""
    if n < 1 or k < 1:
        raise ValueError(f"need n >= 1 and k >= 1, got n={n}, k={k}")
    if k == 1:
        return [0]
    return [i * (n - 1) // (k - 1) for i in range(k)]


def frame_range(timestamps: Sequence[float], start_time: float | None, end_time: float | None) -> range:
    """Indices of the frames with ``start_time <= timestamp < end_time`` (``timestamps`` ascending)."""
    lo = 0 if start_time is None else bisect.bisect_left(timestamps, start_time - _EPS)
    hi = len(timestamps) if end_time is None else bisect.bisect_left(timestamps, end_time - _EPS)
    if lo >= hi:
        last = timestamps[-1] if timestamps else 0.0
        raise ValueError(f"no frame in the time range start_time={start_time}, end_time={end_time} "
                         f"(the video's frames run from 0 to {last:.3f} s)")
    return range(lo, hi)


def fps_candidates(timestamps: Sequence[float], frames: range, fps: float) -> list[int]:
    """The frame on screen at ``t0 + j / fps`` for each ``j`` while inside ``frames``, without repeats."""
    t0 = timestamps[frames.start]
    end = timestamps[frames.stop - 1]
    chosen: list[int] = []
    j = 0
    while True:
        t = t0 + j / fps
        if t > end + _EPS:
            break
        index = bisect.bisect_right(timestamps, t + _EPS, frames.start, frames.stop) - 1
        if not chosen or index != chosen[-1]:
            chosen.append(index)
        if index + 1 >= frames.stop:
            break
        # Skip the sample times that still fall on this frame (fps far above the video's rate would
        # otherwise loop once per sample); one step short of the estimate absorbs float rounding.
        j = max(j + 1, math.ceil((timestamps[index + 1] - _EPS - t0) * fps) - 1)
    return chosen


def sample_indices(timestamps: Sequence[float], spec: SamplingSpec) -> list[int]:
    """Frame indices to return, in order (repeats only with ``force_sample`` on a short range).

    Args:
        timestamps: ascending seconds of every frame of the video, ``timestamps[0] == 0``.
        spec: the sampling arguments; see the module docstring for the rules.
    """
    frames = frame_range(timestamps, spec.start_time, spec.end_time)
    if spec.fps is not None:
        candidates = fps_candidates(timestamps, frames, spec.fps)
        if spec.force_sample or len(candidates) > spec.max_frames:
            return [frames[i] for i in linspace_indices(len(frames), spec.max_frames)]
        return candidates
    candidates = list(frames[::spec.sample_rate])
    if spec.force_sample or len(candidates) > spec.max_frames:
        return [candidates[i] for i in linspace_indices(len(candidates), spec.max_frames)]
    return candidates
