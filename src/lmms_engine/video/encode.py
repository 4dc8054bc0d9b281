"""Writing clips with PyAV (libx264, libx265 and libvpx-vp9 ship in its wheels): demo data, tests, benchmarks."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Iterable, Mapping

import av
import numpy as np


def write_video(
    path: str | Path,
    frames: Iterable[np.ndarray],
    fps: float = 25.0,
    keyframe_interval: int = 250,
    crf: int = 23,
    codec: str = "libx264",
    options: Mapping[str, str] | None = None,
) -> Path:
    """Encode RGB frames (each ``[H, W, 3]`` uint8, H and W even) into an mp4 at ``path``.

    ``keyframe_interval`` is the GOP size (x264's default is 250); 1 makes every frame a keyframe.
    ``options``: more encoder options (e.g. ``{"x264-params": "bframes=0"}``), applied last.
    Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = None
        for frame in frames:
            if stream is None:
                height, width = frame.shape[:2]
                stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
                stream.width, stream.height = width, height
                stream.pix_fmt = "yuv420p"
                stream.gop_size = keyframe_interval
                stream.options = {"crf": str(crf), "g": str(keyframe_interval),
                                  "keyint_min": str(min(keyframe_interval, 25)), "sc_threshold": "0",
                                  **(options or {})}
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            for packet in stream.encode(video_frame):
                container.mux(packet)
        if stream is None:
            raise ValueError(f"write_video({path}): no frames given")
        for packet in stream.encode():
            container.mux(packet)
    return path
