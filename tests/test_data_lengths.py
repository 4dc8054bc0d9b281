"""Token lengths estimated from container metadata equal the loaded samples' lengths, and early dropping
leaves out exactly the records loading would drop, without decoding them."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from clips import make_clip
from lmms_engine.data.dataset import build_dataset
from lmms_engine.data.preprocess import ProcessorInfo
from lmms_engine.data.tokenizer import build_tiny_tokenizer
from lmms_engine.models.video_frame_utils import MultiScaleVideoFrameLoader
from lmms_engine.video.decode import probe_video

INFO = ProcessorInfo(image_size=32, patch_size=8)  # 4x4 patches -> 2x2 after pooling: 4 tokens a frame + 1

# name: (frames, fps, where the probe finds the frame count)
CLIPS = {
    "a.mp4": (37, 25, "frame_count"),
    "b.mkv": (41, 30, "duration"),  # Matroska stores no frame count: duration x rate
    "c.h264": (23, 25, "index"),  # a raw stream stores neither: packets are counted (no decoding)
    "d.mp4": (45, 30000 / 1001, "frame_count"),
    "e.mkv": (20, 12.5, "duration"),
    "f.mp4": (7, 10, "frame_count"),
}

SETTINGS = {
    "uniform": {"max_frames": 8},
    "uniform_all_frames": {"max_frames": 64},
    "fps": {"fps": 4.0, "max_frames": 32},
    "fps_capped": {"fps": 20.0, "max_frames": 12},
    "force_sample": {"fps": 1.0, "max_frames": 6, "force_sample": True},
    "force_sample_uniform": {"max_frames": 10, "force_sample": True},
    "time_instruction": {"fps": 8.0, "max_frames": 16, "add_time_instruction": True},
}


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lengths")
    for name, (frames, fps, _) in CLIPS.items():
        make_clip(root / name, frames, fps=fps, size=(32, 32))
    return root


def qa(video: str | None, *pairs: str, **extra) -> dict:
    turns = []
    for k in range(0, len(pairs), 2):
        turns += [{"from": "human", "value": pairs[k]}, {"from": "gpt", "value": pairs[k + 1]}]
    record = {"conversations": turns} | extra
    if video is not None:
        record["video"] = video
    return record


def records() -> list[dict]:
    out = [qa(name, f"What happens in clip {name}?", "Squares " * (i + 1)) for i, name in enumerate(CLIPS)]
    out.append(qa(None, "Hello there?", "Hi."))
    out.append(qa("a.mp4", "First?", "One.", "Second question, longer?", "Two " * 12))
    out.append(qa("b.mkv", "In the middle?", "Yes.", video_start=0.3, video_end=1.1))
    return out


def write(root: Path, recs: list[dict], name: str) -> str:
    path = root / name
    path.write_text(json.dumps(recs))
    return str(path)


def test_probe_reads_the_frame_count_from_metadata(root):
    for name, (frames, fps, source) in CLIPS.items():
        probe = probe_video(root / name)
        assert (probe.num_frames, probe.source) == (frames, source), name
        assert probe.fps == pytest.approx(fps)


@pytest.mark.parametrize("setting", SETTINGS)
def test_estimates_equal_the_loaded_lengths(tok, root, setting):
    path = write(root, records(), f"{setting}.json")
    ds = build_dataset({"data_path": path, "max_length": None, **SETTINGS[setting]}, tok, INFO)
    estimates = ds.length_estimates()
    samples = [ds[i] for i in range(len(ds))]
    assert [s["index"] for s in samples] == list(range(len(ds)))
    assert [e.num_frames for e in estimates] == [s["video_num_frames"] for s in samples]
    assert all(e.exact for e in estimates)
    assert ds.estimated_lengths() == [len(s["input_ids"]) for s in samples]
    assert [e.length for e in estimates] == [len(s["input_ids"]) for s in samples]
    # the estimates vary with the clips (else the test would prove little)
    assert len({e.num_frames for e in estimates if e.num_frames}) > 1 or setting.startswith("force")


@pytest.mark.parametrize("truncation", ["drop", "turns"])
def test_early_drop_leaves_out_exactly_what_loading_drops_without_decoding_it(tok, root, monkeypatch, truncation):
    # each record its own video file, so "never decoded" can be checked per file
    recs = []
    for i, rec in enumerate(records()):
        if "video" in rec:
            copy = root / f"{truncation}_{i}_{rec['video']}"
            copy.write_bytes((root / rec["video"]).read_bytes())
            rec["video"] = copy.name
        recs.append(rec)
    path = write(root, recs, f"early_{truncation}.json")
    config = {"data_path": path, "fps": 8.0, "max_frames": 16, "truncation": truncation}
    full = build_dataset(config | {"max_length": None}, tok, INFO).length_estimates()
    # a limit between the lengths: some records fit, some do not; the two-exchange one fits only its first
    max_length = sorted(e.length for e in full)[len(full) // 2]
    two_exchanges = 7
    assert full[two_exchanges].turn_ends[0] <= max_length < full[two_exchanges].length
    config["max_length"] = max_length

    # reference: load everything, see what loading drops
    late = build_dataset(config, tok, INFO)
    for i in range(len(late)):
        late[i]
    dropped_late = {e["where"] for e in late.bad_record_report().records if e["reason"] == "too_long"}
    assert dropped_late and len(dropped_late) < len(recs)
    assert (f"{path}: record {two_exchanges}" in dropped_late) == (truncation == "drop")

    real = MultiScaleVideoFrameLoader.load_video
    decoded: list[str] = []

    def recording(self, video_path, **kwargs):
        decoded.append(os.path.basename(video_path))
        return real(self, video_path, **kwargs)

    monkeypatch.setattr(MultiScaleVideoFrameLoader, "load_video", recording)
    early = build_dataset(config | {"drop_long_before_loading": True}, tok, INFO)
    assert decoded == []  # building probes containers, decodes nothing
    report = early.bad_record_report()
    assert {e["where"] for e in report.records} == dropped_late
    assert report.counts == {"too_long": len(dropped_late)}
    assert len(early) == len(recs) - len(dropped_late)
    samples = [early[i] for i in range(len(early))]
    assert [s["index"] for s in samples] == list(range(len(early)))  # nothing dropped while loading
    assert early.bad_record_report().counts == {"too_long": len(dropped_late)}
    dropped_videos = {e["video"] for e in report.records} - {None}
    assert dropped_videos and not {os.path.basename(v) for v in dropped_videos} & set(decoded)
    assert sorted(decoded) == sorted(os.path.basename(r.video) for r in early.records if r.video)
    # served lengths (after turn-wise truncation) match the estimate too
    assert early.estimated_lengths() == [len(s["input_ids"]) for s in samples]


def test_a_video_that_cannot_be_probed_is_kept_and_bounded(tok, root, tmp_path):
    fifo = tmp_path / "stalled.mp4"
    os.mkfifo(fifo)
    try:
        path = write(tmp_path, [qa(str(fifo), "Q?", "A."), qa("a.mp4", "Q?", "A.")], "fifo.json")
        config = {"data_path": path, "video_folder": str(root), "max_frames": 4, "decode_timeout": 0.5,
                  "max_length": 12, "truncation": "drop", "drop_long_before_loading": True}
        start = time.monotonic()
        ds = build_dataset(config, tok, INFO)
        assert time.monotonic() - start < 5.0
        # the clip's record is too long for 12 tokens and left out; the unprobed pipe's record is only
        # bounded (max_frames frames assumed), so it is kept and judged when loaded
        assert [r.video for r in ds.records] == [str(fifo)]
        left_out = [(e["reason"], e["where"]) for e in ds.bad_record_report().records]
        assert left_out == [("too_long", f"{path}: record 1")]
        (estimate,) = ds.length_estimates()
        assert not estimate.exact and estimate.num_frames == 4 and estimate.video_tokens == INFO.video_token_count(4)
    finally:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
