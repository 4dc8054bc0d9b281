"""The generated demo dataset: deterministic, balanced, valid records, and clips that show the answer."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lmms_engine.data.dataset import load_records
from lmms_engine.data.demo import COLORS, DEFAULT_QUESTION_TYPES, MOTION_QUESTION_TYPES, generate_demo_dataset, main, make_sample

NUM_TRAIN, NUM_EVAL = 24, 8


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return generate_demo_dataset(tmp_path_factory.mktemp("demo"), NUM_TRAIN, NUM_EVAL, seed=5,
                                 question_types=MOTION_QUESTION_TYPES, progress=False)


def test_same_seed_same_bytes_other_seed_other_data(tmp_path, demo):
    again = generate_demo_dataset(tmp_path / "again", NUM_TRAIN, NUM_EVAL, seed=5, question_types=MOTION_QUESTION_TYPES,
                                  progress=False)
    for split in ("train.json", "eval.json"):
        assert (tmp_path / "again" / split).read_bytes() == (demo.train_path.parent / split).read_bytes()
    for name in ("train_00000.mp4", "train_00023.mp4", "eval_00007.mp4"):
        assert (again.video_folder / name).read_bytes() == (demo.video_folder / name).read_bytes()
    other = [make_sample("train", i, seed=6, question_types=MOTION_QUESTION_TYPES)[1:3] for i in range(8)]
    assert other != [make_sample("train", i, seed=5, question_types=MOTION_QUESTION_TYPES)[1:3] for i in range(8)]


def test_cli_writes_the_dataset(tmp_path, capsys, monkeypatch):
    assert main(["--out", str(tmp_path), "--seed", "5", "--num-train", "4", "--num-eval", "0"]) == 0
    err = capsys.readouterr().err
    assert "demo dataset: 4/4 clips written" in err
    records = json.loads((tmp_path / "train.json").read_text())
    reference = json.loads(Path(generate_demo_dataset(tmp_path / "ref", 4, 0, seed=5, progress=False)
                                .train_path).read_text())
    assert records == reference and json.loads((tmp_path / "eval.json").read_text()) == []
    assert main(["--out", str(tmp_path / "dir"), "--num-train", "8", "--num-eval", "0", "--quiet",
                 "--question-types", "direction"]) == 0
    records = json.loads((tmp_path / "dir" / "train.json").read_text())
    assert [r["question_type"] for r in records] == ["direction"] * 8
    assert Counter(r["answer"] for r in records) == {"left": 2, "right": 2, "up": 2, "down": 2}
    monkeypatch.chdir(tmp_path)  # no --out: output/demo under the current folder
    assert main(["--num-train", "2", "--num-eval", "0", "--quiet", "--question-types", "color_change"]) == 0
    assert len(json.loads((tmp_path / "output" / "demo" / "train.json").read_text())) == 2
    with pytest.raises(ValueError, match="question_types must be distinct names among direction"):
        generate_demo_dataset(tmp_path / "bad", 1, 0, question_types=["spin"])


def test_records_are_valid_balanced_and_held_out(demo):
    train, total, failures = load_records(demo.train_path)
    assert total == NUM_TRAIN and not failures
    raw = json.loads(demo.train_path.read_text())
    types = Counter(r["question_type"] for r in raw)
    assert types == {t: NUM_TRAIN // 4 for t in MOTION_QUESTION_TYPES}
    for qtype in MOTION_QUESTION_TYPES:
        answers = Counter(r["answer"] for r in raw if r["question_type"] == qtype)
        assert max(answers.values()) - min(answers.values()) <= 1, (qtype, answers)
        assert len(answers) == (4 if qtype == "direction" else len(COLORS))
    for r in raw:
        assert r["answer"] in r["options"] and r["conversations"][1]["value"] == r["answer"]
        assert r["conversations"][0]["value"].startswith("<video>\n")
    eval_raw = json.loads(demo.eval_path.read_text())
    assert len(eval_raw) == NUM_EVAL and {r["video"] for r in eval_raw}.isdisjoint({r["video"] for r in raw})
    train_frames = {make_sample("train", i, 5, question_types=MOTION_QUESTION_TYPES)[0][0].tobytes()
                    for i in range(NUM_EVAL)}
    assert not train_frames & {make_sample("eval", i, 5, question_types=MOTION_QUESTION_TYPES)[0][0].tobytes()
                               for i in range(NUM_EVAL)}


def _color_masks(frames: np.ndarray) -> dict[str, np.ndarray]:
    """[T, H, W] masks of pixels near each palette colour (decoded frames [T, 3, H, W])."""
    pixels = frames.transpose(0, 2, 3, 1).astype(np.float32)
    return {name: np.linalg.norm(pixels - np.array(rgb, np.float32), axis=-1) < 60 for name, rgb in COLORS.items()}


def _centroids(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.mgrid[0:mask.shape[1], 0:mask.shape[2]]
    area = mask.sum(axis=(1, 2))
    assert (area > 10).all(), "shape not visible on every frame"
    return np.stack([(xs * mask).sum(axis=(1, 2)) / area, (ys * mask).sum(axis=(1, 2)) / area], axis=1)


def test_decoded_clips_show_the_answer(demo):
    """Decode each clip through the engine's loader and read the answer off the pixels."""
    from lmms_engine.models.video_frame_utils import MultiScaleVideoFrameLoader

    loader = MultiScaleVideoFrameLoader()
    raw = json.loads(demo.train_path.read_text())
    for record in raw[:12]:
        video = loader.load_video(str(demo.train_path.parent / record["video"]), max_frames=16)
        assert video.frames.shape == (16, 3, 64, 64)
        masks = _color_masks(video.frames.numpy())
        question, answer = record["conversations"][0]["value"], record["answer"]
        qtype = record["question_type"]
        if qtype == "direction":
            color = question.split("does the ")[1].split()[0]
            c = _centroids(masks[color])
            dx, dy = c[-1] - c[0]
            moved = {"left": -dx, "right": dx, "up": -dy, "down": dy}
            assert moved[answer] > 15 and max(abs(dx), abs(dy)) == moved[answer], (record["id"], dx, dy)
        elif qtype == "which_moves":
            for color in record["options"]:
                c = _centroids(masks[color])
                travel = np.abs(c[-1] - c[0]).max()
                assert (travel > 15) if color == answer else (travel < 1), (record["id"], color, travel)
        elif qtype == "order":
            first_seen = {c: int(np.argmax(masks[c].sum(axis=(1, 2)) > 10)) for c in record["options"]}
            order = sorted(first_seen, key=first_seen.get)
            assert len(set(first_seen.values())) == 3
            assert answer == (order[0] if "appears first" in question else order[-1]), (record["id"], first_seen)
        else:  # next_color: read the colour of every frame, find the cycle, continue it
            seq = [max(record["options"], key=lambda c: masks[c][t].sum()) for t in range(16)]
            phases = [c for i, c in enumerate(seq) if i == 0 or seq[i - 1] != c]
            cycle = phases[-3:]
            assert len(set(cycle)) == 3 and answer == cycle[0], (record["id"], seq)


