"""Decoding sampled frames from a video file with PyAV, planned per keyframe interval.

How a read works (``read_video``):

1. Open the file and take its first video stream; FFmpeg's frame and slice threads are on. FFmpeg's
   open probe parses the stream without decoding a picture (``_PROBE_PARSE_ONLY``).
2. Index: one demux pass over the stream's packets (no decoding; cheap next to decoding) gives each
   frame's pts, its packet's decode-order position and which packets are keyframes. Frame ``i`` is the
   ``i``-th smallest pts (presentation order, the order the decoder outputs frames), so the index <->
   pts map is exact with B-frames and with streams whose first pts is not 0. Timestamps are seconds
   since the first frame. Packets FFmpeg marks as discarded (edit-list pre-roll) or corrupt are not
   frames.
3. Plan: each requested frame belongs to the last keyframe (in decode order) whose pts is <= its
   own (its keyframe interval, or GOP). Groups are read in order: one seek to the group's keyframe
   (none when it is the very next packet), packets fed up to the group's last requested frame, then
   the decoder is drained and flushed, so no packet past it is decoded just to push frames through
   the decoder's reordering and thread delay.
   The index is cached in the process, keyed by the file's resolved path, size, mtime and inode
   (``frame_table_cache``): a file read again (the next epoch, another sampling) skips the demux pass;
   a file rewritten in place gets a different key and is indexed afresh.
4. Decode: packets of frames nobody asked for are decoded with ``skip_frame="NONREF"`` for
   H.264/HEVC, so the decoder drops them when no other frame references them (reference frames are
   always decoded, so requested frames are bit-exact). Only the requested frames are converted to
   RGB at the native size, then resized in RGB by FFmpeg's scaler with :data:`RESIZE_FILTER`, once per
   output size (see :data:`RESIZE_FILTER` for why in RGB).
5. Parallelism: keyframe intervals are independent (each starts at a keyframe with a flushed decoder),
   so the groups are split into contiguous runs of about equal decode work, one per decoder context,
   each context its own container over the same file in its own thread (PyAV releases the GIL while
   FFmpeg demuxes, decodes and scales). Every context writes its frames into its own rows of the
   preallocated output, so the result is the same frame for frame whatever the split; memory grows by
   one decoder (its reference frames) per context, and contexts never outnumber the thread budget.
   The budget (``num_threads``; 0 = ``decode_thread_budget()``: the process's cores, shared out among
   DataLoader workers) is split into contexts with equal shares of cores, as many contexts as make
   the read shortest by a simple estimate (``split_groups``): one long keyframe interval beside short
   ones stays in one context with frame threads. A context with two cores or more runs
   ``frame_thread_count`` FFmpeg threads (four per core: skipped packets take a thread's turn too)
   and converts its frames in a thread beside the decoder. The first read of a file
   hands the index pass's packets to its decoders (no second demux; up to 64 MiB).

Streams without usable pts (e.g. raw ``.h264`` files) are decoded once from the start, frames counted
in output order; a decoding error there ends the read (later frames could not be told apart).

Frames come back upright, as players show them: an MP4/MOV track with a rotation display matrix
(phone videos) is turned by it (quarter turns; sizes, ``target_size`` included, are those of the
displayed picture; ``lmms_engine.video.orientation``).

Broken inputs raise ``VideoReadError`` (a ``ValueError``) naming the path and the cause: a missing
file, zero bytes, not a media file, no video stream, no decodable frame, a still image (a PNG or JPEG
renamed ``.mp4`` is not a one-frame video). A file cut short (truncated
download) is read as the video it still holds: its frames are those whose packets are complete, and
``total_frames``/``duration`` describe that part. A requested frame that is indexed but does not decode
is left out of the result, with a warning: ``frame_indices`` names exactly the frames returned, and a
frame is never repeated in place of one that failed.

Deadlines (``timeout=`` of ``read_video``/``probe_video``): the work runs in a daemon thread that the
caller waits for at most ``timeout`` seconds, so a read blocked anywhere (a FIFO nobody writes, a stalled
network mount, a slow C call) cannot hang the caller; past the deadline it raises ``DecodeTimeout`` and
sets the thread's cancel flag, which the reader checks between packets, so an abandoned slow decode
stops at its next packet. FFmpeg's own I/O interrupt (``av.open(timeout=...)``) is armed with the same
limit, which stops network protocols stalled inside a read. A thread blocked in a system call that
nothing interrupts (``open()`` of a FIFO) stays blocked until that call returns; being a daemon, it never
delays the interpreter's exit.

``probe_video`` reads a video's frame count, rate and duration from the container's metadata (no frame
is decoded), for estimating token lengths before loading.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import av
import numpy as np
import torch

from lmms_engine.video.orientation import display_turns
from lmms_engine.video.sampling import SamplingSpec, sample_indices

logger = logging.getLogger(__name__)

# Codecs whose decoders honour skip_frame=NONREF by dropping only frames no other frame references.
_NONREF_SKIP_CODECS = frozenset({"h264", "hevc"})
# FFmpeg renders text files (.txt, .nfo, ...) as ANSI-art "video"; a text file is not a video.
_TEXT_ART_CODECS = frozenset({"ansi", "bintext", "xbin", "idf"})
# After a seek the reader checks where the demuxer landed; this many earlier keyframes are tried when
# it lands past the wanted one before falling back to the stream's start.
_SEEK_RETRIES = 3
# Most decoder contexts one read runs at once (each holds a decoder's reference frames).
MAX_DECODE_CONTEXTS = 8
# A context is only worth its container open when it has this many packets to decode (the open costs
# about what one 720p packet's decode does, with the parse-only probe).
_MIN_PACKETS_PER_CONTEXT = 16


class VideoReadError(ValueError):
    """A video file cannot be read. ``.path`` is the file, ``.cause`` says why (also in the message)."""

    def __init__(self, path: str | Path, cause: str) -> None:
        self.path = str(path)
        self.cause = str(cause)
        super().__init__(f"cannot read video {self.path}: {self.cause}")

    def __reduce__(self):  # DataLoader workers pickle exceptions; rebuild from (path, cause)
        return type(self), (self.path, self.cause)


class DecodeTimeout(VideoReadError):
    """Reading a video did not finish within its deadline; the read was abandoned (module docstring)."""


class _Cancelled(Exception):
    """Raised inside an abandoned read when it notices its cancel flag; nobody waits for it any more."""


_T = TypeVar("_T")


def _check_cancel(cancel: threading.Event | _AnyEvent | None) -> None:
    if cancel is not None and cancel.is_set():
        raise _Cancelled


class _AnyEvent:
    """Set when any of its events is (the caller's deadline, or a sibling context that failed)."""

    def __init__(self, *events: threading.Event | _AnyEvent | None) -> None:
        self.events = [e for e in events if e is not None]

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def decode_thread_budget() -> int:
    """Threads one video read uses by default (``num_threads=0``): the cores this process may run
    on, divided among the DataLoader's workers when called inside one (at least 1).

    A DataLoader with ``num_workers >= cores`` thus decodes each video in one thread (the workers
    keep every core busy, and threads would only contend), while a read in the main process, or with
    fewer workers than cores, spreads over the cores it has.
    """
    from torch.utils.data import get_worker_info

    cores = _available_cores()
    worker = get_worker_info()
    return max(1, cores // worker.num_workers) if worker is not None else cores


def run_with_deadline(work: Callable[[threading.Event], _T], timeout: float, path: str | Path,
                      what: str = "reading") -> _T:
    """Run ``work(cancel)`` in a daemon thread and wait at most ``timeout`` seconds for it.

    Returns its result or re-raises its exception. Past the deadline ``cancel`` is set (``work`` should
    check it between steps) and :class:`DecodeTimeout` names ``path``. A daemon thread rather than an
    executor: executors join their threads at interpreter exit, which a thread blocked for good would hang.
    """
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0 or None, got {timeout!r}")
    cancel = threading.Event()
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = work(cancel)
        except _Cancelled:
            pass
        except BaseException as err:  # noqa: BLE001 - handed to the waiting caller
            outcome["error"] = err

    thread = threading.Thread(target=target, name=f"lmms-video-{what}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        cancel.set()
        raise DecodeTimeout(path, f"{what} did not finish within {timeout:g} s; abandoned (a blocked read, "
                                  "e.g. a pipe or a stalled mount, or a decode too slow for the limit)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


@dataclass
class DecodedVideo:
    """Frames sampled from a video and where they came from.

    Attributes:
        frames: uint8 RGB ``[T, 3, H, W]``, or a list with one such tensor per scale factor.
        frame_indices: ``T`` indices into the video's frames (0-based, presentation order, i.e. the
            order the decoder outputs them); repeats only where the sampling asked for repeats.
        timestamps: ``T`` seconds since the video's first frame, one per returned frame.
        video_fps: the stream's average frame rate.
        duration: seconds from the first frame to the end of the last one.
        total_frames: frames in the video (decodable ones, for a file cut short).
    """

    frames: torch.Tensor | list[torch.Tensor]
    frame_indices: list[int]
    timestamps: list[float]
    video_fps: float
    duration: float
    total_frames: int


@dataclass
class _Packet:
    """One video packet of the index pass (not empty, not corrupt)."""

    pts: int | None
    dts: int | None
    decode_pos: int
    is_keyframe: bool
    duration: int
    is_frame: bool  # False for edit-list pre-roll: decoded (others may reference it), never shown


@dataclass
class FrameTable:
    """The stream's frames from one demux pass (see the module docstring).

    ``pts`` is None when the stream has no usable pts (missing or duplicated); frames are then counted
    in output order and ``keyframe_of`` is empty.
    """

    pts: list[int] | None
    timestamps: list[float]
    fps: float
    duration: float
    decode_pos: dict[int, int]  # pts -> position of its packet in decode order (every packet with pts)
    keyframe_of: list[int]  # per frame: decode position of the keyframe its decoding starts from
    seek_ts: dict[int, tuple[int, int | None]]  # keyframe decode position -> (pts, dts)
    keyframes: list[int]  # keyframe decode positions, ascending

    @property
    def total_frames(self) -> int:
        return len(self.timestamps)


# Options of the decoder FFmpeg runs while opening a file to fill in stream parameters the container
# header lacks: it only parses, decoding no picture. Decoding the first keyframe there cost 15-20 ms per
# open at 720p H.264 (BBB), paid again by every decoder context; the demuxer and the parser still fill
# in the size and the rate, and a stream left without a size is opened again the full way.
_PROBE_PARSE_ONLY = {"skip_frame": "all"}


def open_video(path: str | Path, num_threads: int = 0, timeout: float | None = None,
               ) -> tuple[av.container.InputContainer, av.video.stream.VideoStream]:
    """Open ``path`` and return ``(container, first video stream)`` with decoder threads set up.

    ``num_threads``: FFmpeg decoder threads, 0 = FFmpeg's choice (one per core). ``timeout``: FFmpeg's I/O
    interrupt for opening and for each packet read, in seconds (None = none). Raises ``VideoReadError``.
    """
    p = Path(path)
    if not p.exists():
        raise VideoReadError(path, "no such file")
    if p.is_dir():
        raise VideoReadError(path, "is a directory, not a video file")
    if p.is_file() and p.stat().st_size == 0:  # pipes and devices report size 0: they are read, not sized
        raise VideoReadError(path, "the file is empty (0 bytes)")
    # A pipe or device is read once: probe it the full way.
    probes = (_PROBE_PARSE_ONLY, None) if p.is_file() else (None,)
    for options in probes:
        try:
            container = av.open(str(p), mode="r", timeout=timeout, options=options)
        except (av.error.FFmpegError, OSError, UnicodeDecodeError) as err:
            raise VideoReadError(path, f"not a readable media file, or cut short before its index "
                                        f"({type(err).__name__}: {err})") from err
        if options is None or _parameters_known(container):
            break
        container.close()
    # Cover art of an audio file is a one-picture "video" stream flagged attached_pic: not a video.
    videos = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not videos:
        kinds = sorted({s.type + (" (cover art)" if s.type == "video" else "") for s in container.streams})
        container.close()
        raise VideoReadError(path, f"no video stream (streams: {', '.join(kinds) or 'none'})")
    stream = videos[0]
    format_name = container.format.name
    if (format_name == "image2" or format_name.endswith("_pipe")) and not format_name.startswith("gif"):
        container.close()  # a PNG/JPEG named .mp4 would otherwise train as a one-frame video
        raise VideoReadError(path, f"a still image ({format_name.removesuffix('_pipe')}), not a video")
    if stream.codec_context.name in _TEXT_ART_CODECS:
        container.close()
        raise VideoReadError(path, f"not a video: FFmpeg reads it as text art (codec {stream.codec_context.name!r})")
    stream.thread_type = "AUTO"
    stream.codec_context.thread_count = num_threads
    return container, stream


def _parameters_known(container: av.container.InputContainer) -> bool:
    """Whether every video stream has its size (what the reader needs before decoding; the pixel
    format is the decoder's to set, at the first frame)."""
    return all(s.codec_context.width > 0 and s.codec_context.height > 0 for s in container.streams.video)


def _stream_rate(stream: av.video.stream.VideoStream) -> Fraction | None:
    """The stream's frame rate: average, else guessed, else base rate (None when none is known)."""
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate > 0:
            return Fraction(rate)
    return None


class FrameTableCache:
    """The frame tables of recently read files, keyed by (resolved path, size, mtime, inode).

    A file changed in any of those is a new key (and is indexed afresh); the least recently used
    tables beyond ``max_entries`` are dropped. Thread-safe. Pipes and devices are never cached.
    """

    def __init__(self, max_entries: int = 256) -> None:
        self.max_entries = max_entries
        self._tables: OrderedDict[tuple, FrameTable] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(path: str | Path) -> tuple | None:
        """The cache key of ``path`` now, or None for something that is not a regular file."""
        try:
            p = Path(path).resolve()
            st = p.stat()
        except OSError:
            return None
        if not p.is_file():
            return None
        return (str(p), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)

    def get(self, key: tuple | None) -> FrameTable | None:
        if key is None:
            return None
        with self._lock:
            table = self._tables.get(key)
            if table is None:
                self.misses += 1
            else:
                self.hits += 1
                self._tables.move_to_end(key)
            return table

    def put(self, key: tuple | None, table: FrameTable) -> None:
        if key is None or self.max_entries <= 0:
            return
        with self._lock:
            self._tables[key] = table
            self._tables.move_to_end(key)
            while len(self._tables) > self.max_entries:
                self._tables.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._tables.clear()
            self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._tables)


frame_table_cache = FrameTableCache()
"""The process's frame-table cache used by ``read_video`` (``frame_table_cache.clear()`` empties it)."""


# Most bytes of packets one read keeps from its index pass for its decoders (``build_frame_table``).
_MAX_KEPT_PACKET_BYTES = 64 << 20


def build_frame_table(path: str | Path, container: av.container.InputContainer,
                      stream: av.video.stream.VideoStream, cancel: threading.Event | None = None,
                      keep: list[av.Packet] | None = None) -> FrameTable:
    """Demux every packet of ``stream`` once (no decoding) and index its frames.

    ``keep``: a list that collects the non-empty packets in decode order (``keep[i]`` is the packet at
    decode position ``i``), for decoders to read instead of seeking and demuxing them again; it is
    emptied, and collecting stops, once they pass ``_MAX_KEPT_PACKET_BYTES`` (memory stays bounded).
    """
    read: list[_Packet] = []
    decode_pos: dict[int, int] = {}
    position = 0
    kept_bytes = 0
    try:
        for packet in container.demux(stream):
            _check_cancel(cancel)
            if packet.size == 0:
                continue
            if keep is not None:
                kept_bytes += packet.size
                if kept_bytes > _MAX_KEPT_PACKET_BYTES:
                    keep.clear()
                    keep = None
                else:
                    keep.append(packet)
            if packet.pts is not None:
                decode_pos.setdefault(packet.pts, position)
            if not packet.is_corrupt:
                read.append(_Packet(packet.pts, packet.dts, position, packet.is_keyframe, packet.duration or 0,
                                    not packet.is_discard))
            position += 1
    except (av.error.FFmpegError, OSError) as err:
        # A damaged tail: the packets read so far are the video this file still holds.
        logger.warning("%s: demuxing stopped after %d packets (%s); using the frames before it",
                       path, len(read), err)
    packets = [p for p in read if p.is_frame]
    if not packets:
        raise VideoReadError(path, "the video stream holds no frames (empty or truncated before the first frame)")
    keys = [p for p in read if p.is_keyframe]
    if not keys:
        raise VideoReadError(path, "the video stream holds no keyframe, so no frame can be decoded")

    rate = _stream_rate(stream)
    fps = None if rate is None else float(rate)
    pts_list = [p.pts for p in packets]
    if any(pts is None for pts in pts_list) or len(set(pts_list)) != len(pts_list):
        if fps is None:
            raise VideoReadError(path, "the video stream has neither timestamps nor a frame rate")
        n = len(packets)
        return FrameTable(None, [i / fps for i in range(n)], fps, n / fps, {}, [], {}, [])

    order = sorted(range(len(packets)), key=lambda i: packets[i].pts)
    frames = [packets[i] for i in order]
    tb = stream.time_base or Fraction(1, 1)
    first = frames[0].pts
    # int / int is correctly rounded, as float(Fraction) is, at a fraction of Fraction's cost per frame
    timestamps = [(f.pts - first) * tb.numerator / tb.denominator for f in frames]
    if fps is None:
        fps = (len(frames) - 1) / timestamps[-1] if len(frames) > 1 and timestamps[-1] > 0 else 1.0
    last_duration = float(frames[-1].duration * tb) if frames[-1].duration > 0 else 1.0 / fps
    duration = timestamps[-1] + last_duration

    # Keyframes in decode order (pre-roll ones included); a frame starts decoding at the last keyframe
    # with pts <= its own (B-frames of an open GOP that precede their keyframe in time go with the
    # keyframe before).
    if any(k.pts is None for k in keys):
        keys = [k for k in keys if k.pts is not None] or [packets[0]]
    seek_ts = {k.decode_pos: (k.pts, k.dts) for k in keys}
    keyframe_of = []
    # Walk frames in pts order, keeping the keyframes whose pts is <= the frame's pts (latest in decode
    # order wins). Keyframe pts grow with decode order in practice; bisect over them in that order.
    key_pts = [k.pts for k in keys]
    monotonic = all(a < b for a, b in zip(key_pts, key_pts[1:]))
    for f in frames:
        if monotonic:
            j = bisect.bisect_right(key_pts, f.pts) - 1
        else:
            j = max((i for i, kp in enumerate(key_pts) if kp <= f.pts), default=-1)
        keyframe_of.append(keys[max(j, 0)].decode_pos)
    return FrameTable([f.pts for f in frames], timestamps, fps, duration, decode_pos, keyframe_of,
                      seek_ts, [k.decode_pos for k in keys])


class ConstantRateTimestamps(Sequence[float]):
    """Timestamps (seconds) of ``num_frames`` frames at a constant ``rate``, as the reader computes them.

    Frame ``i`` is stored at pts ``round(i / (rate * time_base))`` (halves up, as FFmpeg rescales), so the
    values equal the reader's ``(pts - first pts) * time_base`` for a constant-rate stream; without a time
    base, ``i / rate`` (the reader's rule for streams without timestamps). Lazy: a lookup is O(1), so
    sampling a long video costs what sampling its frames does.
    """

    def __init__(self, num_frames: int, rate: Fraction, time_base: Fraction | None) -> None:
        self.num_frames, self.rate, self.time_base = num_frames, Fraction(rate), time_base
        self._fps = float(self.rate)
        # pts step per frame as a reduced fraction p / q; pts_i = floor(i * p / q + 1 / 2)
        step = None if time_base is None else 1 / (self.rate * time_base)
        self._p, self._q = (0, 1) if step is None else (step.numerator, step.denominator)

    def __len__(self) -> int:
        return self.num_frames

    def pts(self, i: int) -> int:
        """The pts of frame ``i`` in ``time_base`` units."""
        return (2 * i * self._p + self._q) // (2 * self._q)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.num_frames))]
        if i < 0:
            i += self.num_frames
        if not 0 <= i < self.num_frames:
            raise IndexError(f"frame {i} out of range for {self.num_frames} frames")
        if self.time_base is None:
            return i / self._fps
        # int / int is correctly rounded, as float(Fraction) in the reader is
        return self.pts(i) * self.time_base.numerator / self.time_base.denominator

    def frame_duration(self) -> float:
        """Seconds one frame lasts: the pts step rounded to the time base (what a muxer stores)."""
        if self.time_base is None:
            return 1.0 / self._fps
        return float(self.pts(1) * self.time_base)


@dataclass(frozen=True)
class VideoProbe:
    """A video's frames as its container describes them, read without decoding any frame.

    Attributes:
        num_frames: frames in the video stream.
        fps: the stream's frame rate (the reader's ``video_fps``).
        duration: seconds from the first frame to the end of the last one (the reader's ``duration``).
        timestamps: ``num_frames`` seconds since the first frame, one per frame (presentation order).
        source: where the frame count came from: ``frame_count`` (the container's frame count),
            ``duration`` (stream or container duration x rate, e.g. Matroska), or ``index`` (neither is
            stored, e.g. a raw ``.h264`` stream: one demux pass over the packets, still no decoding).
    """

    num_frames: int
    fps: float
    duration: float
    timestamps: Sequence[float]
    source: str


def probe_video(path: str | Path, *, timeout: float | None = None) -> VideoProbe:
    """Frame count, rate, duration and frame timestamps of ``path`` from its container (no decoding).

    For constant-rate streams the result equals what ``read_video`` reports (``total_frames``,
    ``video_fps``, ``duration``, per-frame timestamps); for variable-rate streams it is an estimate.
    ``timeout``: seconds the probe may take (None = no limit), as in ``read_video``.
    Raises ``VideoReadError`` (``DecodeTimeout`` past the deadline).
    """
    if timeout is None:
        return _probe_video(path, None, None)
    return run_with_deadline(lambda cancel: _probe_video(path, timeout, cancel), timeout, path, "probing")


def _probe_video(path: str | Path, timeout: float | None, cancel: threading.Event | None) -> VideoProbe:
    container, stream = open_video(path, num_threads=1, timeout=timeout)
    try:
        rate = _stream_rate(stream)
        time_base = stream.time_base
        count, source = 0, "index"
        if rate is not None and time_base:
            if stream.frames > 0:
                count, source = int(stream.frames), "frame_count"
            else:
                if stream.duration:
                    seconds = stream.duration * time_base
                elif container.duration:
                    seconds = Fraction(container.duration, av.time_base)
                else:
                    seconds = Fraction(0)
                count, source = math.floor(seconds * rate + Fraction(1, 2)), "duration"
        if count < 1:  # nothing stored: index the packets (a demux pass, no decoding)
            table = build_frame_table(path, container, stream, cancel)
            return VideoProbe(table.total_frames, table.fps, table.duration, table.timestamps, "index")
        stamps = ConstantRateTimestamps(count, rate, time_base)
        return VideoProbe(count, float(rate), stamps[count - 1] + stamps.frame_duration(), stamps, source)
    except (av.error.FFmpegError, OSError) as err:
        raise VideoReadError(path, f"probing failed ({type(err).__name__}: {err})") from err
    finally:
        container.close()


def output_sizes(native: tuple[int, int], target_size: tuple[int, int] | None,
                 scale_factors: Sequence[float] | None) -> list[tuple[int, int]]:
    """Output ``(H, W)`` per scale: ``round(s * base)`` per side (halves up, at least 1 pixel).

    ``base`` is ``target_size`` when given, else the video's native size; no scale factors = one
    output at ``base``.
    """
    base = native if target_size is None else target_size
    if scale_factors is None:
        return [tuple(base)]
    return [(max(1, math.floor(s * base[0] + 0.5)), max(1, math.floor(s * base[1] + 0.5))) for s in scale_factors]


#: The one resize filter of training and evaluation: FFmpeg's bicubic scaler applied to RGB frames,
#: and ``resample`` bicubic in the processor files every checkpoint carries (LLaVA-OneVision's own
#: choice), so an evaluator resizing decoded RGB frames with the saved processor sees the training
#: pixels. Scaling in RGB matters more than the filter: on a 720p frame resized to 384 px, scaling the
#: YUV frame (chroma at half resolution) differs from PIL's bicubic resize of the RGB frame by 1.3/255
#: on average and up to 55; scaling RGB with the same filter, by 0.22 and at most 4.
RESIZE_FILTER = "bicubic"
#: :data:`RESIZE_FILTER` as PyAV's ``interpolation`` name.
FFMPEG_INTERPOLATION = {"bilinear": "BILINEAR", "bicubic": "BICUBIC", "lanczos": "LANCZOS"}[RESIZE_FILTER]


class _Converter:
    """Converts kept frames to RGB at each output size into preallocated ``[N, 3, H, W]`` arrays.

    FFmpeg's scaler writes planar RGB (``gbrp``): its planar path is about twice as fast as packed
    ``rgb24`` at these sizes and closer to an exact float conversion (mean error 0.3 vs 1.9 levels
    measured on Big Buck Bunny at 384 px), and its planes copy straight into channels-first rows,
    so no ``[H, W, 3]`` -> ``[3, H, W]`` transpose is needed afterwards.
    """

    def __init__(self, sizes: list[tuple[int, int]], count: int,
                 arrays: list[np.ndarray] | None = None, turns: int = 0) -> None:
        self.sizes = sizes
        self.arrays = arrays if arrays is not None else [np.empty((count, 3, h, w), dtype=np.uint8)
                                                         for h, w in sizes]
        # One reformatter per conversion keeps FFmpeg's scaler set up between frames, and between reads
        # (_SCALERS): setting one up cost 1-2 ms per read at 720p.
        self.to_rgb, self.reformatters = _SCALERS.take(tuple(sizes))
        # Quarter turns counterclockwise to display orientation; sizes are the displayed picture's.
        self.turns = turns
        self.forks: list[_Converter] = []

    def fork(self) -> _Converter:
        """A converter for another thread: its own scalers, the same output arrays (disjoint rows)."""
        forked = _Converter(self.sizes, 0, self.arrays, self.turns)
        self.forks.append(forked)
        return forked

    def release(self) -> None:
        """Hand this converter's scalers and its forks' back for later reads (no conversion may follow)."""
        for converter in [self, *self.forks]:
            _SCALERS.give(tuple(converter.sizes), (converter.to_rgb, converter.reformatters))
        self.forks = []

    def __call__(self, frame: av.VideoFrame, slot: int) -> None:
        # One scaler thread: conversion already runs beside the decoder (or in a one-thread budget), and
        # FFmpeg's automatic count (one per core) cost about 10 % more CPU per 720p frame for no gain there;
        # the pixels are the same.
        native = self.to_rgb.reformat(frame, format="gbrp", threads=1)  # no chroma is scaled before RGB
        for (h, w), array, reformatter in zip(self.sizes, self.arrays, self.reformatters):
            if self.turns % 2:  # scaled in the coded orientation, then turned upright
                h, w = w, h
            planar = native if (h, w) == (native.height, native.width) else reformatter.reformat(
                native, width=w, height=h, format="gbrp", interpolation=FFMPEG_INTERPOLATION, threads=1)
            for channel, plane in zip(_GBRP_TO_RGB, planar.planes):
                pixels = np.frombuffer(plane, np.uint8).reshape(h, plane.line_size)[:, :w]
                array[slot, channel] = np.rot90(pixels, self.turns) if self.turns else pixels

    def close(self) -> None:
        """Wait for conversions still under way (none here; see ``_PipelinedConverter``)."""


class _ScalerPool:
    """Reformatters of finished reads, by output sizes, for the next reads to reuse (thread-safe)."""

    def __init__(self, most_per_key: int = 8) -> None:
        self.most_per_key = most_per_key
        self._free: dict[tuple, list[tuple[Any, list[Any]]]] = {}
        self._lock = threading.Lock()

    def take(self, sizes: tuple) -> tuple[Any, list[Any]]:
        with self._lock:
            kept = self._free.get(sizes)
            if kept:
                return kept.pop()
        new = av.video.reformatter.VideoReformatter
        return new(), [new() for _ in sizes]

    def give(self, sizes: tuple, scalers: tuple[Any, list[Any]]) -> None:
        with self._lock:
            kept = self._free.setdefault(sizes, [])
            if len(kept) < self.most_per_key:
                kept.append(scalers)
            if len(self._free) > 4 * self.most_per_key:  # many output sizes: keep the latest only
                self._free = {sizes: kept}


_SCALERS = _ScalerPool()

# gbrp's planes are G, B, R: where each goes in RGB order.
_GBRP_TO_RGB = (1, 2, 0)


class _PipelinedConverter:
    """Converts in a thread of its own while the decoder goes on (FFmpeg's scaler releases the GIL).

    At most ``depth`` decoded frames wait at a time, so memory stays bounded. ``close()`` waits for
    the queue to empty and re-raises a conversion error.
    """

    def __init__(self, convert: _Converter, depth: int = 4) -> None:
        self.convert = convert
        self.queue: queue.Queue = queue.Queue(depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="lmms-video-convert", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is None:
                try:
                    self.convert(*item)
                except BaseException as err:  # noqa: BLE001 - re-raised by close()
                    self.error = err

    def __call__(self, frame: av.VideoFrame, slot: int) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((frame, slot))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


class _Reader:
    """Decodes the requested frames of one open stream (steps 3 and 4 of the module docstring)."""

    def __init__(self, path: str | Path, container: av.container.InputContainer,
                 stream: av.video.stream.VideoStream, table: FrameTable,
                 cancel: threading.Event | None = None, packets: list[av.Packet] | None = None) -> None:
        self.path, self.container, self.stream, self.table = path, container, stream, table
        self.cancel = cancel
        self.packets = packets  # the index pass's packets (build_frame_table's keep), or None: demux
        self.codec = stream.codec_context
        self.can_skip = self.codec.name in _NONREF_SKIP_CODECS

    def read(self, slots: dict[int, int], convert: _Converter,
             groups: list[tuple[int, list[int]]] | None = None) -> list[int]:
        """Decode frames ``{frame index: output slot}`` into ``convert``; return the slots filled.

        ``groups``: the keyframe intervals to read (``plan_groups``), None = all that ``slots`` touches.
        """
        if self.table.pts is None:
            return self._read_sequential(slots, convert)
        table = self.table
        self._slot_of = {table.pts[i]: slot for i, slot in slots.items()}
        self._convert = convert
        self._done: list[int] = []
        if groups is None:
            groups = plan_groups(table, slots)
        self._remaining = {p for _, pts in groups for p in pts}

        packets: Iterator[av.Packet] | None = None
        read_pos = -1  # decode position of the last packet fed
        for key, pts in groups:
            group = [p for p in pts if p in self._remaining]
            if not group:
                continue
            # The decoder is flushed between groups, so it may only go on without a seek when the next
            # packet is this group's keyframe; any other gap is skipped by seeking.
            if packets is None or key != read_pos + 1:
                packets = self._seek(key)
            read_pos, at_end = self._decode_group(packets, max(table.decode_pos[p] for p in group), read_pos)
            if any(p in self._remaining for p in group):
                # A damaged packet's error, reported late by a frame thread, cuts the drain short (PyAV
                # returns the frames before it without raising) and strands decodable frames in the
                # decoder: decode the group again, pushing frames out with the packets that follow.
                self._push_group(self._seek(key), group)
                read_pos = -2  # the next group seeks
            if at_end:
                break
        if self._remaining:
            missing = sorted(table.pts.index(p) for p in self._remaining)
            logger.warning("%s: frames %s are indexed but did not decode; they are left out", self.path, missing)
        return self._done

    def _decode_group(self, packets: Iterator[av.Packet], last: int, read_pos: int) -> tuple[int, bool]:
        """Feed packets up to decode position ``last``, then drain and flush the decoder.

        Draining (rather than feeding packets nobody asked for until the decoder's reordering and
        thread delay release the last requested frames) decodes nothing beyond the group's last frame.
        Returns ``(decode position of the last packet fed, whether the stream ended)``.
        """
        at_end = False
        while read_pos < last:
            _check_cancel(self.cancel)
            packet = next(packets, None)
            if packet is None:  # end of stream (a file cut short)
                at_end = True
                break
            if packet.size == 0:
                continue
            if packet.pts is not None:
                read_pos = self.table.decode_pos.get(packet.pts, read_pos)
            self._feed(packet)
        self._feed(None)
        self.codec.flush_buffers()
        return read_pos, at_end

    def _push_group(self, packets: Iterator[av.Packet], group: list[int]) -> None:
        """Feed packets until each of ``group``'s pts came out or a later frame did (no drain)."""
        latest = -math.inf
        while any(p in self._remaining and p > latest for p in group):
            _check_cancel(self.cancel)
            packet = next(packets, None)
            if packet is None:
                self._feed(None)
                break
            if packet.size:
                latest = max(latest, self._feed(packet))
        self.codec.flush_buffers()

    def _feed(self, packet: av.Packet | None) -> float:
        """Decode one packet (None = drain), convert the requested frames out; return the max pts out."""
        if self.can_skip and packet is not None:
            skip = "DEFAULT" if packet.pts in self._remaining else "NONREF"
            if self.codec.skip_frame != skip:
                self.codec.skip_frame = skip
        try:
            frames = self.codec.decode(packet)
        except av.error.FFmpegError as err:  # one damaged packet: the frames it holds are missing
            logger.debug("%s: decoding error %s", self.path, err)
            return -math.inf
        latest = -math.inf
        for frame in frames:
            if frame.pts is None:
                continue
            latest = max(latest, frame.pts)
            if frame.pts in self._remaining:
                self._remaining.discard(frame.pts)
                slot = self._slot_of[frame.pts]
                self._convert(frame, slot)
                self._done.append(slot)
        return latest

    def _seek(self, key: int) -> Iterator[av.Packet]:
        """Seek so that demuxing resumes at keyframe ``key`` (or earlier); return the packet iterator.

        Demuxers differ in whether a seek timestamp is compared with pts or dts, so the keyframe's pts
        is tried first and the packet it lands on is checked; landing past the keyframe retries with
        its dts, then with earlier keyframes, then decodes from the start.
        """
        if self.packets:
            return iter(self.packets[key:])
        table = self.table
        earlier = [k for k in table.keyframes if k < key][::-1][:_SEEK_RETRIES]
        tries = [ts for ts in table.seek_ts[key] if ts is not None]
        tries += [table.seek_ts[k][0] for k in earlier]
        for ts in tries:
            _check_cancel(self.cancel)
            self.container.seek(ts, stream=self.stream, backward=True, any_frame=False)
            packets = self.container.demux(self.stream)
            first = next(packets, None)
            while first is not None and first.size == 0:
                first = next(packets, None)
            if first is None:
                continue
            landed = table.decode_pos.get(first.pts) if first.pts is not None else None
            if landed is None or landed <= key:
                logger.debug("%s: seek to keyframe %d landed at packet %s", self.path, key, landed)
                return _chain(first, packets)
        logger.warning("%s: seeking to keyframe %d failed; decoding from the start", self.path, key)
        self.container.seek(table.seek_ts[table.keyframes[0]][0] - 1, stream=self.stream, backward=True)
        return self.container.demux(self.stream)

    def _read_sequential(self, slot_of: dict[int, int], convert: _Converter) -> list[int]:
        """No usable pts: decode from the start (a freshly opened container), counting output frames."""
        done: list[int] = []
        last = max(slot_of)
        count = 0
        for packet in self.container.demux(self.stream):
            _check_cancel(self.cancel)
            try:
                frames = self.codec.decode(packet if packet.size else None)
            except av.error.FFmpegError as err:  # a lost frame would shift every later count
                logger.warning("%s: decoding error %s; frames after frame %d are not read", self.path, err, count)
                break
            for frame in frames:
                if count in slot_of:
                    convert(frame, slot_of[count])
                    done.append(slot_of[count])
                count += 1
            if count > last:
                break
        if len(done) < len(slot_of):
            got = set(done)
            logger.warning("%s: frames %s did not decode; they are left out", self.path,
                           sorted(i for i, slot in slot_of.items() if slot not in got))
        return done


def _chain(first: av.Packet, rest: Iterator[av.Packet]) -> Iterator[av.Packet]:
    yield first
    yield from rest


def plan_groups(table: FrameTable, frames: Sequence[int]) -> list[tuple[int, list[int]]]:
    """The keyframe intervals holding ``frames``: ``[(keyframe decode position, [pts ascending])]``,
    in decode order of their keyframes (the order one decoder reads them)."""
    groups: dict[int, list[int]] = {}
    for i in sorted(frames):
        groups.setdefault(table.keyframe_of[i], []).append(table.pts[i])
    return sorted(groups.items())


def _group_cost(table: FrameTable, group: tuple[int, list[int]]) -> int:
    """Packets a decoder feeds for ``group``: from its keyframe to its last frame's packet."""
    key, pts = group
    return max(table.decode_pos[p] for p in pts) - key + 1


def split_groups(table: FrameTable, groups: list[tuple[int, list[int]]], budget: int,
                 ) -> list[list[tuple[int, list[int]]]]:
    """Contiguous runs of ``groups`` of about equal decode work, one per decoder context: as many as
    make the read shortest by ``_estimated_time``, at most ``budget``.

    A run gets at least ``_MIN_PACKETS_PER_CONTEXT`` packets of work (fewer contexts otherwise), since
    each costs a container open and a seek. Contiguous runs keep one decoder's reads in file order,
    where adjacent intervals need no seek.
    """
    cost_of = {group[0]: _group_cost(table, group) for group in groups}
    costs = list(cost_of.values())
    total = sum(costs)
    most = max(1, min(budget, len(groups), MAX_DECODE_CONTEXTS, total // _MIN_PACKETS_PER_CONTEXT))
    best, best_time = [groups], _estimated_time([costs], budget)
    for parts in range(2, most + 1):
        runs = _balanced_runs(groups, costs, parts)
        seconds = _estimated_time([[cost_of[key] for key, _ in run] for run in runs], budget)
        if seconds < best_time:
            best, best_time = runs, seconds
    return best


# What FFmpeg's frame threads gain on one decoder context with two threads or more, against one thread,
# when every decoded frame is a reference (a serial chain they overlap row by row): the peers that
# decode so reached 1.4-1.7 cores of 2 (benchmarks/RESULTS.md), so 1.6.
FRAME_THREAD_GAIN = 1.6
# Packets' worth of time frame threads lose per keyframe interval: the decoder is drained after each,
# so their pipeline fills and empties again.
FRAME_THREAD_REFILL = 2.0


def _estimated_time(runs: list[list[int]], budget: int) -> float:
    """Time of decoding ``runs`` (each a list of keyframe-interval costs in packets) at once, each
    context with an equal share of ``budget`` cores, in packets decoded by one thread: the longest
    run, its intervals shortened by frame threads when its context has two cores or more, less so when
    they are short.

    One long keyframe interval beside a short one (every frame a reference in VP9 and all-reference
    streams, or a clip with few keyframes) thus stays in one context with FFmpeg's frame threads: two
    single-threaded contexts would leave one core idle once the short one is done. Many short intervals
    go to single-threaded contexts instead.
    """
    if max(1, budget // len(runs)) < 2:
        return max(sum(run) for run in runs)
    return max(sum(cost / FRAME_THREAD_GAIN + FRAME_THREAD_REFILL for cost in run) for run in runs)


def _balanced_runs(groups: list[tuple[int, list[int]]], costs: list[int], parts: int,
                   ) -> list[list[tuple[int, list[int]]]]:
    """``groups`` cut into ``parts`` contiguous runs of about equal total cost."""
    total = sum(costs)
    runs: list[list[tuple[int, list[int]]]] = [[]]
    done = 0
    for group, cost in zip(groups, costs):
        # Cut before this group when the current run already holds its share and enough groups are
        # left for the runs still to come.
        share = total * len(runs) / parts
        left = len(groups) - sum(len(r) for r in runs)
        if runs[-1] and len(runs) < parts and (done + cost / 2 > share or left <= parts - len(runs)):
            runs.append([])
        runs[-1].append(group)
        done += cost
    return runs


def _run_parallel(jobs: list[Callable[[], _T]], stop: threading.Event) -> list[_T]:
    """Run ``jobs`` at once (the first in this thread, the rest in daemon threads); their results.

    The first failure sets ``stop`` (the other jobs check it between packets) and is re-raised once
    every job has returned. Daemon threads rather than an executor: a read abandoned at its deadline
    must not hold up the interpreter's exit.
    """
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            results[k] = jobs[k]()
        except _Cancelled:
            pass
        except BaseException as err:  # noqa: BLE001 - re-raised below in the caller's thread
            errors.append(err)
            stop.set()

    threads = [threading.Thread(target=run, args=(k,), name=f"lmms-video-decode-{k}", daemon=True)
               for k in range(1, len(jobs))]
    for thread in threads:
        thread.start()
    run(0)
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    if stop.is_set() and any(r is None for r in results):
        raise _Cancelled
    return results


def read_video(path: str | Path, select: SamplingSpec | Sequence[int], *,
               target_size: tuple[int, int] | None = None, scale_factors: Sequence[float] | None = None,
               num_threads: int = 0, timeout: float | None = None) -> DecodedVideo:
    """Decode the frames of ``path`` chosen by ``select`` (see the module docstring).

    Args:
        path: a video file.
        select: a ``SamplingSpec`` (rules in ``lmms_engine.video.sampling``), or explicit frame indices
            (0-based, presentation order, any order, repeats allowed; each must be < the frame count).
        target_size: ``(H, W)`` to resize to inside FFmpeg (aspect ratio not kept); None = the stream's
            coded size.
        scale_factors: None = one ``[T, 3, H, W]`` tensor; else a list with one tensor per factor, at
            ``output_sizes(native, target_size, scale_factors)``, all from one decode pass.
        num_threads: cores for this read: decoder contexts over independent keyframe intervals, then
            FFmpeg frame threads inside them (``frame_thread_count``, module docstring step 5); 1 = one single-threaded
            decoder; 0 = ``decode_thread_budget()`` (the cores, shared among DataLoader workers).
        timeout: seconds the whole read may take (None = no limit); past it the read is abandoned and
            :class:`DecodeTimeout` raised (module docstring).

    Returns:
        ``DecodedVideo``; ``frames`` uint8 RGB ``[T, 3, H, W]`` (or a list of them).
    """
    if timeout is None:
        return _read_video(path, select, target_size, scale_factors, num_threads, None, None)
    return run_with_deadline(
        lambda cancel: _read_video(path, select, target_size, scale_factors, num_threads, timeout, cancel),
        timeout, path, "decoding")


def _read_video(path: str | Path, select: SamplingSpec | Sequence[int], target_size: tuple[int, int] | None,
                scale_factors: Sequence[float] | None, num_threads: int, timeout: float | None,
                cancel: threading.Event | None) -> DecodedVideo:
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 0:
        raise ValueError(f"num_threads must be an integer >= 0 (0 = decode_thread_budget()), got {num_threads!r}")
    budget = num_threads or decode_thread_budget()
    cache_key = FrameTableCache.key(path)
    container, stream = open_video(path, budget, timeout)
    contexts: list[av.container.InputContainer] = [container]
    try:
        _check_cancel(cancel)
        table = frame_table_cache.get(cache_key)
        packets: list[av.Packet] = []  # a table built now keeps its packets for the decoders
        if table is None:
            table = build_frame_table(path, container, stream, cancel, keep=packets)
            frame_table_cache.put(cache_key, table)
        if table.pts is None:  # no timestamps to seek by (raw streams often cannot seek): read afresh
            container.close()
            container, stream = open_video(path, budget, timeout)
            contexts = [container]
            # Frames are identified by counting: slice threads only, so an error shows at its packet.
            stream.thread_type = "SLICE"
        if isinstance(select, SamplingSpec):
            indices = sample_indices(table.timestamps, select)
        else:
            indices = [int(i) for i in select]
            bad = [i for i in indices if not 0 <= i < table.total_frames]
            if bad or not indices:
                raise ValueError(f"{path}: frame indices must be in [0, {table.total_frames}), got "
                                 f"{bad[:5] if bad else 'none'}")
        wanted = sorted(set(indices))
        codec = stream.codec_context
        turns = display_turns(path, container.format.name)  # phone videos: upright, as players show them
        native = (codec.width, codec.height) if turns % 2 else (codec.height, codec.width)
        convert = _Converter(output_sizes(native, target_size, scale_factors), len(wanted), turns=turns)
        slot_of = {i: slot for slot, i in enumerate(wanted)}
        runs = [None] if table.pts is None else split_groups(table, plan_groups(table, wanted), budget)
        try:
            if len(runs) == 1:
                done = _decode_context(path, container, stream, table, cancel, slot_of, convert, runs[0], budget,
                                       packets)
            else:
                done = _read_parallel(path, table, runs, budget, slot_of, convert, contexts, stream,
                                      timeout, cancel, packets)
        except (av.error.FFmpegError, OSError) as err:
            raise VideoReadError(path, f"decoding failed ({type(err).__name__}: {err})") from err
        else:  # every context has returned: nothing converts any more
            convert.release()
    finally:
        for opened in contexts:
            opened.close()
    if not done:
        raise VideoReadError(path, f"none of the {len(wanted)} requested frames could be decoded")
    good = set(done)
    kept = [i for i in indices if slot_of[i] in good]
    if kept == wanted:  # every frame once, in order (the usual case): the slots are the output
        tensors = [torch.from_numpy(array) for array in convert.arrays]
    else:  # repeats, another order, or frames left out; numpy's gather beats torch's for small copies
        rows = np.array([slot_of[i] for i in kept], dtype=np.int64)
        tensors = [torch.from_numpy(array[rows]) for array in convert.arrays]
    return DecodedVideo(
        frames=tensors if scale_factors is not None else tensors[0],
        frame_indices=kept,
        timestamps=[table.timestamps[i] for i in kept],
        video_fps=table.fps,
        duration=table.duration,
        total_frames=table.total_frames,
    )


# With two cores or more, a context converts in a thread of its own beside FFmpeg's.
PIPELINE_CONVERSION = True
# FFmpeg's frame threads per core of a context's share, and at most this many per context. FFmpeg's
# own count (one per core, plus one) keeps too few packets in flight once non-reference frames are
# skipped: a skipped packet still takes a thread's turn, so on the benchmark's x265 clip (half its
# frames skipped) two cores ran 1.4 busy; four per core kept them busy (wall 0.53-0.68x the best peer
# against 0.78-1.02x, CPU lower too; H.264, VP9 the same or faster). Each thread holds a picture in
# flight: a 720p read of 64 frames peaked 10-17 MiB higher with 8 threads than with 3. The cap is FFmpeg's
# own for its automatic count, so a many-core machine holds no more pictures than FFmpeg's default would.
FRAME_THREADS_PER_CORE = 4
MAX_FRAME_THREADS = 16


def frame_thread_count(threads: int) -> int:
    """FFmpeg threads for a decoder context given ``threads`` cores: 1 for one core, else
    ``FRAME_THREADS_PER_CORE`` per core up to ``MAX_FRAME_THREADS``."""
    return 1 if threads < 2 else min(MAX_FRAME_THREADS, FRAME_THREADS_PER_CORE * threads)


def _decode_context(path: str | Path, container: av.container.InputContainer, stream: av.video.stream.VideoStream,
                    table: FrameTable, cancel: threading.Event | _AnyEvent | None, slot_of: dict[int, int],
                    convert: _Converter, groups: list[tuple[int, list[int]]] | None, threads: int,
                    packets: list[av.Packet] | None = None) -> list[int]:
    """Decode ``groups`` in one decoder context given ``threads`` cores; return the slots filled.
    ``packets``: the index pass's packets to read instead of demuxing (``_Reader``).

    With 2 cores or more the kept frames are converted in a thread of their own while FFmpeg decodes
    with :func:`frame_thread_count` threads: after non-reference frames are skipped the decode is a
    serial chain that frame threads only partly shorten, while conversion overlaps it fully.
    """
    pipelined = PIPELINE_CONVERSION and threads >= 2
    stream.codec_context.thread_count = frame_thread_count(threads)
    sink = _PipelinedConverter(convert) if pipelined else convert
    try:
        done = _Reader(path, container, stream, table, cancel, packets).read(slot_of, sink, groups)
    except BaseException:
        try:
            sink.close()
        except Exception:  # noqa: BLE001 - the decode's own error is the one to report
            pass
        raise
    sink.close()
    return done


def _read_parallel(path: str | Path, table: FrameTable, runs: list[list[tuple[int, list[int]]]], budget: int,
                   slot_of: dict[int, int], convert: _Converter, contexts: list[av.container.InputContainer],
                   stream: av.video.stream.VideoStream, timeout: float | None,
                   cancel: threading.Event | None, packets: list[av.Packet] | None = None) -> list[int]:
    """Decode ``runs`` (contiguous keyframe intervals) at once, one decoder context per run.

    The already open ``stream`` serves the first run; each other run opens its own container (appended
    to ``contexts``, which the caller closes) for its decoder. Cores per context: an equal share of
    ``budget`` (:func:`frame_thread_count` FFmpeg threads each). ``packets`` (the index pass's, shared read-only) spare every context its seeks
    and demuxing.
    """
    per_context = max(1, budget // len(runs))
    stop = threading.Event()
    either = _AnyEvent(cancel, stop)

    def job(k: int) -> Callable[[], list[int]]:
        def work() -> list[int]:
            if k == 0:
                opened, ctx_stream, ctx_convert = contexts[0], stream, convert
            else:
                _check_cancel(either)
                opened, ctx_stream = open_video(path, per_context, timeout)
                contexts.append(opened)
                ctx_convert = convert.fork()
            return _decode_context(path, opened, ctx_stream, table, either, slot_of, ctx_convert, runs[k],
                                   per_context, packets)
        return work

    results = _run_parallel([job(k) for k in range(len(runs))], stop)
    return [slot for done in results for slot in done]
