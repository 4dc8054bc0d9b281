"""The generated demo dataset: short clips of coloured shapes, with questions only motion can answer.

``python -m lmms_engine.data.demo --out DIR --seed S [--num-train N] [--num-eval M]`` writes::

    DIR/train.json   LLaVA records: conversations, video, id, question_type, answer, options
    DIR/eval.json    the held-out split (clips drawn from a different random stream)
    DIR/videos/{train,eval}_00000.mp4 ...   H.264, 64x64, 16 frames at 4 fps by default

Question types (``question_type``), cycled in turn so each has an equal share of a split
(``--question-types`` picks a subset), each with a balanced answer distribution (every answer equally
often, up to one):

- ``direction``: "In which direction does the red circle move?" (left/right/up/down, chance 1/4). A
  second shape of another colour moves another way or stays still, so the colour must be bound to the
  motion; any single frame is ambiguous.
- ``order``: three shapes appear one after another and stay; "Which colour appears first?" (or last;
  chance 1/3). Appearances are at least 3 frames apart.
- ``next_color``: one shape cycles through three colours, each held 3 or 4 frames; "Which colour comes
  next?" (chance 1/3; never the colour on screen at the end, so 1/2 for a model that knows only that).
- ``which_moves``: three shapes, exactly one moves; "Which colour is the shape that moves?" (chance 1/3).

Answers are one word; ``options`` lists the choices. Everything is a function of ``seed``: the same
seed gives byte-identical JSON and identical frames.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from lmms_engine.video.encode import write_video

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 40, 40),
    "green": (40, 195, 60),
    "blue": (50, 90, 245),
    "yellow": (235, 215, 40),
    "magenta": (215, 55, 215),
    "cyan": (40, 205, 215),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
QUESTION_TYPES: tuple[str, ...] = ("direction", "order", "next_color", "which_moves")
BACKGROUND = 24
_SPLIT_CODES = {"train": 0, "eval": 1}


@dataclass
class _Shape:
    color: str
    kind: str
    radius: float
    start: tuple[float, float]  # (x, y) centre at frame 0
    velocity: tuple[float, float] = (0.0, 0.0)  # pixels per frame
    appear: int = 0  # first frame on screen
    colors: tuple[str, ...] = ()  # colour cycle (next_color), else empty
    period: int = 0
    first_phase: int = 0  # frames of the first colour phase

    def center(self, t: int) -> tuple[float, float]:
        return self.start[0] + self.velocity[0] * t, self.start[1] + self.velocity[1] * t

    def color_at(self, t: int) -> str:
        if not self.colors:
            return self.color
        if t < self.first_phase:
            return self.colors[0]
        return self.colors[(1 + (t - self.first_phase) // self.period) % len(self.colors)]


def _mask(kind: str, cx: float, cy: float, r: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    dx, dy = xs - cx, ys - cy
    if kind == "circle":
        return dx * dx + dy * dy <= r * r
    if kind == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)  # triangle, apex up


def render_clip(shapes: Sequence[_Shape], num_frames: int, size: int) -> list[np.ndarray]:
    """Frames ``[size, size, 3]`` uint8 of the shapes over a dark background (later shapes on top)."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    frames = []
    for t in range(num_frames):
        frame = np.full((size, size, 3), BACKGROUND, dtype=np.uint8)
        for shape in shapes:
            if t < shape.appear:
                continue
            cx, cy = shape.center(t)
            frame[_mask(shape.kind, cx, cy, shape.radius, xs, ys)] = COLORS[shape.color_at(t)]
        frames.append(frame)
    return frames


class _Scene:
    """Random placement of shapes that never overlap on any frame."""

    def __init__(self, rng: np.random.Generator, size: int, num_frames: int) -> None:
        self.rng, self.size, self.num_frames = rng, size, num_frames
        self.tracks: list[tuple[np.ndarray, float]] = []  # ([num_frames, 2] centres, radius)

    def radius(self) -> float:
        return float(self.rng.uniform(0.10, 0.13) * self.size)

    def place(self, r: float, direction: str | None = None) -> tuple[tuple[float, float], tuple[float, float]]:
        """A start centre and a per-frame velocity (zero without ``direction``) whose path stays inside."""
        lo, hi = r + 1, self.size - 2 - r
        steps = self.num_frames - 1
        t = np.arange(self.num_frames, dtype=np.float64)[:, None]
        for _ in range(1000):
            if direction is None:
                velocity = (0.0, 0.0)
            else:
                travel = float(self.rng.uniform(0.3, 0.45) * self.size)
                ux, uy = DIRECTIONS[direction]
                velocity = (ux * travel / steps, uy * travel / steps)
            x = float(self.rng.uniform(lo, hi))
            y = float(self.rng.uniform(lo, hi))
            end = (x + velocity[0] * steps, y + velocity[1] * steps)
            if not (lo <= end[0] <= hi and lo <= end[1] <= hi):
                continue
            track = np.array([x, y]) + t * np.array(velocity)
            if all(np.min(np.linalg.norm(track - other, axis=1)) >= r + other_r + 2 for other, other_r in self.tracks):
                self.tracks.append((track, r))
                return (x, y), velocity
        raise RuntimeError("could not place a shape without overlap; use a larger frame size")


