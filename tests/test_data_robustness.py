"""Bad data at scale: a video read that blocks times out and is replaced (in the main process and in a
DataLoader worker), the error budget stops a run with too many bad records, the JSON report lists every
failed record."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from clips import make_clip
from lmms_engine.data.dataset import BadRecordBudgetError, build_dataset
from lmms_engine.data.preprocess import ProcessorInfo
from lmms_engine.data.records import BadRecordError
from lmms_engine.data.tokenizer import build_tiny_tokenizer
from lmms_engine.utils.config import ConfigError
from lmms_engine.video.decode import DecodeTimeout, read_video
from lmms_engine.video.sampling import SamplingSpec

INFO = ProcessorInfo(image_size=32, patch_size=8)
TIMEOUT = 0.5
# A blocked read costs TIMEOUT; everything else here takes milliseconds. Generous for a loaded machine.
WITHIN = 5.0


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("robust")
    for name, frames in (("a.mp4", 12), ("b.mp4", 9)):
        make_clip(root / name, frames)
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    return root


@pytest.fixture
def fifo(tmp_path):
    """A named pipe nobody writes: opening it for reading blocks for good. Released afterwards so no
    reader stays blocked (opening the write end lets a waiting reader through, to an empty stream)."""
    path = tmp_path / "stalled.mp4"
    os.mkfifo(path)
    yield path
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO when no reader is waiting
    except OSError:
        return
    os.close(fd)


def qa(video: str | Path | None, question: str = "What?", answer: str = "That.") -> dict:
    record: dict = {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if video is not None:
        record["video"] = str(video)
    return record


def write(root: Path, records: list[dict], name: str = "data.json") -> str:
    path = root / name
    path.write_text(json.dumps(records))
    return str(path)


def test_a_blocked_read_times_out_and_the_next_record_is_served(tok, videos, fifo, tmp_path, caplog):
    path = write(tmp_path, [qa(videos / "a.mp4"), qa(fifo), qa(videos / "b.mp4")])
    ds = build_dataset({"data_path": path, "on_bad_record": "skip", "decode_timeout": TIMEOUT, "max_frames": 4},
                       tok, INFO)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="lmms_engine.data.dataset"):
        sample = ds[1]
    assert time.monotonic() - start < WITHIN
    assert sample["index"] == 2 and sample["video_num_frames"] == 4
    assert str(fifo) in caplog.text and "decode_timeout" in caplog.text
    # known bad now: skipped without waiting again
    start = time.monotonic()
    assert ds[1]["index"] == 2 and time.monotonic() - start < TIMEOUT
    report = ds.bad_record_report()
    assert report.counts == {"decode_timeout": 1}
    assert [(e["reason"], e["video"]) for e in report.records] == [("decode_timeout", str(fifo))]
    assert report.records[0]["where"] == f"{path}: record 1"
    assert f"within {TIMEOUT:g} s" in report.records[0]["message"]
    written = json.loads(ds.write_report(tmp_path / "out" / "bad_records.json").read_text())
    assert written["counts"] == {"decode_timeout": 1} and written["num_bad"] == 1 and written["num_records"] == 3
    assert written["records"][0]["video"] == str(fifo) and written["records"][0]["where"] == f"{path}: record 1"
    assert "decode_timeout" in written["reasons"]


def test_an_abandoned_slow_decode_stops_at_its_next_packet(tmp_path):
    clip = make_clip(tmp_path / "long.mp4", 400, size=(192, 256))
    every_frame = SamplingSpec(max_frames=400)
    full = min(_timed(lambda: read_video(clip, every_frame, num_threads=1)) for _ in range(2))
    before = set(threading.enumerate())
    start = time.monotonic()
    with pytest.raises(DecodeTimeout, match=r"long\.mp4: decoding did not finish within"):
        read_video(clip, every_frame, num_threads=1, timeout=full / 20)
    (abandoned,) = [t for t in threading.enumerate() if t not in before and t.name.startswith("lmms-video")]
    abandoned.join(timeout=10)
    # a decode left running would take the whole read; the cancel flag stops it within a packet or so
    assert not abandoned.is_alive() and time.monotonic() - start < full / 2


def _timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def test_a_blocked_read_raises_under_on_bad_record_raise(tok, videos, fifo, tmp_path):
    path = write(tmp_path, [qa(fifo), qa(videos / "a.mp4")])
    ds = build_dataset({"data_path": path, "decode_timeout": TIMEOUT}, tok, INFO)
    start = time.monotonic()
    with pytest.raises(BadRecordError) as info:
        ds[0]
    assert time.monotonic() - start < WITHIN
    assert info.value.reason == "decode_timeout" and str(fifo) in str(info.value)
    assert "record 0" in str(info.value) and "decode_timeout=0.5" in str(info.value)


def test_a_blocked_read_in_a_dataloader_worker_reaches_the_main_report(tok, videos, fifo, tmp_path):
    path = write(tmp_path, [qa(videos / "a.mp4"), qa(fifo), qa(videos / "b.mp4")])
    ds = build_dataset({"data_path": path, "on_bad_record": "skip", "decode_timeout": TIMEOUT, "max_frames": 2,
                        "decode_threads": 1}, tok, INFO)
    loader = DataLoader(ds, batch_size=1, shuffle=False, num_workers=1, collate_fn=lambda s: s[0]["index"])
    start = time.monotonic()
    served = list(loader)
    assert time.monotonic() - start < 2 * WITHIN  # worker start-up included
    assert served == [0, 2, 2]
    report = ds.bad_record_report()  # the worker's finding, through the shared-memory table
    assert report.counts == {"decode_timeout": 1}
    assert [(e["where"], e["video"]) for e in report.records] == [(f"{path}: record 1", str(fifo))]
    written = json.loads(ds.write_report(tmp_path / "bad_records.json").read_text())
    assert [(e["reason"], e["video"]) for e in written["records"]] == [("decode_timeout", str(fifo))]


def test_the_json_report_lists_every_failed_record(tok, videos, tmp_path):
    records = [qa(videos / "broken.mp4", f"Q{i}?") for i in range(5)] + [qa(videos / "a.mp4")]
    records.insert(2, qa(videos / "gone.mp4"))  # invalid when parsed (missing_video)
    path = write(tmp_path, records)
    ds = build_dataset({"data_path": path, "on_bad_record": "skip", "max_frames": 2}, tok, INFO)
    assert [ds[i]["index"] for i in range(len(ds))] == [6] * 7
    written = json.loads(ds.write_report(tmp_path / "report.json").read_text())
    assert written["counts"] == {"broken_video": 5, "missing_video": 1} and written["num_records"] == 7
    wheres = [(e["reason"], e["where"]) for e in written["records"]]
    assert wheres == [("broken_video", f"{path}: record {i}") if i != 2 else ("missing_video", f"{path}: record 2")
                      for i in range(6)]
    assert [e["video"] for e in written["records"]] == [str(videos / "broken.mp4")] * 2 + [None] + \
        [str(videos / "broken.mp4")] * 3
    assert "gone.mp4" in written["records"][2]["message"]
    assert written["sources"] == [{"name": "data.json", "path": str(path), "data_type": "json",
                                   "sampling_strategy": "all", "records_in_file": 7, "selected": 7, "skipped": 6,
                                   "skipped_by_reason": {"broken_video": 5, "missing_video": 1}}]
    assert len(ds.bad_record_report().examples["broken_video"]) == 3  # the log keeps three examples


@pytest.mark.parametrize("num_workers", [0, 1])
def test_exceeding_the_error_budget_stops_with_a_clear_error(tok, videos, tmp_path, num_workers):
    records = [qa(videos / "a.mp4"), qa(videos / "broken.mp4"), qa(videos / "b.mp4"), qa(videos / "gone.mp4"),
               qa(None, "Hi?", "Hello.")]
    path = write(tmp_path, records)
    config = {"data_path": path, "on_bad_record": "skip", "max_frames": 2, "check_records": "at_start"}
    # 1 of 5 found bad while checking: 20% > 10% -> the build itself fails
    with pytest.raises(BadRecordBudgetError, match=r"1 of 5 records are bad \(20\.00%\), more than "
                                                   r"dataset_config\.max_bad_fraction=0\.1 allows"):
        build_dataset(config | {"max_bad_fraction": 0.1}, tok, INFO)
    ds = build_dataset(config | {"max_bad_fraction": 0.3}, tok, INFO)
    assert ds[0]["index"] == 0
    loader = DataLoader(ds, batch_size=1, num_workers=num_workers, collate_fn=lambda s: s[0]["index"])
    with pytest.raises(BadRecordBudgetError) as info:
        list(loader)  # record 1's broken video makes it 2 of 5: 40% > 30%
    message = str(info.value)
    assert "2 of 5 records are bad (40.00%)" in message and "max_bad_fraction=0.3" in message
    assert "broken_video: 1" in message and "missing_video: 1" in message and "broken.mp4" in message


def test_over_long_records_do_not_count_against_the_budget(tok, videos, tmp_path):
    records = [qa(videos / "a.mp4", "Q " * 40), qa(None, "Hi?", "Hello.")]
    path = write(tmp_path, records)
    ds = build_dataset({"data_path": path, "max_frames": 2, "max_length": 40, "truncation": "drop",
                        "max_bad_fraction": 0.0}, tok, INFO)
    assert ds[0]["index"] == 1
    assert ds.bad_record_report().counts == {"too_long": 1}


def test_config_checks(tok, videos, tmp_path):
    path = write(tmp_path, [qa(videos / "a.mp4")])
    with pytest.raises(ConfigError, match=r"decode_timeout must be a number of seconds > 0, or null"):
        build_dataset({"data_path": path, "decode_timeout": 0}, tok, INFO)
    with pytest.raises(ConfigError, match=r"max_bad_fraction must be between 0 and 1 .* got 1\.5"):
        build_dataset({"data_path": path, "max_bad_fraction": 1.5}, tok, INFO)
    with pytest.raises(ConfigError, match=r"unknown key 'decode_timout' \(did you mean 'decode_timeout'\?\)"):
        build_dataset({"data_path": path, "decode_timout": 5}, tok, INFO)
    ds = build_dataset({"data_path": path, "decode_timeout": None}, tok, INFO)  # no limit: the direct path
    assert ds.config.decode_timeout is None and ds[0]["video_num_frames"] == 8
