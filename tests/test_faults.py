"""Faults injected on purpose: nothing hangs and nothing is lost. A data error on one rank of a 2-rank
torchrun job ends the whole job promptly; ``load_video_frames`` takes a timeout; a bad record under
``on_bad_record: raise`` in a DataLoader worker is a ``data error:`` (exit 2) that the data report
lists; a write that fails (file-size limit, as on a full disk) never truncates the report nor hides the
first error."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from clips import make_clip
from train_support import free_port

from lmms_engine.launch.cli import main

BROKEN = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4  # an mp4 header, then junk


def records_with_a_broken_video(data_dir: Path, tmp_path: Path, count: int, bad: int) -> Path:
    records = json.loads((data_dir / "train.json").read_text())[:count]
    for record in records:
        record["video"] = str(data_dir / record["video"])
    (tmp_path / "broken.mp4").write_bytes(BROKEN)
    records[bad]["video"] = str(tmp_path / "broken.mp4")
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    return path


def sft_config(tmp_path: Path, data: Path, out: Path, **keys) -> Path:
    config = {"trainer_type": "sft", "model_config": {},
              "dataset_config": {"data_path": str(data), "max_frames": 4, "on_bad_record": "raise"},
              "output_dir": str(out), "max_steps": 2, "per_device_train_batch_size": 1, "logging_steps": 1,
              "save_strategy": "no", "report_to": "none", "disable_tqdm": True, **keys}
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps([{"type": "trainer", "config": config}]))
    return path


@pytest.mark.slow
@pytest.mark.distributed
def test_a_data_error_on_one_rank_ends_the_two_rank_job_promptly(data_dir, tmp_path):
    """Two records, one per rank at step 1, one of them unreadable: the failing rank used to wait in a
    barrier while the other waited in the step's collective, forever."""
    data = records_with_a_broken_video(data_dir, tmp_path, 2, 1)
    config = sft_config(tmp_path, data, tmp_path / "out", ddp_timeout=600)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", "-m", "lmms_engine.launch.cli", "--config", str(config)],
                          capture_output=True, text=True, timeout=240, env=env)
    seconds = time.monotonic() - start
    assert done.returncode != 0
    assert f"data error: {data}: record 1: " in done.stderr and "[broken_video]" in done.stderr, done.stderr[-3000:]
    assert seconds < 200  # the hang was unbounded; start-up of two ranks takes ~10-40 s here
    report = json.loads((tmp_path / "out" / "data_report_rank1.json").read_text()
                        if (tmp_path / "out" / "data_report_rank1.json").is_file()
                        else (tmp_path / "out" / "data_report.json").read_text())
    assert [e["where"] for e in report["records"]] == [f"{data}: record 1"]


def test_load_video_frames_takes_a_timeout(tmp_path):
    from lmms_engine.models.video_frame_utils import MultiScaleVideoFrameLoader
    from lmms_engine.video.decode import DecodeTimeout

    fifo = tmp_path / "stalled.mp4"
    os.mkfifo(fifo)
    outcome: list = []

    def read() -> None:
        try:
            MultiScaleVideoFrameLoader().load_video_frames(str(fifo), max_frames=4, timeout=0.5)
        except Exception as err:  # noqa: BLE001 - the outcome is what the test checks
            outcome.append(err)

    start = time.monotonic()
    worker = threading.Thread(target=read, daemon=True)
    worker.start()
    worker.join(20)
    try:
        assert not worker.is_alive(), "load_video_frames blocked on a FIFO despite timeout=0.5"
        assert isinstance(outcome[0], DecodeTimeout) and str(fifo) in str(outcome[0])
        assert time.monotonic() - start < 10
    finally:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK) if worker.is_alive() else None
        if fd is not None:
            os.close(fd)
    clip = make_clip(tmp_path / "a.mp4", 6)
    assert MultiScaleVideoFrameLoader().load_video_frames(str(clip), max_frames=3, timeout=30).shape[0] == 3