def _options_text(options: Sequence[str]) -> str:
    return ", ".join(options)


def _direction(rng: np.random.Generator, answer: int, size: int, num_frames: int):
    names = list(DIRECTIONS)
    direction = names[answer % 4]
    scene = _Scene(rng, size, num_frames)
    target_color, other_color = rng.choice(list(COLORS), size=2, replace=False)
    kind = str(rng.choice(SHAPES))
    r = scene.radius()
    start, velocity = scene.place(r, direction)
    target = _Shape(str(target_color), kind, r, start, velocity)
    other_dir = None if rng.random() < 0.4 else str(rng.choice([d for d in names if d != direction]))
    r2 = scene.radius()
    start2, velocity2 = scene.place(r2, other_dir)
    other = _Shape(str(other_color), str(rng.choice(SHAPES)), r2, start2, velocity2)
    question = (f"In which direction does the {target.color} {kind} move? "
                f"Options: {_options_text(names)}. Answer with one word.")
    return [target, other], question, direction, names


def _order(rng: np.random.Generator, answer: int, size: int, num_frames: int):
    colors = [str(c) for c in rng.choice(list(COLORS), size=3, replace=False)]
    ask_first = bool(rng.random() < 0.5)
    # The asked-for colour cycles through the palette so answers are balanced.
    asked = list(COLORS)[answer % len(COLORS)]
    if asked not in colors:
        colors[0] = asked
    others = [c for c in colors if c != asked]
    rng.shuffle(others)
    appear_order = [asked] + others if ask_first else others + [asked]
    # Appearance frames at least 3 apart (never between two sampled frames of an 8-of-16 sampling), the
    # last one at least 2 frames before the end so it stays on screen.
    while True:
        times = sorted(int(t) for t in rng.choice(num_frames - 2, size=3, replace=False))
        if times[1] - times[0] >= 3 and times[2] - times[1] >= 3:
            break
    scene = _Scene(rng, size, num_frames)
    shapes = []
    for color, appear in zip(appear_order, times):
        r = scene.radius()
        start, velocity = scene.place(r)
        shapes.append(_Shape(color, str(rng.choice(SHAPES)), r, start, velocity, appear=appear))
    options = list(colors)
    rng.shuffle(options)
    word = "first" if ask_first else "last"
    question = (f"Three shapes appear one after another. Which colour appears {word}? "
                f"Options: {_options_text(options)}. Answer with one word.")
    return shapes, question, asked, options


def _next_color(rng: np.random.Generator, answer: int, size: int, num_frames: int):
    answer_color = list(COLORS)[answer % len(COLORS)]
    others = [str(c) for c in rng.choice([c for c in COLORS if c != answer_color], size=2, replace=False)]
    period = int(rng.choice([3, 4]))
    first_phase = (num_frames - 1) % period + 1  # the clip ends exactly at the end of a phase
    phases = 1 + (num_frames - first_phase) // period
    # `others` is already in random order; the cycle starts at the answer (shown after the last phase).
    cycle = [answer_color] + others
    # Phase k shows cycle[(offset + k) % 3]; the next phase (index `phases`) must show cycle[0].
    offset = (-phases) % 3
    colors = tuple(cycle[(offset + k) % 3] for k in range(3))
    scene = _Scene(rng, size, num_frames)
    r = scene.radius() * 1.2
    start, velocity = scene.place(r)
    kind = str(rng.choice(SHAPES))
    shape = _Shape(colors[0], kind, r, start, velocity, colors=colors, period=period, first_phase=first_phase)
    options = list(cycle)
    rng.shuffle(options)
    question = (f"The {kind} changes colour in a repeating cycle. Which colour comes next? "
                f"Options: {_options_text(options)}. Answer with one word.")
    return [shape], question, answer_color, options


def _which_moves(rng: np.random.Generator, answer: int, size: int, num_frames: int):
    mover = list(COLORS)[answer % len(COLORS)]
    others = [str(c) for c in rng.choice([c for c in COLORS if c != mover], size=2, replace=False)]
    scene = _Scene(rng, size, num_frames)
    shapes = []
    for color in [mover] + others:
        r = scene.radius()
        direction = str(rng.choice(list(DIRECTIONS))) if color == mover else None
        start, velocity = scene.place(r, direction)
        shapes.append(_Shape(color, str(rng.choice(SHAPES)), r, start, velocity))
    options = [mover] + others
    rng.shuffle(options)
    question = (f"Which colour is the shape that moves? Options: {_options_text(options)}. "
                "Answer with one word.")
    return shapes, question, mover, options


_GENERATORS: dict[str, Callable] = {
    "direction": _direction, "order": _order, "next_color": _next_color, "which_moves": _which_moves,
}


