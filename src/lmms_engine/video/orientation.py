"""The display orientation of a video: the rotation its container asks players to apply.

Phones record in the sensor's orientation and store a display matrix (MP4/MOV: the track header's
``tkhd`` matrix); players turn the picture by it. FFmpeg hands the matrix over only with decoded
frames, which is too late to lay out the output arrays, so it is read here from the file's boxes
(a few small reads: ``moov`` -> ``trak`` -> ``tkhd`` and ``mdia/hdlr``; sample tables are skipped).
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path
from typing import BinaryIO, Iterator


def _boxes(handle: BinaryIO, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """``(type, payload start, box end)`` of the ISO-BMFF boxes between ``start`` and ``end``."""
    pos = start
    while pos + 8 <= end:
        handle.seek(pos)
        head = handle.read(8)
        if len(head) < 8:
            return
        size, kind = struct.unpack(">I4s", head)
        header = 8
        if size == 1:
            large = handle.read(8)
            if len(large) < 8:
                return
            size, header = struct.unpack(">Q", large)[0], 16
        elif size == 0:
            size = end - pos
        if size < header:
            return
        yield kind, pos + header, min(pos + size, end)
        pos += size


def _track_rotation(handle: BinaryIO, start: int, end: int) -> float | None:
    """The rotation of a video track (``trak`` payload), or None for another kind of track."""
    rotation, is_video = 0.0, False
    for kind, begin, stop in _boxes(handle, start, end):
        if kind == b"tkhd":
            handle.seek(begin)
            data = handle.read(min(stop - begin, 120))
            offset = 4 + (32 if data[:1] == b"\x01" else 20) + 16  # version/flags, times and ids, reserved
            if len(data) < offset + 20:
                return None
            a, b = struct.unpack(">ii", data[offset:offset + 8])
            # FFmpeg's av_display_rotation_get on the same matrix: degrees counterclockwise.
            rotation = -math.degrees(math.atan2(b / 65536, a / 65536)) if (a or b) else 0.0
        elif kind == b"mdia":
            for inner, begin2, _ in _boxes(handle, begin, stop):
                if inner == b"hdlr":
                    handle.seek(begin2 + 8)
                    is_video = handle.read(4) == b"vide"
    return rotation if is_video else None


def mp4_rotation(path: str | os.PathLike) -> float:
    """Degrees counterclockwise by which the first video track of an MP4/MOV file is to be turned for
    display (as PyAV's ``VideoFrame.rotation`` reports it); 0 when there is none or it cannot be read."""
    try:
        with Path(path).open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            for kind, begin, end in _boxes(handle, 0, size):
                if kind == b"moov":
                    for inner, begin2, end2 in _boxes(handle, begin, end):
                        if inner == b"trak":
                            rotation = _track_rotation(handle, begin2, end2)
                            if rotation is not None:
                                return rotation
                    return 0.0
    except (OSError, struct.error):
        pass
    return 0.0


def display_turns(path: str | os.PathLike, format_name: str) -> int:
    """Quarter turns counterclockwise (0-3) that show the video upright: the container's display
    rotation rounded to a multiple of 90 degrees (MP4/MOV; other containers: 0). Flips are not applied."""
    if not format_name.startswith("mov"):
        return 0
    return round(mp4_rotation(path) / 90) % 4


__all__ = ["display_turns", "mp4_rotation"]
