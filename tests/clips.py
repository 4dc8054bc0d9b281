"""Test clips whose pixels say which frame they are.

Each frame is a 4 x 4 grid of flat cells, black (bit 0) or white (bit 1): cells 0-9 hold the frame's
index in binary (up to 1023 frames), cells 10-15 a fixed marker. Big flat cells survive H.264 at any
sensible quality and any resize down to about 8 x 8 pixels, so ``read_indices`` recovers the exact
index of every decoded frame. A thin moving bar keeps the encoder busy with motion (B-frames, P-frames).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import av
import numpy as np
import torch

from lmms_engine.video.encode import write_video

INDEX_BITS = 10
MARKER = (1, 0, 1, 1, 0, 0)  # cells 10..15


def frame_code(index: int) -> list[int]:
    """The 16 cell bits of frame ``index`` (row-major)."""
    if not 0 <= index < 2 ** INDEX_BITS:
        raise ValueError(f"frame index {index} does not fit in {INDEX_BITS} bits")
    return [(index >> b) & 1 for b in range(INDEX_BITS)] + list(MARKER)


def coded_frames(num_frames: int, height: int = 48, width: int = 64) -> Iterator[np.ndarray]:
    """``num_frames`` RGB frames ``[height, width, 3]`` uint8 carrying their index."""
    rows = np.linspace(0, height, 5).astype(int)
    cols = np.linspace(0, width, 5).astype(int)
    for i in range(num_frames):
        frame = np.zeros((height, width, 3), np.uint8)
        for cell, bit in enumerate(frame_code(i)):
            r, c = divmod(cell, 4)
            frame[rows[r]:rows[r + 1], cols[c]:cols[c + 1]] = 235 if bit else 20
        # A grey 2-pixel bar on the grid's edge line moves across the frame: motion for the encoder,
        # away from the cell centres that read_indices looks at.
        x = (3 * i) % width
        frame[rows[1] - 1:rows[1] + 1, x:x + 6] = 128
        yield frame


def read_indices(frames: torch.Tensor) -> list[int]:
    """Frame index of each decoded frame ``[T, 3, H, W]`` uint8 (any size); error if unreadable."""
    t, _, h, w = frames.shape
    out = []
    for k in range(t):
        bits = []
        for cell in range(16):
            r, c = divmod(cell, 4)
            # The middle half of each cell, away from edges blurred by chroma subsampling or resizing.
            y0, y1 = (4 * r + 1) * h // 16, (4 * r + 3) * h // 16
            x0, x1 = (4 * c + 1) * w // 16, (4 * c + 3) * w // 16
            patch = frames[k, :, y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)].float().mean()
            bits.append(int(patch > 127))
        if tuple(bits[INDEX_BITS:]) != MARKER:
            raise AssertionError(f"frame {k} does not carry a frame code (cells {bits})")
        out.append(sum(bit << b for b, bit in enumerate(bits[:INDEX_BITS])))
    return out


def make_clip(path: str | Path, num_frames: int, fps: float = 25.0, keyframe_interval: int = 250,
              size: tuple[int, int] = (48, 64), crf: int = 23) -> Path:
    """Encode a coded clip (H.264; container from the suffix: .mp4, .mkv, .h264 ...) at ``path``."""
    height, width = size
    return write_video(path, coded_frames(num_frames, height, width), fps=fps,
                       keyframe_interval=keyframe_interval, crf=crf)


def make_open_gop_clip(path: str | Path, num_frames: int, keyframe_interval: int = 12, fps: int = 25) -> Path:
    """A coded 64x48 clip with open GOPs: B-frames after each (non-IDR) keyframe show before it and
    reference the previous interval. ``write_video`` has no x264 parameters, hence this encoder."""
    path = Path(path)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"crf": "23", "g": str(keyframe_interval), "keyint_min": str(keyframe_interval),
                          "sc_threshold": "0", "x264-params": "open-gop=1:bframes=3"}
        for frame in coded_frames(num_frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def remux_with_offset(src: str | Path, dst: str | Path, offset_seconds: float) -> Path:
    """Copy the video stream of ``src`` into ``dst`` with every timestamp shifted by ``offset_seconds``."""
    dst = Path(dst)
    with av.open(str(src)) as inp, av.open(str(dst), mode="w") as out:
        s_in = inp.streams.video[0]
        s_out = out.add_stream_from_template(s_in)
        shift = int(round(offset_seconds / s_in.time_base))
        for packet in inp.demux(s_in):
            if packet.size == 0:
                continue
            packet.pts = None if packet.pts is None else packet.pts + shift
            packet.dts = None if packet.dts is None else packet.dts + shift
            packet.stream = s_out
            out.mux(packet)
    return dst


def packet_timeline(path: str | Path) -> tuple[list[int], list[int]]:
    """``(pts in decode order, the same sorted)``: they differ when a clip really has B-frames."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        pts = [p.pts for p in container.demux(stream) if p.size and p.pts is not None]
    return pts, sorted(pts)


def write_audio_only(path: str | Path, seconds: float = 0.5, rate: int = 8000) -> Path:
    """A valid audio-only file (PCM in WAV, or whatever the suffix implies) with no video stream."""
    path = Path(path)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("pcm_s16le", rate=rate)
        samples = (np.sin(np.arange(int(seconds * rate)) * 0.05) * 3000).astype(np.int16)[None, :]
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path
