"""Parallel decoding (several decoder contexts over one file), the frame-table cache, the thread policy.

Clips carry their frame index in their pixels (tests/clips.py): a frame decoded by the wrong context,
or written to the wrong row, shows up as a wrong index.
"""

from __future__ import annotations

import math
import os
import random
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from clips import make_clip, read_indices
from lmms_engine.video import decode
from lmms_engine.video.decode import (FrameTableCache, decode_thread_budget, frame_table_cache, plan_groups,
                                      read_video, split_groups)


@pytest.fixture(scope="module")
def many_gops(tmp_path_factory) -> Path:
    # 240 frames in 30 keyframe intervals of 8, B-frames inside each.
    return make_clip(tmp_path_factory.mktemp("par") / "gop8.mp4", 240, fps=25, keyframe_interval=8, size=(64, 96))


def _table(path: Path) -> decode.FrameTable:
    container, stream = decode.open_video(path, 1)
    with container:
        return decode.build_frame_table(path, container, stream)


def full_decode_rgb(path: Path) -> np.ndarray:
    """Every frame of ``path`` decoded in order by one plain single-threaded PyAV decoder,
    converted as the reader converts (planar RGB at the native size): ``[N, 3, H, W]``."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        out = []
        for frame in container.decode(stream):
            planar = frame.reformat(format="gbrp")
            g, b, r = (np.frombuffer(p, np.uint8).reshape(frame.height, p.line_size)[:, :frame.width]
                       for p in planar.planes)
            out.append(np.stack([r, g, b]))
    return np.stack(out)


@pytest.mark.parametrize("num_threads", [2, 3, 8])
def test_parallel_contexts_return_exactly_the_frames_of_a_full_decode(many_gops, num_threads):
    """Several contexts at once, random index sets (any order, repeats): bit-identical to a serial
    full decode, and each frame the one asked for."""
    reference = full_decode_rgb(many_gops)
    table = _table(many_gops)
    rng = random.Random(num_threads)
    for _ in range(4):
        indices = [rng.randrange(240) for _ in range(rng.randint(40, 80))]
        runs = split_groups(table, plan_groups(table, indices), num_threads)
        assert 1 < len(runs) <= num_threads  # the case under test: more than one decoder context
        video = read_video(many_gops, indices, num_threads=num_threads)
        assert video.frame_indices == indices
        assert read_indices(video.frames) == indices
        assert torch.equal(video.frames, torch.from_numpy(reference[indices]))


def test_thread_counts_and_resizing_do_not_change_frames(many_gops):
    indices = list(range(0, 240, 5))
    serial = read_video(many_gops, indices, num_threads=1, target_size=(32, 48), scale_factors=[1.0, 0.5])
    for threads in (2, 5):
        parallel = read_video(many_gops, indices, num_threads=threads, target_size=(32, 48),
                              scale_factors=[1.0, 0.5])
        assert all(torch.equal(a, b) for a, b in zip(serial.frames, parallel.frames))
    assert read_indices(serial.frames[1]) == indices


def test_split_groups_gives_contiguous_runs_of_equal_work(many_gops):
    table = _table(many_gops)
    groups = plan_groups(table, list(range(240)))
    assert len(groups) == 30
    for budget in (1, 2, 3, 4, 7):
        runs = split_groups(table, groups, budget)
        assert [g for run in runs for g in run] == groups  # contiguous, in order, each group once
        sizes = [len(run) for run in runs]
        # The fewest contexts that make the longest run as short as the budget allows (7 contexts
        # would leave a run of 5 intervals, as 6 do).
        assert max(sizes) == math.ceil(30 / min(budget, decode.MAX_DECODE_CONTEXTS))
        assert len(runs) == math.ceil(30 / max(sizes)) <= budget
        assert max(sizes) - min(sizes) <= 1  # equal costs here: equal shares
    # Too little work for a second context: one run.
    few = plan_groups(table, [0, 9])
    assert len(split_groups(table, few, 8)) == 1


def test_a_long_interval_beside_a_short_one_stays_in_one_context_with_frame_threads(tmp_path):
    """Two intervals of 50 and 10 frames on 2 threads: two one-thread contexts would take the long
    one's time with a core idle after the short one, one context with frame threads less (the
    plan decodes VP9 and all-reference streams so); with 4 threads, two contexts of 2 threads each."""
    clip = make_clip(tmp_path / "uneven.mp4", 60, fps=25, keyframe_interval=50)
    table = _table(clip)
    indices = list(range(0, 60, 4))
    groups = plan_groups(table, indices)
    assert [key for key, _ in groups] == [0, 50]
    assert split_groups(table, groups, 2) == [groups]
    assert split_groups(table, groups, 4) == [[groups[0]], [groups[1]]]
    reference = full_decode_rgb(clip)
    for threads in (2, 4):
        video = read_video(clip, indices, num_threads=threads)
        assert torch.equal(video.frames, torch.from_numpy(reference[indices]))


@pytest.mark.parametrize("suffix", [".mp4", ".mkv", ".ts", ".h264"])
def test_opening_probes_without_decoding_and_reads_what_a_full_probe_reads(tmp_path, monkeypatch, suffix):
    """The open probe only parses (no picture decoded, no full open after it); frames, timestamps, rate, frame count
    and the probe's description equal those of a file opened with FFmpeg's full probe."""
    clip = make_clip(tmp_path / f"c{suffix}", 40, fps=25, keyframe_interval=7)
    opened: list = []
    real_open = av.open
    monkeypatch.setattr(av, "open", lambda *a, **k: opened.append(k.get("options")) or real_open(*a, **k))
    results = []
    for probe in (decode._PROBE_PARSE_ONLY, None):
        monkeypatch.setattr(decode, "_PROBE_PARSE_ONLY", probe)
        frame_table_cache.clear()
        opened.clear()
        video = read_video(clip, list(range(0, 40, 3)), num_threads=1)
        assert opened and all(o == probe for o in opened)  # never a second, full open
        info = decode.probe_video(clip)
        results.append((video.frames, video.frame_indices, video.timestamps, video.video_fps, video.duration,
                        video.total_frames, (info.num_frames, info.fps, info.duration, info.source)))
    fast, full = results
    assert torch.equal(fast[0], full[0]) and fast[1:] == full[1:]
    assert read_indices(fast[0]) == list(range(0, 40, 3))


def test_a_single_keyframe_interval_pipelines_conversion(tmp_path):
    """One interval holds every target: one context, its conversion in a thread beside the decoder."""
    clip = make_clip(tmp_path / "one_gop.mp4", 60, fps=25)
    table = _table(clip)
    assert len(plan_groups(table, range(60))) == 1
    for threads in (1, 2, 4):
        video = read_video(clip, list(range(0, 60, 3)), num_threads=threads, target_size=(24, 32))
        assert read_indices(video.frames) == list(range(0, 60, 3))


def test_scalers_kept_between_reads_give_the_same_pixels(tmp_path, monkeypatch):
    """Reads of clips of other native sizes at one output size reuse the scalers of earlier reads (set
    up for another input size): the frames equal those of scalers made afresh for each read."""
    clips = [make_clip(tmp_path / "a.mp4", 20, fps=25, size=(64, 96)),
             make_clip(tmp_path / "b.mp4", 20, fps=25, size=(48, 64))]
    monkeypatch.setattr(decode, "_SCALERS", decode._ScalerPool())
    reused = [read_video(clip, [1, 7, 19], target_size=(24, 32), num_threads=1).frames for clip in clips * 2]
    assert len(decode._SCALERS._free[((24, 32),)]) == 1  # one set, handed from read to read
    for clip, frames in zip(clips * 2, reused):
        monkeypatch.setattr(decode, "_SCALERS", decode._ScalerPool())
        assert torch.equal(frames, read_video(clip, [1, 7, 19], target_size=(24, 32), num_threads=1).frames)


@pytest.mark.parametrize("num_threads", [1, 2, 3])
def test_decoders_reading_the_index_pass_packets_return_what_seeking_decoders_do(many_gops, monkeypatch,
                                                                                  num_threads):
    """A first read (index built now) hands its packets to every decoder context; past the byte cap, or
    with the index cached, the decoders seek and demux. Frames are the full decode's either way."""
    reference = full_decode_rgb(many_gops)
    indices = random.Random(num_threads).sample(range(240), 50)
    real_seek = decode._Reader._seek
    from_packets: list[bool] = []

    def seek(self, key):
        from_packets.append(bool(self.packets))
        return real_seek(self, key)

    monkeypatch.setattr(decode._Reader, "_seek", seek)
    for cap, cached, expected in ((decode._MAX_KEPT_PACKET_BYTES, False, True), (100, False, False),
                                  (decode._MAX_KEPT_PACKET_BYTES, True, False)):
        monkeypatch.setattr(decode, "_MAX_KEPT_PACKET_BYTES", cap)
        if not cached:
            frame_table_cache.clear()
        from_packets.clear()
        video = read_video(many_gops, indices, num_threads=num_threads)
        assert torch.equal(video.frames, torch.from_numpy(reference[indices]))
        assert from_packets and set(from_packets) == {expected}


