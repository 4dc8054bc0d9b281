"""Frame loading: exact frame indices for every sampling rule, container and keyframe layout; errors.

Every clip carries its frame index in its pixels (tests/clips.py), so each test checks both the
indices the loader reports and the frames it actually decoded.
"""

from __future__ import annotations

import pickle
import random
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from clips import (make_clip, make_open_gop_clip, packet_timeline, read_indices, remux_with_offset,
                   write_audio_only)
from lmms_engine.models.video_frame_utils import MultiScaleVideoFrameLoader, VideoReadError
from lmms_engine.video.decode import DecodedVideo, read_video


@pytest.fixture(scope="session")
def clips(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("clips")
    c = {
        # 150 frames, 25 fps, one keyframe (x264's default interval 250 > length): B-frames throughout
        "sparse": make_clip(d / "sparse.mp4", 150, fps=25),
        "gop12": make_clip(d / "gop12.mp4", 120, fps=24, keyframe_interval=12, size=(64, 96)),
        "intra": make_clip(d / "intra.mp4", 60, fps=30, keyframe_interval=1),
        "ntsc": make_clip(d / "ntsc.mp4", 100, fps=30000 / 1001, keyframe_interval=30),
        "odd": make_clip(d / "odd.mp4", 40, fps=10, keyframe_interval=16, size=(46, 70)),
        "short": make_clip(d / "short.mp4", 5, fps=5),
        "mkv": make_clip(d / "gop12.mkv", 120, fps=24, keyframe_interval=12, size=(64, 96)),
        "raw": make_clip(d / "raw.h264", 50, fps=25, keyframe_interval=20),
        "open_gop": make_open_gop_clip(d / "open_gop.mkv", 60, keyframe_interval=12),
    }
    c["offset_mkv"] = remux_with_offset(c["gop12"], d / "offset.mkv", 1.5)
    c["offset_mp4"] = remux_with_offset(c["gop12"], d / "offset.mp4", 2.25)
    # Negative timestamps for the first 0.5 s: the mp4 edit list hides those 12 frames (pre-roll).
    c["preroll"] = remux_with_offset(c["gop12"], d / "preroll.mp4", -0.5)
    return c


@pytest.fixture(scope="module")
def loader() -> MultiScaleVideoFrameLoader:
    return MultiScaleVideoFrameLoader()


def linspace(n: int, k: int, start: int = 0) -> list[int]:
    """LLaVA-NeXT's uniform sampling: np.linspace(0, n - 1, k, dtype=int)."""
    return [start + int(i) for i in np.linspace(0, n - 1, k, dtype=int)]


def assert_frames(video: DecodedVideo, expected: list[int]) -> None:
    assert video.frame_indices == expected
    assert read_indices(video.frames) == expected
    assert video.frames.dtype == torch.uint8 and video.frames.is_contiguous()
    assert video.frames.shape[:2] == (len(expected), 3)


# --- sampling rules ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["sparse", "gop12", "intra", "ntsc", "mkv", "offset_mkv", "offset_mp4", "raw"])
@pytest.mark.parametrize("k", [1, 7, 16])
def test_uniform_sampling_is_linspace_over_all_frames(clips, loader, name, k):
    with av.open(str(clips[name])) as c:
        n = sum(1 for p in c.demux(c.streams.video[0]) if p.size)
    video = loader.load_video(clips[name], max_frames=k)
    assert video.total_frames == n
    assert_frames(video, linspace(n, k))


def test_clips_exercise_b_frames_and_shifted_timestamps(clips):
    decode_order, presentation = packet_timeline(clips["sparse"])
    assert decode_order != presentation  # B-frames: pts leave the decoder out of packet order
    shifted, _ = packet_timeline(clips["offset_mkv"])
    assert min(shifted) > 0


@pytest.mark.parametrize("name", ["sparse", "mkv", "offset_mp4", "raw", "odd", "open_gop"])
def test_every_frame_comes_back_in_order(clips, loader, name):
    video = loader.load_video(clips[name], max_frames=1000)
    assert_frames(video, list(range(video.total_frames)))


def test_metadata_and_timestamps(clips, loader):
    video = loader.load_video(clips["sparse"], max_frames=4)
    assert (video.video_fps, video.total_frames) == (25.0, 150)
    assert video.duration == pytest.approx(6.0)
    assert video.timestamps == pytest.approx([i / 25 for i in video.frame_indices])
    # A stream starting at pts 1.5 s: timestamps still count from its first frame.
    shifted = loader.load_video(clips["offset_mkv"], max_frames=4)
    assert shifted.timestamps == pytest.approx([i / 24 for i in shifted.frame_indices], abs=1e-3)
    assert shifted.duration == pytest.approx(5.0, abs=1e-3)
    ntsc = loader.load_video(clips["ntsc"], max_frames=3)
    assert ntsc.video_fps == pytest.approx(30000 / 1001, rel=1e-3)


def test_sample_rate_takes_every_nth_frame_then_caps(clips, loader):
    assert_frames(loader.load_video(clips["sparse"], max_frames=100, sample_rate=4), list(range(0, 150, 4)))
    every_4th = list(range(0, 150, 4))  # 38 candidates > 8: linspace over the candidates
    assert_frames(loader.load_video(clips["sparse"], max_frames=8, sample_rate=4),
                  [every_4th[i] for i in linspace(38, 8)])


def test_fps_sampling(clips, loader):
    sparse = clips["sparse"]  # 25 fps, 6 s
    assert_frames(loader.load_video(sparse, max_frames=8, fps=1), [0, 25, 50, 75, 100, 125])
    assert_frames(loader.load_video(sparse, max_frames=8, fps=0.5), [0, 50, 100])
    # 15 candidates > max_frames: linspace over all frames of the range, as LLaVA-NeXT does
    assert_frames(loader.load_video(sparse, max_frames=8, fps=2.5), linspace(150, 8))
    assert_frames(loader.load_video(sparse, max_frames=20, fps=2.5), list(range(0, 150, 10)))
    # fps above the video's rate: every frame once
    assert_frames(loader.load_video(clips["short"], max_frames=8, fps=60), [0, 1, 2, 3, 4])
    # force_sample: exactly max_frames by linspace even though 6 candidates < 8
    assert_frames(loader.load_video(sparse, max_frames=8, fps=1, force_sample=True), linspace(150, 8))


def test_fractional_fps_follows_time_not_a_rounded_step(clips, loader):
    # 24 fps at 5 fps: times 0, 0.2, 0.4 ... -> frame on screen = floor(24 t): 0, 4, 9, 14, 19, 24, ...
    video = loader.load_video(clips["gop12"], max_frames=30, fps=5)
    expected = [int(np.floor(24 * j / 5 + 1e-9)) for j in range(25)]
    assert_frames(video, expected)
    # 29.97 fps at 1 fps: frame 30 starts at 1.001 s, so at t = 1 s frame 29 is on screen.
    ntsc = loader.load_video(clips["ntsc"], max_frames=8, fps=1)
    rate = Fraction(30000, 1001)
    assert_frames(ntsc, [int(np.floor(j * rate)) for j in range(4)])
    assert ntsc.frame_indices == [0, 29, 59, 89]


def test_start_and_end_time(clips, loader):
    sparse = clips["sparse"]
    # frames with 1.0 <= t < 3.0 are 25..74
    assert_frames(loader.load_video(sparse, max_frames=8, start_time=1.0, end_time=3.0), linspace(50, 8, start=25))
    assert_frames(loader.load_video(sparse, max_frames=8, fps=1, start_time=1.0, end_time=3.0), [25, 50])
    # end_time past the end is clipped to the end
    assert_frames(loader.load_video(sparse, max_frames=4, start_time=5.0, end_time=99.0), linspace(25, 4, start=125))
    video = loader.load_video(clips["offset_mp4"], max_frames=3, start_time=2.0)  # relative to first frame
    assert_frames(video, linspace(72, 3, start=48))
    with pytest.raises(ValueError, match="no frame in the time range"):
        loader.load_video(sparse, start_time=7.0)
    with pytest.raises(ValueError, match="end_time"):
        loader.load_video(sparse, start_time=2.0, end_time=1.0)


def test_short_video_returns_fewer_frames_or_repeats_with_force_sample(clips, loader):
    assert_frames(loader.load_video(clips["short"], max_frames=8), [0, 1, 2, 3, 4])
    forced = loader.load_video(clips["short"], max_frames=8, force_sample=True)
    assert_frames(forced, [0, 0, 1, 1, 2, 2, 3, 4])  # LLaVA-NeXT's linspace(0, 4, 8, dtype=int)
    assert torch.equal(forced.frames[0], forced.frames[1])


def test_argument_errors(clips, loader):
    path = clips["short"]
    for kwargs, match in [({"max_frames": 0}, "max_frames"), ({"sample_rate": 0}, "sample_rate"),
                          ({"fps": 0}, "fps"), ({"fps": 1, "sample_rate": 2}, "either fps"),
                          ({"start_time": -1}, "start_time"), ({"target_size": (0, 4)}, "target_size"),
                          ({"target_size": 224}, "target_size"),
                          ({"scale_factors": [1.0]}, "enable_multiscale"),
                          ({"enable_multiscale": True, "scale_factors": [1.0, 0]}, "scale_factors")]:
        with pytest.raises(ValueError, match=match):
            loader.load_video(path, **kwargs)
    with pytest.raises(TypeError, match="fsp"):
        loader.load_video_frames(path, fsp=1)
    with pytest.raises(ValueError, match="frame indices"):
        read_video(path, [0, 5])


# --- decoding plan: seeks, keyframe intervals, containers -------------------------------------------------

@pytest.mark.parametrize("name", ["sparse", "gop12", "intra", "mkv", "offset_mp4", "open_gop"])
def test_arbitrary_index_sets_decode_exactly(clips, name):
    """Random targets (any order, repeats) across sparse, dense, all-intra and open-GOP layouts."""
    rng = random.Random(name)
    n = {"sparse": 150, "intra": 60, "open_gop": 60}.get(name, 120)
    for _ in range(6):
        indices = [rng.randrange(n) for _ in range(rng.randint(1, 12))]
        video = read_video(clips[name], indices)
        assert video.frame_indices == indices
        assert read_indices(video.frames) == indices


def test_open_gop_leading_frames(clips):
    """Keyframe 12 of an open GOP is decoded before frames 9-11, which reference the interval before."""
    decode_order, _ = packet_timeline(clips["open_gop"])
    first_pts = decode_order[0]
    step = sorted(decode_order)[1] - first_pts
    position_of_12 = decode_order.index(first_pts + 12 * step)
    assert any(p < first_pts + 12 * step for p in decode_order[position_of_12 + 1:])  # leading B-frames
    for indices in ([10], [9, 10, 11], [11, 12], [12, 13, 10]):
        video = read_video(clips["open_gop"], indices)
        assert video.frame_indices == indices and read_indices(video.frames) == indices


def test_edit_list_preroll_frames_are_not_frames(clips, loader):
    """Frames an edit list cuts from the start are decoded as references but never returned."""
    video = loader.load_video(clips["preroll"], max_frames=1000)
    assert video.total_frames == 108 and video.timestamps[0] == 0.0
    assert read_indices(video.frames) == list(range(12, 120))
    some = read_video(clips["preroll"], [0, 1, 50, 107])
    assert read_indices(some.frames) == [12, 13, 62, 119]


@pytest.mark.parametrize("num_threads", [1, 3])
def test_thread_settings_do_not_change_frames(clips, num_threads):
    loader = MultiScaleVideoFrameLoader(num_threads=num_threads)
    assert_frames(loader.load_video(clips["gop12"], max_frames=9), linspace(120, 9))


# --- sizes and scales ---------------------------------------------------------------------------------

def test_target_size_resizes_in_the_decoder(clips, loader):
    video = loader.load_video(clips["gop12"], max_frames=5, target_size=(45, 67))
    assert video.frames.shape == (5, 3, 45, 67)
    assert read_indices(video.frames) == video.frame_indices == linspace(120, 5)


def test_native_size_of_a_non_multiple_of_16_clip(clips, loader):
    video = loader.load_video(clips["odd"], max_frames=4)
    assert video.frames.shape == (4, 3, 46, 70)
    assert read_indices(video.frames) == linspace(40, 4)


def test_multiscale_from_one_decode(clips, loader):
    frames = loader.load_video_frames(clips["odd"], max_frames=4, enable_multiscale=True)
    # default factors 1.0, 0.75, 0.5 of 46x70: 0.75 * 46 = 34.5 -> 35 (halves up), 0.75 * 70 = 52.5 -> 53
    assert [tuple(f.shape) for f in frames] == [(4, 3, 46, 70), (4, 3, 35, 53), (4, 3, 23, 35)]
    video = loader.load_video(clips["gop12"], max_frames=6, target_size=(64, 96), enable_multiscale=True,
                              scale_factors=[1.0, 0.5, 0.25])
    assert [tuple(f.shape) for f in video.frames] == [(6, 3, 64, 96), (6, 3, 32, 48), (6, 3, 16, 24)]
    for scale in video.frames:
        assert read_indices(scale) == video.frame_indices == linspace(120, 6)
    single = loader.load_video(clips["gop12"], max_frames=6, target_size=(64, 96))
    assert torch.equal(single.frames, video.frames[0])


def test_guide_section_1_snippets_run_as_written(clips, tmp_path, monkeypatch):
    (tmp_path / "path" / "to").mkdir(parents=True)
    (tmp_path / "path" / "to" / "video.mp4").write_bytes(clips["sparse"].read_bytes())  # 64x48, 150 frames
    monkeypatch.chdir(tmp_path)
    embeddings = torch.randn(8, 576, 16)  # 24x24 patches (SigLIP 384/16): P // 4 = 144 at stride 2
    scope = {"embeddings": embeddings}
    exec(compile('''
from lmms_engine.models.video_frame_utils import MultiScaleVideoFrameLoader

loader = MultiScaleVideoFrameLoader()

# single scale
frames = loader.load_video_frames(
    video_path="path/to/video.mp4",
    max_frames=8,
    sample_rate=1,
    target_size=(224, 224),
    enable_multiscale=False
)
# returns: [T, 3, H, W]

# multi-scale
multiscale_frames = loader.load_video_frames(
    video_path="path/to/video.mp4",
    max_frames=8,
    enable_multiscale=True,
    scale_factors=[1.0, 0.75, 0.5]
)
# returns: List[[T, 3, H1, W1], [T, 3, H2, W2], [T, 3, H3, W3]]

# spatial pooling (applied to video features)
pooled_features = loader.apply_spatial_pooling(
    video_features=embeddings,  # [T, P, D]
    stride=2,
    mode='average'
)
# returns: [T, P//4, D]
''', "guide", "exec"), scope)
    assert scope["frames"].shape == (8, 3, 224, 224)
    assert read_indices(scope["frames"]) == linspace(150, 8)
    assert [tuple(f.shape) for f in scope["multiscale_frames"]] == [(8, 3, 48, 64), (8, 3, 36, 48), (8, 3, 24, 32)]
    assert scope["pooled_features"].shape == (8, 144, 16)
    grid = embeddings.reshape(8, 24, 24, 16)
    expected = (grid[:, 0::2, 0::2] + grid[:, 0::2, 1::2] + grid[:, 1::2, 0::2] + grid[:, 1::2, 1::2]) / 4
    torch.testing.assert_close(scope["pooled_features"], expected.reshape(8, 144, 16))


# --- broken inputs ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def broken(clips, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    d = tmp_path_factory.mktemp("broken")
    (d / "empty.mp4").write_bytes(b"")
    (d / "notes.txt").write_text("this is a text file, not a video\n" * 40)
    (d / "text.mp4").write_text("this is a text file, not a video\n" * 40)
    mp4 = clips["gop12"].read_bytes()
    (d / "cut_index.mp4").write_bytes(mp4[: len(mp4) // 2])  # mp4 index (moov) sits at the end: gone
    mkv = clips["mkv"].read_bytes()
    (d / "cut_header.mkv").write_bytes(mkv[:200])
    first_frame = mkv.index(b"\x1f\x43\xb6\x75")  # Matroska Cluster id: frames follow it
    (d / "no_frames.mkv").write_bytes(mkv[: first_frame + 8])
    return {
        "missing": (d / "missing.mp4", "no such file"),
        "directory": (d, "directory"),
        "empty": (d / "empty.mp4", "empty"),
        "text_txt": (d / "notes.txt", "not a video"),
        "text_mp4": (d / "text.mp4", "not a readable media file"),
        "audio_only": (write_audio_only(d / "tone.wav"), "no video stream"),
        "cut_index": (d / "cut_index.mp4", "not a readable media file"),
        "cut_header": (d / "cut_header.mkv", "not a readable media file"),
        "no_frames": (d / "no_frames.mkv", "no frames"),
    }


@pytest.mark.parametrize("kind", ["missing", "directory", "empty", "text_txt", "text_mp4", "audio_only",
                                  "cut_index", "cut_header", "no_frames"])
def test_broken_files_raise_video_read_error(broken, loader, kind):
    path, cause = broken[kind]
    with pytest.raises(VideoReadError) as info:
        loader.load_video_frames(path)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.path == str(path) and str(path) in str(err)
    assert cause in err.cause and cause in str(err)
    clone = pickle.loads(pickle.dumps(err))  # DataLoader workers send exceptions across processes
    assert (type(clone), clone.path, clone.cause, str(clone)) == (VideoReadError, err.path, err.cause, str(err))


def test_truncated_file_yields_the_frames_it_still_holds(clips, loader, tmp_path):
    mkv = clips["mkv"].read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(mkv[: int(len(mkv) * 0.6)])
    video = loader.load_video(cut, max_frames=1000)
    assert 0 < video.total_frames < 120
    assert_frames(video, list(range(video.total_frames)))
    assert video.duration == pytest.approx(video.total_frames / 24, abs=1e-3)
    sampled = loader.load_video(cut, max_frames=5)
    assert_frames(sampled, linspace(video.total_frames, 5))


def _nal_units(data: bytes) -> list[int]:
    """Header bytes of the NAL units of a length-prefixed (mp4/mkv) H.264 packet."""
    headers, i = [], 0
    while i + 4 < len(data):
        size = int.from_bytes(data[i:i + 4], "big")
        headers.append(data[i + 4])
        i += 4 + size
    return headers


def test_undecodable_frame_is_left_out_never_repeated(clips, loader, tmp_path):
    """Garbage in place of one non-reference frame: that frame is missing, every other one is exact."""
    damaged = tmp_path / "damaged.mkv"
    with av.open(str(clips["sparse"])) as inp, av.open(str(damaged), mode="w") as out:
        s_in = inp.streams.video[0]
        s_out = out.add_stream_from_template(s_in)
        victim_pts = None
        for packet in inp.demux(s_in):
            if packet.size == 0:
                continue
            slices = [h for h in _nal_units(bytes(packet)) if (h & 31) in (1, 5)]
            if victim_pts is None and packet.pts > 20 * 512 and slices and all(h >> 5 == 0 for h in slices):
                victim_pts = packet.pts  # a non-reference slice: no other frame depends on it
                body = bytes([0x01]) + np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes()
                garbage = av.Packet(len(body).to_bytes(4, "big") + body)
                garbage.pts, garbage.dts, garbage.time_base = packet.pts, packet.dts, packet.time_base
                packet = garbage
            packet.stream = s_out
            out.mux(packet)
    assert victim_pts is not None
    victim = victim_pts // 512  # 25 fps in a 1/12800 time base
    video = loader.load_video(damaged, max_frames=1000)
    assert video.total_frames == 150
    expected = [i for i in range(150) if i != victim]
    assert_frames(video, expected)
    around = read_video(damaged, [victim - 1, victim, victim + 1])
    assert_frames(around, [victim - 1, victim + 1])
