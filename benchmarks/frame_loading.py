"""Frame-loading benchmark: sampling 8 and 32 frames at 384x384 from H.264 clips.

Loaders compared in one run, median wall time of ``--repeats`` runs per cell (each run opens the file
afresh, as a data loader does per sample):

- ``ours``: ``MultiScaleVideoFrameLoader.load_video`` (GOP-planned PyAV decode, resize in FFmpeg);
- ``decord``: ``decord.VideoReader(path, width=384, height=384).get_batch(indices)`` (LLaVA-NeXT's loader);
- ``pyav seek``: naive PyAV, one seek to the keyframe before each target, decode forward to it;
- ``pyav all``: naive PyAV, decode every frame, keep the targets.

Every loader gets the same frame indices (ours' uniform plan) and the result is checked against
ours, so a fast wrong answer cannot win. Process CPU time (all threads) is reported beside wall time:
on a shared machine it is the steadier figure, and a probe (one thread of numpy work, timed before
and after) says what share of a core a single thread got during the run. Clips are generated once
into ``benchmarks/_cache/``:

- ``long``: 60 s, 1280x720, 30 fps, x264's default keyframe interval (250 frames);
- ``dense``: 10 s, 1280x720, 30 fps, a keyframe every 10 frames.

Both show a panning noise texture under moving gradients and blocks plus fresh per-frame grain, so the
decoder does realistic work (several Mbit/s at crf 23).

Run: ``python benchmarks/frame_loading.py [--repeats 5]``; the table goes to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine_line, write_section  # noqa: E402

CACHE = Path(__file__).resolve().parent / "_cache"
SIZE = (384, 384)
COUNTS = (8, 32)
CLIPS = {  # name: (seconds, keyframe interval)
    "long": (60, 250),
    "dense": (10, 10),
}
FPS = 30
WIDTH, HEIGHT = 1280, 720


def synthetic_frames(num_frames: int, seed: int = 0) -> Iterator[np.ndarray]:
    """``num_frames`` RGB frames ``[720, 1280, 3]`` uint8: panning texture, moving shapes, grain."""
    rng = np.random.default_rng(seed)
    # Low-pass noise texture wider than the frame, panned a few pixels per frame.
    coarse = rng.integers(0, 256, (HEIGHT // 8 + 1, (WIDTH * 2) // 8 + 1, 3), dtype=np.uint8)
    texture = np.repeat(np.repeat(coarse, 8, axis=0), 8, axis=1)[:HEIGHT].astype(np.int16)
    texture = (texture + rng.integers(-24, 25, texture.shape, dtype=np.int16)) // 2
    grain = [rng.integers(-6, 7, (HEIGHT, WIDTH, 3), dtype=np.int16) for _ in range(7)]
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH]
    for t in range(num_frames):
        shift = (3 * t) % (texture.shape[1] - WIDTH)
        frame = texture[:, shift:shift + WIDTH].copy()
        frame[..., 0] += ((xs + 5 * t) % 256 // 2).astype(np.int16)
        frame[..., 2] += ((ys + 3 * t) % 256 // 2).astype(np.int16)
        for k in range(3):
            cx = int((WIDTH - 200) * (0.5 + 0.5 * np.sin(0.02 * t * (k + 1) + k)))
            cy = int((HEIGHT - 160) * (0.5 + 0.5 * np.cos(0.015 * t * (k + 2) + 2 * k)))
            frame[cy:cy + 160, cx:cx + 200] = (60 + 60 * k, 200 - 50 * k, 40 + 90 * k)
        frame += grain[t % len(grain)]
        yield np.clip(frame, 0, 255).astype(np.uint8)


def clip_path(name: str) -> Path:
    """Path of a benchmark clip, encoding it first when it is not cached."""
    from lmms_engine.video.encode import write_video

    seconds, keyint = CLIPS[name]
    path = CACHE / f"{name}_{seconds}s_{WIDTH}x{HEIGHT}_g{keyint}.mp4"
    if not path.exists():
        print(f"encoding {path.name} ...", flush=True)
        tmp = path.with_suffix(".tmp.mp4")
        write_video(tmp, synthetic_frames(seconds * FPS), fps=FPS, keyframe_interval=keyint)
        tmp.rename(path)
    return path


def load_ours(path: Path, indices: list[int]) -> np.ndarray:
    from lmms_engine.models.video_frame_utils import MultiScaleVideoFrameLoader

    video = MultiScaleVideoFrameLoader().load_video(path, max_frames=len(indices), target_size=SIZE)
    assert video.frame_indices == indices
    return video.frames.permute(0, 2, 3, 1).numpy()


def load_decord(path: Path, indices: list[int]) -> np.ndarray:
    import decord

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), width=SIZE[1], height=SIZE[0])
    return reader.get_batch(indices).asnumpy()


def _open_pyav(path: Path):
    import av

    container = av.open(str(path))
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return container, stream


def _to_rgb(frame) -> np.ndarray:
    return frame.to_ndarray(format="rgb24", width=SIZE[1], height=SIZE[0])


def load_pyav_seek(path: Path, indices: list[int]) -> np.ndarray:
    """Naive: for each target, seek to the keyframe before its time and decode forward to it."""
    container, stream = _open_pyav(path)
    rate, tb = stream.average_rate, stream.time_base
    start = stream.start_time or 0
    out = []
    with container:
        for index in indices:
            target = start + int(round(index / rate / tb))
            container.seek(target, stream=stream, backward=True)
            for frame in container.decode(stream):
                if frame.pts >= target:
                    out.append(_to_rgb(frame))
                    break
    return np.stack(out)


def load_pyav_all(path: Path, indices: list[int]) -> np.ndarray:
    """Naive: decode every frame in order, convert the targets."""
    container, stream = _open_pyav(path)
    wanted = set(indices)
    kept = {}
    with container:
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                kept[i] = _to_rgb(frame)
            if i >= indices[-1]:
                break
    return np.stack([kept[i] for i in indices])


LOADERS: dict[str, Callable[[Path, list[int]], np.ndarray]] = {
    "ours": load_ours,
    "decord": load_decord,
    "pyav_seek": load_pyav_seek,
    "pyav_all": load_pyav_all,
}


def same_frames(a: np.ndarray, b: np.ndarray) -> bool:
    """Same frames up to the scaler's rounding: neighbouring frames of these clips differ far more."""
    if a.shape != b.shape:
        return False
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16)).reshape(len(a), -1).mean(axis=1)
    return bool((diff < 4.0).all())