@pytest.mark.parametrize("codec", ["libx265", "libx264"])
def test_context_with_two_cores_runs_four_frame_threads_per_core_frame_exact(tmp_path, monkeypatch, codec):
    """A read with two cores in one decoder context runs ``frame_thread_count(2)`` = 8 FFmpeg threads
    (one core: 1), HEVC and H.264 alike, and returns the frames of a serial full decode."""
    from lmms_engine.video.encode import write_video
    from clips import coded_frames

    assert [decode.frame_thread_count(n) for n in (1, 2, 3, 4, 8)] == [1, 8, 12, 16, 16]
    options = {"preset": "ultrafast", "x265-params": "log-level=error"} if codec == "libx265" else {}
    clip = write_video(tmp_path / "c.mp4", coded_frames(40, 64, 96), fps=25, keyframe_interval=40, codec=codec,
                       options=options)
    counts: list[int] = []
    real_reader = decode._Reader

    def reader(path, container, stream, *args):
        counts.append(stream.codec_context.thread_count)
        return real_reader(path, container, stream, *args)

    monkeypatch.setattr(decode, "_Reader", reader)
    indices = list(range(0, 40, 3))
    reference = full_decode_rgb(clip)
    for threads, expected in ((2, 8), (1, 1)):
        counts.clear()
        frame_table_cache.clear()
        video = read_video(clip, indices, num_threads=threads)
        assert counts == [expected]
        assert torch.equal(video.frames, torch.from_numpy(reference[indices]))
        assert read_indices(video.frames) == indices


