"""Videos come back as players show them: a stream with a rotation display matrix (how phones record
portrait video) is turned upright, sizes follow the displayed picture; a still image renamed ``.mp4``
is not a video."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from lmms_engine.models.video_frame_utils import MultiScaleVideoFrameLoader
from lmms_engine.video.decode import VideoReadError
from lmms_engine.video.orientation import mp4_rotation

CODED_H, CODED_W = 32, 64


def picture() -> np.ndarray:
    """A coded frame with a different colour in each corner, so every turn and flip is told apart."""
    frame = np.full((CODED_H, CODED_W, 3), 40, dtype=np.uint8)
    frame[:12, :20] = (250, 250, 250)  # top-left: white
    frame[:12, -20:] = (230, 30, 30)  # top-right: red
    frame[-12:, :20] = (30, 200, 40)  # bottom-left: green
    return frame


def rotated_clip(path: Path, degrees: int | None, frames: int = 4) -> Path:
    """H.264 with the display matrix set through PyAV (the rotation a phone writes)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=4)
        stream.width, stream.height, stream.pix_fmt = CODED_W, CODED_H, "yuv420p"
        stream.options = {"crf": "10"}
        if degrees is not None:
            stream.set_display_rotation(degrees)
        for _ in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(picture(), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.mark.parametrize("degrees, turns", [(None, 0), (90, 1), (-90, 3), (180, 2)])
def test_rotated_videos_come_back_upright(tmp_path, degrees, turns):
    clip = rotated_clip(tmp_path / "clip.mp4", degrees)
    with av.open(str(clip)) as container:  # the matrix really is in the file, read as FFmpeg reads it
        rotation = next(container.decode(video=0)).rotation
    assert rotation % 360 == (degrees or 0) % 360 and mp4_rotation(clip) % 360 == rotation % 360
    frames = MultiScaleVideoFrameLoader().load_video_frames(str(clip), max_frames=2)
    expected = np.rot90(picture(), turns)  # counterclockwise, as the display matrix says
    assert tuple(frames.shape) == (2, 3, *expected.shape[:2])
    got = frames[0].permute(1, 2, 0).numpy().astype(int)
    assert np.abs(got - expected.astype(int)).mean() < 6  # H.264 at crf 10: a few levels of noise
    # target_size is the displayed picture's (H, W); multi-scale sizes too
    sized = MultiScaleVideoFrameLoader().load_video_frames(str(clip), max_frames=2, target_size=(48, 24),
                                                           enable_multiscale=True, scale_factors=[1.0, 0.5])
    assert [tuple(t.shape[2:]) for t in sized] == [(48, 24), (24, 12)]
    small = sized[1][0].permute(1, 2, 0).numpy().astype(int)
    reference = np.asarray(av.VideoFrame.from_ndarray(np.ascontiguousarray(expected), format="rgb24")
                           .reformat(width=12, height=24).to_ndarray(), dtype=int)
    assert np.abs(small - reference).mean() < 12


@pytest.mark.parametrize("codec, suffix", [("png", "png"), ("mjpeg", "jpeg")])
def test_a_still_image_renamed_mp4_is_not_a_video(tmp_path, codec, suffix):
    path = tmp_path / "photo.mp4"
    with av.open(str(path), "w", format="image2pipe") as container:
        stream = container.add_stream(codec)
        stream.width, stream.height = 16, 16
        stream.pix_fmt = "rgb24" if codec == "png" else "yuvj420p"
        for packet in stream.encode(av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(VideoReadError, match=rf"photo\.mp4.*a still image \({suffix}\), not a video"):
        MultiScaleVideoFrameLoader().load_video_frames(str(path), max_frames=4)