FOOTER = (
    "Where ours saves: one seek per keyframe interval holding targets (none when the next interval "
    "follows directly); packets of frames nobody asked for decoded with `skip_frame=\"NONREF\"`, so the "
    "decoder drops those no other frame references (x264's non-reference B-frames, about half of all "
    "frames) while every reference frame is decoded and the returned frames stay bit-exact; the decoder "
    "drained after an interval's last target instead of fed further packets; only the kept frames "
    "converted. \"wrong frames\" would mark a loader whose frames differ from ours by more than the "
    "scalers' rounding (mean absolute difference >= 4 levels). Run: `python benchmarks/frame_loading.py`."
)


def _cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process, FFmpeg's included
    return usage.ru_utime + usage.ru_stime


def core_share() -> float:
    """Fraction of one core a single busy thread gets right now (1.0 on an idle machine)."""
    rng = np.random.default_rng(0)
    a = rng.random((600, 600))
    c0, t0 = _cpu_seconds(), time.perf_counter()
    for _ in range(40):
        a = np.tanh(a * 1.0001)  # single-threaded numpy work (no BLAS threads involved)
    return (_cpu_seconds() - c0) / (time.perf_counter() - t0)


def run(repeats: int) -> str:
    import os

    import decord  # noqa: F401  (imported before timing)

    from lmms_engine.video.decode import read_video
    from lmms_engine.video.sampling import SamplingSpec

    load_before, share_before = os.getloadavg(), core_share()
    rows = []
    for name in CLIPS:
        path = clip_path(name)
        for count in COUNTS:
            indices = read_video(path, SamplingSpec(max_frames=count), target_size=(16, 16)).frame_indices
            reference = load_ours(path, indices)
            # One untimed warm-up run per loader (file in the page cache, lazy imports done) that also
            # checks its frames against ours.
            match = {key: same_frames(fn(path, indices), reference) for key, fn in LOADERS.items()}
            wall: dict[str, list[float]] = {k: [] for k in LOADERS}
            cpu: dict[str, list[float]] = {k: [] for k in LOADERS}
            for _ in range(repeats):  # interleaved, so drifting machine load hits every loader alike
                for key, fn in LOADERS.items():
                    c0, t0 = _cpu_seconds(), time.perf_counter()
                    fn(path, indices)
                    wall[key].append(time.perf_counter() - t0)
                    cpu[key].append(_cpu_seconds() - c0)
            med = {k: statistics.median(v) for k, v in wall.items()}
            med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
            print(name, count, {k: round(v, 3) for k, v in med.items()},
                  {k: round(v, 3) for k, v in med_cpu.items()}, match, flush=True)
            rows.append((name, count, med, med_cpu, match))
    load_after, share_after = os.getloadavg(), core_share()

    def cell(key: str, med: dict, match: dict) -> str:
        return f"{med[key]:.3f}" + ("" if match[key] else " (wrong frames)")

    lines = [
        "## Frame loading",
        "",
        f"{machine_line(('torch', 'av', 'decord'))}. Shared machine: load average (1 min) before / after "
        f"the run {load_before[0]:.1f} / {load_after[0]:.1f}; one busy thread got {share_before:.0%} / "
        f"{share_after:.0%} of a core.",
        "",
        f"Sampling N uniformly spread frames (the same indices for every loader) resized to {SIZE[0]}x{SIZE[1]} "
        f"in the decoder; median wall seconds of {repeats} runs, loaders interleaved in one run, each run "
        "opening the file afresh (decoder threads: FFmpeg's default for all). Clips: `long` = 60 s "
        "1280x720 30 fps H.264 (x264 default keyframe interval 250), `dense` = 10 s 1280x720 30 fps, "
        "a keyframe every 10 frames. The last two columns divide ours by decord in wall time and in CPU "
        "time (all threads of the process), the latter being the steadier figure on a busy machine.",
        "",
        "| clip | N | ours (s) | decord (s) | PyAV seek per frame (s) | PyAV decode all (s) "
        "| ours / decord | ours / decord, CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, count, med, med_cpu, match in rows:
        lines.append(f"| {name} | {count} | {cell('ours', med, match)} | {cell('decord', med, match)} | "
                     f"{cell('pyav_seek', med, match)} | {cell('pyav_all', med, match)} | "
                     f"{med['ours'] / med['decord']:.2f}x | {med_cpu['ours'] / med_cpu['decord']:.2f}x |")
    lines += [
        "",
        FOOTER,
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per cell (median reported)")
    args = parser.parse_args()
    markdown = run(args.repeats)
    print(markdown)
    print("written to", write_section("frame_loading", markdown))