def test_frame_table_cache_hits_and_invalidates_on_change(tmp_path):
    clip = make_clip(tmp_path / "c.mp4", 50, fps=25, keyframe_interval=10)
    frame_table_cache.clear()
    first = read_video(clip, [0, 49])
    assert (frame_table_cache.hits, frame_table_cache.misses) == (0, 1)
    again = read_video(clip, [3, 40])
    assert (frame_table_cache.hits, frame_table_cache.misses) == (1, 1)
    assert read_indices(again.frames) == [3, 40] and again.total_frames == first.total_frames == 50

    # Same path rewritten with another video: a different size and mtime, so a fresh index.
    other = make_clip(tmp_path / "other.mp4", 80, fps=25, keyframe_interval=10)
    shutil.copyfile(other, clip)
    changed = read_video(clip, [70, 79])
    assert frame_table_cache.misses == 2
    assert changed.total_frames == 80 and read_indices(changed.frames) == [70, 79]

    # Only the mtime changes: still a new key (a file rewritten to the same size).
    stat = clip.stat()
    os.utime(clip, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    read_video(clip, [1])
    assert frame_table_cache.misses == 3
    assert FrameTableCache.key(clip) != (str(clip.resolve()), stat.st_size, stat.st_mtime_ns,
                                         stat.st_ino, stat.st_dev)


def test_frame_table_cache_is_bounded_and_skips_pipes(tmp_path):
    cache = FrameTableCache(max_entries=2)
    clips = [make_clip(tmp_path / f"{k}.mp4", 5, fps=5) for k in range(3)]
    tables = [_table(c) for c in clips]
    for clip, table in zip(clips, tables):
        cache.put(FrameTableCache.key(clip), table)
    assert len(cache) == 2
    assert cache.get(FrameTableCache.key(clips[0])) is None  # least recently used, dropped
    assert cache.get(FrameTableCache.key(clips[2])) is tables[2]
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert FrameTableCache.key(fifo) is None and FrameTableCache.key(tmp_path / "missing") is None


class _BudgetPerWorker(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> int:
        return decode_thread_budget()


def test_default_thread_budget_shares_the_cores_among_dataloader_workers():
    cores = len(os.sched_getaffinity(0))
    assert decode_thread_budget() == cores
    loader = torch.utils.data.DataLoader(_BudgetPerWorker(), batch_size=None, num_workers=2)
    assert list(loader) == [max(1, cores // 2)] * 4


def test_num_threads_is_checked(many_gops):
    with pytest.raises(ValueError, match=r"num_threads must be an integer >= 0"):
        read_video(many_gops, [0], num_threads=-1)