def _check_question_types(question_types: Sequence[str]) -> tuple[str, ...]:
    types = tuple(question_types)
    unknown = [t for t in types if t not in QUESTION_TYPES]
    if not types or unknown or len(set(types)) != len(types):
        raise ValueError(f"question_types must be distinct names among {', '.join(QUESTION_TYPES)}; got {list(types)}")
    return types


def make_sample(split: str, index: int, seed: int, num_frames: int = 16, size: int = 64,
                question_types: Sequence[str] = QUESTION_TYPES):
    """Frames, question, answer, options and question type of sample ``index`` of ``split``.

    Sample ``i`` is question type ``question_types[i % k]`` (``k`` types); its answer is the
    ``(i // k)``-th of that type's answers in turn, so answers are balanced. The randomness comes from
    ``(seed, split, index)`` alone.
    """
    types = _check_question_types(question_types)
    qtype = types[index % len(types)]
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
    shapes, question, answer, options = _GENERATORS[qtype](rng, index // len(types), size, num_frames)
    return render_clip(shapes, num_frames, size), question, answer, list(options), qtype


@dataclass(frozen=True)
class DemoDataset:
    """Paths written by :func:`generate_demo_dataset`."""

    train_path: Path
    eval_path: Path
    video_folder: Path
    num_train: int
    num_eval: int


def generate_demo_dataset(
    out_dir: str | Path,
    num_train: int = 800,
    num_eval: int = 200,
    seed: int = 0,
    *,
    num_frames: int = 16,
    size: int = 64,
    fps: float = 4.0,
    question_types: Sequence[str] = QUESTION_TYPES,
    progress: bool = True,
) -> DemoDataset:
    """Write the demo dataset (module docstring) to ``out_dir`` and return its paths.

    ``size`` must be even (H.264 with 4:2:0 chroma) and >= 32; ``num_frames`` >= 12 (three appearances
    at least 3 frames apart, and a full colour cycle). ``question_types``: a subset of
    :data:`QUESTION_TYPES` (e.g. only ``direction`` for an easier task). Progress goes to stderr every 10%.
    """
    question_types = _check_question_types(question_types)
    if size % 2 or size < 32:
        raise ValueError(f"size must be even and >= 32, got {size}")
    if num_frames < 12:
        raise ValueError(f"num_frames must be >= 12, got {num_frames}")
    if num_train < 0 or num_eval < 0 or num_train + num_eval == 0:
        raise ValueError(f"need num_train, num_eval >= 0 and at least one sample, got {num_train}, {num_eval}")
    out = Path(out_dir)
    videos = out / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    total, done = num_train + num_eval, 0
    step = max(1, total // 10)
    paths = {}
    for split, count in (("train", num_train), ("eval", num_eval)):
        records = []
        for i in range(count):
            frames, question, answer, options, qtype = make_sample(split, i, seed, num_frames, size, question_types)
            name = f"{split}_{i:05d}.mp4"
            write_video(videos / name, frames, fps=fps, crf=12)
            records.append({
                "id": f"{split}_{i:05d}",
                "video": f"videos/{name}",
                "conversations": [
                    {"from": "human", "value": f"<video>\n{question}"},
                    {"from": "gpt", "value": answer},
                ],
                "question_type": qtype,
                "answer": answer,
                "options": options,
            })
            done += 1
            if progress and (done % step == 0 or done == total):
                print(f"demo dataset: {done}/{total} clips written", file=sys.stderr, flush=True)
        paths[split] = out / f"{split}.json"
        paths[split].write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    return DemoDataset(paths["train"], paths["eval"], videos, num_train, num_eval)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lmms_engine.data.demo",
        description="Generate the demo video QA dataset (moving coloured shapes; answers need the motion).")
    parser.add_argument("--out", required=True, help="output folder (train.json, eval.json, videos/)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files (default 0)")
    parser.add_argument("--num-train", type=int, default=800, help="training samples (default 800)")
    parser.add_argument("--num-eval", type=int, default=200, help="held-out samples (default 200)")
    parser.add_argument("--num-frames", type=int, default=16, help="frames per clip (default 16)")
    parser.add_argument("--size", type=int, default=64, help="frame width and height in pixels (default 64)")
    parser.add_argument("--fps", type=float, default=4.0, help="clip frame rate (default 4)")
    parser.add_argument("--question-types", default=",".join(QUESTION_TYPES),
                        help=f"comma-separated subset of {','.join(QUESTION_TYPES)} (default: all)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    try:
        result = generate_demo_dataset(args.out, args.num_train, args.num_eval, args.seed,
                                       num_frames=args.num_frames, size=args.size, fps=args.fps,
                                       question_types=[t.strip() for t in args.question_types.split(",")],
                                       progress=not args.quiet)
    except ValueError as err:
        parser.error(str(err))
    print(f"wrote {result.num_train} training and {result.num_eval} held-out samples: "
          f"{result.train_path}, {result.eval_path}, videos in {result.video_folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["COLORS", "DIRECTIONS", "QUESTION_TYPES", "DemoDataset", "generate_demo_dataset", "make_sample",
           "render_clip"]
