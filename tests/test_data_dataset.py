"""VideoSFTDataset end to end on real clips: samples, truncation, bad records, DataLoader workers."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from lmms_engine.data.chat import IGNORE_INDEX
from lmms_engine.data.collator import build_collator
from lmms_engine.data.dataset import DatasetConfig, build_dataset, time_instruction
from lmms_engine.data.demo import BACKGROUND, MOTION_QUESTION_TYPES, generate_demo_dataset
from lmms_engine.data.preprocess import ProcessorInfo
from lmms_engine.data.records import BadRecordError
from lmms_engine.data.tokenizer import build_tiny_tokenizer
from lmms_engine.models.layout import VideoLayoutConfig
from lmms_engine.utils.config import ConfigError

INFO = ProcessorInfo(image_size=64, patch_size=8)  # tiny SigLIP: 8x8 patches -> 4x4 after pooling
TOKENS_8_FRAMES = 8 * 16 + 1


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    generate_demo_dataset(root, 8, 0, seed=2, question_types=MOTION_QUESTION_TYPES, progress=False)
    (root / "videos" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    return root


def write(root: Path, name: str, records: list) -> str:
    path = root / name
    path.write_text(json.dumps(records))
    return str(path)


def qa(video: str | None, *pairs: str) -> dict:
    turns = []
    for k in range(0, len(pairs), 2):
        turns += [{"from": "human", "value": pairs[k]}, {"from": "gpt", "value": pairs[k + 1]}]
    if video is not None:
        turns[0]["value"] = "<video>\n" + turns[0]["value"]
    record = {"conversations": turns}
    if video is not None:
        record["video"] = video
    return record


def labelled_text(tok, sample) -> list[str]:
    out, run = [], []
    for token, label in zip(sample["input_ids"].tolist() + [0], sample["labels"].tolist() + [IGNORE_INDEX]):
        if label != IGNORE_INDEX:
            run.append(token)
        elif run:
            out.append(tok.decode(run))
            run = []
    return out


def test_video_sample(tok, data_dir):
    ds = build_dataset({"data_path": str(data_dir / "train.json")}, tok, INFO)
    assert len(ds) == 8
    sample = ds[1]
    record = json.loads((data_dir / "train.json").read_text())[1]
    assert sample["pixel_values_videos"].shape == (8, 3, 64, 64) and sample["video_num_frames"] == 8
    assert sample["pixel_values_videos"].dtype == torch.float32
    # the background pixel, normalised with SigLIP's 0.5/0.5
    assert abs(float(sample["pixel_values_videos"][0, 0, 0, 0]) - (BACKGROUND / 255 - 0.5) / 0.5) < 0.03
    ids = sample["input_ids"].tolist()
    vid = tok.convert_tokens_to_ids("<video>")
    assert ids.count(vid) == TOKENS_8_FRAMES
    first = ids.index(vid)
    assert ids[first:first + TOKENS_8_FRAMES] == [vid] * TOKENS_8_FRAMES
    assert tok.decode(ids[:first]).endswith("<|im_start|>user\n")
    assert labelled_text(tok, sample) == [record["answer"] + "<|im_end|>"]
    assert sample["index"] == 1
    prompt = ds.generation_sample(1)
    assert tok.decode(prompt["input_ids"].tolist()).endswith("Answer with one word.<|im_end|>\n<|im_start|>assistant\n")
    assert torch.equal(prompt["input_ids"], sample["input_ids"][: len(prompt["input_ids"])])
    assert (prompt["labels"] == IGNORE_INDEX).all() and prompt["reference"] == record["answer"]
    assert prompt["metadata"] == {k: record[k] for k in ("id", "question_type", "answer", "options")}


@pytest.mark.parametrize("layout", [
    VideoLayoutConfig(mm_spatial_pool_stride=4, mm_newline_position="grid"),
    VideoLayoutConfig(mm_spatial_pool_mode="average", add_faster_video=True, faster_token_stride=3),
])
def test_video_tokens_follow_the_layout_and_frame_count(tok, data_dir, layout):
    info = ProcessorInfo(image_size=64, patch_size=8, layout=layout)
    ds = build_dataset({"data_path": str(data_dir / "train.json"), "max_frames": 5}, tok, info)
    sample = ds[0]
    assert sample["video_num_frames"] == 5
    assert sample["input_ids"].tolist().count(tok.convert_tokens_to_ids("<video>")) == \
        layout.video_token_count(5, 8)


def test_openai_record_gives_the_same_sample(tok, data_dir):
    llava = json.loads((data_dir / "train.json").read_text())[0]
    question = llava["conversations"][0]["value"].removeprefix("<video>\n")
    openai = {"messages": [
        {"role": "user", "content": [{"type": "video_url", "video_url": {"url": llava["video"]}},
                                     {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": llava["answer"]}]}], "id": llava["id"]}
    a = build_dataset({"data_path": write(data_dir, "llava.json", [llava])}, tok, INFO)[0]
    b = build_dataset({"data_path": write(data_dir, "openai.json", [openai])}, tok, INFO)[0]
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert torch.equal(a["pixel_values_videos"], b["pixel_values_videos"])


def test_time_instruction(tok, data_dir):
    cfg = {"data_path": str(data_dir / "train.json"), "add_time_instruction": True, "max_frames": 4}
    ds = build_dataset(cfg, tok, INFO)
    sample = ds[0]
    video = ds.loader.load_video(ds.records[0].video, max_frames=4, target_size=(64, 64))
    expected = time_instruction(float(video.duration), [float(t) for t in video.timestamps])
    assert expected.startswith("The video lasts for 4.00 seconds, and 4 frames are uniformly sampled from it. "
                               "These frames are located at ")
    text = tok.decode(sample["input_ids"].tolist())
    vid = "<video>" * (4 * 16 + 1)
    assert f"<|im_start|>user\n{vid}\n{expected}\nIn which direction" in text


def test_text_only_and_mixed_batch(tok, data_dir):
    path = write(data_dir, "mixed.json", [qa(None, "Hi", "Hello"), qa("videos/train_00000.mp4", "Which?", "red")])
    ds = build_dataset({"data_path": path, "padding_side": "left"}, tok, INFO)
    text = ds[0]
    assert "pixel_values_videos" not in text and text["video_num_frames"] == 0
    collate = build_collator(ds.config, tok)
    batch = collate([ds[0], ds[1]])
    assert batch["pixel_values_videos"].shape == (2, 8, 3, 64, 64)
    assert (batch["pixel_values_videos"][0] == 0).all() and batch["video_num_frames"].tolist() == [0, 8]
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1  # left padding
    assert "pixel_values_videos" not in collate([ds[0]])


def _three_turns(data_dir):
    return write(data_dir, "turns.json", [
        qa("videos/train_00000.mp4", "Which way?", "left", "Why?", "It slides.", "Sure?", "Yes."),
        qa(None, "Hi", "Hello"),
    ])


def test_truncation_keeps_whole_leading_exchanges(tok, data_dir):
    path = _three_turns(data_dir)
    full = build_dataset({"data_path": path, "max_length": None}, tok, INFO)[0]
    n = len(full["input_ids"])
    cut = build_dataset({"data_path": path, "max_length": n - 1}, tok, INFO)
    sample = cut[0]
    assert labelled_text(tok, sample) == ["left<|im_end|>", "It slides.<|im_end|>"]
    assert torch.equal(sample["input_ids"], full["input_ids"][: len(sample["input_ids"])])
    assert tok.decode(sample["input_ids"][-2:].tolist()) == "<|im_end|>\n"
    assert sample["input_ids"].tolist().count(tok.convert_tokens_to_ids("<video>")) == TOKENS_8_FRAMES
    assert cut.bad_record_report().num_bad == 0


def test_over_long_samples_are_dropped_never_cut_inside_the_video(tok, data_dir, caplog):
    path = _three_turns(data_dir)
    n = len(build_dataset({"data_path": path, "max_length": None}, tok, INFO)[0]["input_ids"])
    # truncation: drop -> the over-long record is replaced by the next one, counted, even with on_bad_record raise
    dropped = build_dataset({"data_path": path, "max_length": n - 1, "truncation": "drop"}, tok, INFO)
    with caplog.at_level(logging.WARNING, logger="lmms_engine.data.dataset"):
        assert dropped[0]["index"] == 1
    assert "record 0" in caplog.text and "max_length" in caplog.text
    assert dropped.bad_record_report().counts == {"too_long": 1}
    # shorter than the video plus the first exchange: dropped under both policies
    tiny = build_dataset({"data_path": path, "max_length": TOKENS_8_FRAMES + 10}, tok, INFO)
    assert tiny[0]["index"] == 1 and tiny.bad_record_report().counts == {"too_long": 1}


def test_broken_video_raises_with_record_and_file(tok, data_dir):
    path = write(data_dir, "broken.json", [qa("videos/broken.mp4", "Which?", "red"), qa(None, "Hi", "Hello")])
    ds = build_dataset({"data_path": path}, tok, INFO)
    with pytest.raises(BadRecordError) as info:
        ds[0]
    assert info.value.reason == "broken_video"
    assert "broken.json: record 0" in str(info.value) and "broken.mp4" in str(info.value)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_broken_video_is_skipped_in_dataloader_workers(tok, data_dir, num_workers):
    records = [qa("videos/train_00000.mp4", "A?", "a"), qa("videos/broken.mp4", "B?", "b"),
               qa(None, "C?", "c"), qa("videos/broken.mp4", "D?", "d")]
    path = write(data_dir, f"skip{num_workers}.json", records)
    ds = build_dataset({"data_path": path, "on_bad_record": "skip"}, tok, INFO)
    collate = build_collator(ds.config, tok)
    loader = DataLoader(ds, batch_size=2, shuffle=False, num_workers=num_workers,
                        collate_fn=lambda samples: ([s["index"] for s in samples], collate(samples)))
    served = []
    for indices, batch in loader:
        served += indices
        assert batch["input_ids"].shape[0] == 2
    # each broken record is replaced by the next good one in file order (wrapping)
    assert served == [0, 2, 2, 0]
    report = ds.bad_record_report()
    assert report.counts == {"broken_video": 2} and report.num_records == 4
    assert "broken_video: 2" in str(report) and "skip" in str(report).lower()
    assert all("record 1" in e or "record 3" in e for e in report.examples["broken_video"])


def test_bad_records_found_lazily_or_at_start_are_reported(tok, data_dir):
    path = write(data_dir, "bad.json", [
        qa("videos/train_00000.mp4", "A?", "a"), qa("videos/nope.mp4", "B?", "b"),
        qa(None, "C?", "c") | {"colour": "red"}, {"conversations": []}, qa(None, "<video>\nD?", "d")])
    expected = {"missing_video": 1, "unknown_field": 1, "empty_conversation": 1, "placeholder_without_video": 1}
    lazy = build_dataset({"data_path": path}, tok, INFO)  # nothing parsed yet
    assert len(lazy) == 5 and lazy[0]["index"] == 0
    with pytest.raises(BadRecordError, match=r"bad.json: record 1: video file .*nope.mp4' does not exist"):
        lazy[1]
    with pytest.raises(BadRecordError, match=r"bad.json: record 1: video file .*nope.mp4' does not exist"):
        build_dataset({"data_path": path, "check_records": "at_start"}, tok, INFO)
    skipping = build_dataset({"data_path": path, "on_bad_record": "skip"}, tok, INFO)
    assert [skipping[i]["index"] for i in range(5)] == [0] * 5  # each bad record replaced by the next good one
    assert skipping.bad_record_report().counts == expected
    early = build_dataset({"data_path": path, "on_bad_record": "skip", "check_records": "at_start"}, tok, INFO)
    assert early.bad_record_report().counts == expected  # known before any sample is loaded
    assert early[1]["index"] == 0


def test_config_errors(tok, data_dir):
    with pytest.raises(ConfigError, match=r"dataset_config: unknown key 'max_frame' \(did you mean 'max_frames'\?\)"):
        build_dataset({"data_path": "x.json", "max_frame": 4}, tok, INFO)
    with pytest.raises(ConfigError, match="dataset_config.padding_side: invalid value 'center'"):
        build_dataset({"data_path": "x.json", "padding_side": "center"}, tok, INFO)
    with pytest.raises(ConfigError, match="dataset_config.data_path: file 'x.json' does not exist"):
        build_dataset({"data_path": "x.json"}, tok, INFO)
    with pytest.raises(ConfigError, match="max_frames must be >= 1"):
        build_dataset({"data_path": "x.json", "max_frames": 0}, tok, INFO)
    with pytest.raises(ConfigError, match="eval_data_path is not set"):
        build_dataset(DatasetConfig(data_path=str(data_dir / "train.json")), tok, INFO, split="eval")


def test_batches_run_through_the_tiny_model_with_equal_per_sample_loss_for_both_paddings(tok, data_dir):
    """The cross-module contract: the model accepts the collated batch (its video-token count check
    included), and left and right padding give the same per-sample losses."""
    from lmms_engine.models.builder import build_model

    torch.manual_seed(0)
    model = build_model({}, tok).eval()
    info = ProcessorInfo.from_model_config(model.config)
    path = write(data_dir, "model.json", [qa("videos/train_00000.mp4", "Which?", "red"), qa(None, "Hi", "Hello"),
                                          qa("videos/train_00001.mp4", "And?", "left", "Sure?", "Yes.")])
    losses = {}
    for side in ("right", "left"):
        ds = build_dataset({"data_path": path, "padding_side": side, "max_frames": 6}, tok, info)
        batch = build_collator(ds.config, tok)([ds[i] for i in range(len(ds))])
        with torch.no_grad():
            logits = model(**batch).logits
        per_sample = []
        for b in range(len(ds)):
            keep = batch["attention_mask"][b].bool()
            per_sample.append(torch.nn.functional.cross_entropy(logits[b][keep][:-1], batch["labels"][b][keep][1:]))
        losses[side] = torch.stack(per_sample)
    assert torch.isfinite(losses["right"]).all()
    torch.testing.assert_close(losses["left"], losses["right"], rtol=1e-5, atol=1e-5)