def test_raise_mode_in_a_dataloader_worker_is_a_data_error_the_report_lists(data_dir, tmp_path, capsys):
    data = records_with_a_broken_video(data_dir, tmp_path, 4, 2)
    out = tmp_path / "out"
    config = sft_config(tmp_path, data, out, dataloader_num_workers=1, max_steps=4)
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    message = next(line for line in err if line.startswith("data error: "))
    assert message.startswith(f"data error: {data}: record 2: cannot read video {tmp_path / 'broken.mp4'}") \
        and message.endswith("[broken_video]"), message
    assert "Traceback" not in message and "DataLoader worker" not in message
    report = json.loads((out / "data_report.json").read_text())
    assert report["num_bad"] == 1 and report["counts"] == {"broken_video": 1}
    assert [(e["where"], e["video"]) for e in report["records"]] == [(f"{data}: record 2",
                                                                     str(tmp_path / "broken.mp4"))]


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return apply


def test_a_failed_report_write_never_truncates_the_report(tmp_path):
    """The write itself fails (a real EFBIG from the kernel's file-size limit, as ENOSPC on a full disk):
    the report there before is kept whole and no partial file is left."""
    from lmms_engine.data.dataset import DatasetConfig, build_dataset
    from lmms_engine.data.preprocess import ProcessorInfo
    from lmms_engine.data.tokenizer import build_tiny_tokenizer

    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"conversations": [{"from": "human", "value": "Hi"},
                                                    {"from": "gpt", "value": "Hello."}]}, {"vidoe": 1}]))
    ds = build_dataset(DatasetConfig(data_path=str(data), on_bad_record="skip"), build_tiny_tokenizer(),
                       ProcessorInfo(image_size=32, patch_size=8))
    report = tmp_path / "out" / "data_report.json"
    ds.write_report(report)
    before = report.read_bytes()
    assert len(before) > 200
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (100, old[1]))
        with pytest.raises(OSError):
            ds.write_report(report)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, handler)
    assert report.read_bytes() == before
    assert sorted(p.name for p in report.parent.iterdir()) == ["data_report.json"]


def test_a_run_whose_writes_fail_shows_the_first_error(data_dir, tmp_path):
    """Every write past 4 KiB fails, in a real run: the error that stopped training stays the one shown
    (not the report write's), and no truncated data_report.json is left."""
    data = records_with_a_broken_video(data_dir, tmp_path, 4, 0)
    records = json.loads(data.read_text())
    missing = [dict(records[1], video=str(tmp_path / f"missing_{i:03d}.mp4")) for i in range(40)]
    data.write_text(json.dumps(records + missing))  # 40 records left out: a report well over 4 KiB
    out = tmp_path / "out"
    config = sft_config(tmp_path, data, out, save_strategy="steps", save_steps=1,
                        dataset_config={"data_path": str(data), "max_frames": 4, "on_bad_record": "skip"})
    done = subprocess.run([sys.executable, "-m", "lmms_engine.launch.cli", "--config", str(config)],
                          capture_output=True, text=True, timeout=240, preexec_fn=_limit_file_size(4096),
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert "File too large" in last and "data_report" not in last, done.stderr[-3000:]
    assert "could not write the data report into" in done.stderr
    report = out / "data_report.json"
    assert not report.exists() or json.loads(report.read_text())["num_records"] == 44  # whole, if written
    assert not list(out.glob(".data_report*"))


RANK_SCRIPT = """\
import os, sys, time
import lmms_engine.launch.cli as cli
getattr(cli, "_die_with_the_launcher", lambda: None)()  # what the CLI's main does first under torchrun
with open(os.path.join(sys.argv[1], f"pid{os.environ['RANK']}"), "w") as handle:
    handle.write(str(os.getpid()))
time.sleep(300)  # a rank stuck for good (in a collective, a blocked read, ...)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead: it only waits to be reaped
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_ranks_end_when_torchrun_is_killed(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                 f"--master_port={free_port()}", str(script), str(tmp_path)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all((tmp_path / f"pid{r}").is_file() for r in (0, 1)):
            time.sleep(0.2)
        pids = [int((tmp_path / f"pid{r}").read_text()) for r in (0, 1)]
        assert all(_alive(pid) for pid in pids)
        launcher.kill()  # SIGKILL: torchrun cannot forward anything
        launcher.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in pids), "a rank survived its launcher"
    finally:
        launcher.kill()
        for r in (0, 1):
            pid_file = tmp_path / f"pid{r}"
            if pid_file.is_file() and _alive(int(pid_file.read_text())):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