def test_color_change_clips_change_colour_once_and_answer_the_asked_end(tmp_path):
    from lmms_engine.models.video_frame_utils import MultiScaleVideoFrameLoader

    demo = generate_demo_dataset(tmp_path, 12, 0, seed=3, question_types=["color_change"], progress=False)
    raw = json.loads(demo.train_path.read_text())
    # 6 colours x {start, end}: every colour asked once at each end
    assert Counter((r["answer"], "start" in r["conversations"][0]["value"]) for r in raw) == \
        {(c, at_start): 1 for c in COLORS for at_start in (True, False)}
    loader = MultiScaleVideoFrameLoader()
    for record in raw:
        masks = _color_masks(loader.load_video(str(tmp_path / record["video"]), max_frames=16).frames.numpy())
        seq = [max(COLORS, key=lambda c: masks[c][t].sum()) for t in range(16)]
        changes = [t for t in range(1, 16) if seq[t] != seq[t - 1]]
        assert len(changes) == 1 and 5 <= changes[0] <= 11, (record["id"], seq)
        question = record["conversations"][0]["value"]
        assert record["answer"] == (seq[0] if "at the start" in question else seq[-1]), (record["id"], seq)
        assert record["options"] == list(COLORS)


def test_flash_is_the_default_and_its_clips_show_the_answer_on_half_the_frames(tmp_path):
    """The quickstart's task: one shape on screen for 8 of 16 frames (never the first), on 4 of the 8
    frames the loader samples; the answer is its colour, every colour equally often."""
    from lmms_engine.models.video_frame_utils import MultiScaleVideoFrameLoader

    assert DEFAULT_QUESTION_TYPES == ("flash",)
    demo = generate_demo_dataset(tmp_path, 12, 0, seed=2, progress=False)
    raw = json.loads(demo.train_path.read_text())
    assert Counter(r["answer"] for r in raw) == {c: 2 for c in COLORS}
    assert {r["question_type"] for r in raw} == {"flash"} and all(r["options"] == list(COLORS) for r in raw)
    loader = MultiScaleVideoFrameLoader()
    for record in raw:
        path = str(tmp_path / record["video"])
        masks = _color_masks(loader.load_video(path, max_frames=16).frames.numpy())
        seen = [t for t in range(16) if masks[record["answer"]][t].sum() > 10]
        assert len(seen) == 8 and seen == list(range(seen[0], seen[0] + 8)) and seen[0] >= 2, (record["id"], seen)
        others = [c for c in COLORS if c != record["answer"]]
        assert all(masks[c].sum() < 10 for c in others), record["id"]
        sampled = loader.load_video(path, max_frames=8).frame_indices
        assert sum(t in seen for t in sampled) == 4, (record["id"], sampled)
