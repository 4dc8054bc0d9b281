"""Budgets on Qwen-VL records: ``max_visual_tokens`` (frame caps by the fit rule, Qwen's grid token counts),
``max_image_pixels``, ``max_length`` never cutting visual tokens, estimates equal to loaded lengths, and
``add_time_instruction``."""

from __future__ import annotations

import json

import pytest
from qwen_support import qwen_dataset, tiny_checkpoint
from test_qwen_data_media import media_records, write_image

from lmms_engine.data.qwen_vision import smart_resize


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return media_records(tmp_path_factory.mktemp("qwen_budgets"))


def _visual_tokens(dataset, sample):
    pads = [dataset.tokenizer.convert_tokens_to_ids(t) for t in ("<|video_pad|>", "<|image_pad|>")]
    return sum(int((sample["input_ids"] == pad).sum()) for pad in pads)


def test_max_visual_tokens_lowers_frame_caps_by_the_fit_rule(tmp_path_factory, records):
    checkpoint = tiny_checkpoint(tmp_path_factory, "qwen2_5_vl")
    # Record 3: a.mp4 (3 s, 6 frames at 2 fps, 6 tokens per group), i2.png (8 tokens), b.mp4 (2 s, 4 frames, 6
    # per group): 18 + 8 + 12 = 38 tokens. Budget 26 leaves 18 for the videos; caps from [8, 8], one frame at a
    # time from the video allowed most (the last of equals): tokens stay 30 down to [5, 4], 24 from [4, 4] to
    # [3, 3], and [3, 2] gives a: 3 frames -> 2 groups (12), b: 2 frames -> 1 group (6): 18.
    unlimited = qwen_dataset(checkpoint, records)
    assert _visual_tokens(unlimited, unlimited[3]) == 38
    dataset = qwen_dataset(checkpoint, records, max_visual_tokens=26)
    record = dataset.record(3)
    assert dataset.frame_caps(record, dataset.image_sizes(record)) == [3, 2]
    sample = dataset[3]
    assert sample["video_grid_thw"].tolist() == [[2, 4, 6], [1, 6, 4]] and sample["video_num_frames"] == [2, 1]
    assert _visual_tokens(dataset, sample) == 26
    # within budget: untouched; a single video record: 3 groups of 6 = 18 tokens fit 26
    assert dataset[4]["video_grid_thw"].tolist() == [[3, 4, 6]]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_estimates_equal_loaded_lengths_under_budgets(tmp_path_factory, records, family):
    checkpoint = tiny_checkpoint(tmp_path_factory, family)
    for config in ({}, {"max_visual_tokens": 26, "max_image_pixels": 3000}, {"add_time_instruction": True}):
        dataset = qwen_dataset(checkpoint, records, **config)
        estimates = dataset.length_estimates()
        loaded = [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
        assert [e.length for e in estimates] == loaded, config
        assert all(e.exact for e in estimates)
        assert dataset.estimated_lengths() == loaded
        assert [e.video_tokens for e in estimates] == [_visual_tokens(dataset, dataset[i]) for i in range(len(dataset))]


def test_over_budget_records_are_dropped_as_too_long(tmp_path_factory, records):
    checkpoint = tiny_checkpoint(tmp_path_factory, "qwen2_5_vl")
    # record 3 needs 8 (image) + 6 + 6 (one group per video) = 20 tokens at the least
    dataset = qwen_dataset(checkpoint, records, max_visual_tokens=19)
    assert dataset[3]["index"] == 4
    assert dataset.bad_record_report().counts == {"too_long": 1}
    assert "max_visual_tokens=19" in dataset.bad_record_report().examples["too_long"][0]
    # an image alone over the budget
    dataset = qwen_dataset(checkpoint, records, max_visual_tokens=5)
    assert dataset[0]["index"] == 5  # records 0-4 hold more than 5 visual tokens each: the text-only one serves


def test_max_image_pixels_scales_images_down(tmp_path_factory, records):
    checkpoint = tiny_checkpoint(tmp_path_factory, "qwen2_5_vl")
    dataset = qwen_dataset(checkpoint, records, max_image_pixels=3000)
    # i2 100 x 50 within 3000 pixels: 112 x 56 rounded is too large; scale sqrt(5000 / 3000) = 1.29, sides floored
    # to multiples of 28: 56 x 28 -> 4 x 2 patches -> 2 tokens. i1 60 x 90: 56 x 84 is too large; scale
    # sqrt(5400 / 3000) = 1.34: 28 x 56 -> 2 x 4 patches.
    assert smart_resize(100, 50, 28, 3000, 3000) == (56, 28)
    sample = dataset[1]
    assert sample["image_grid_thw"].tolist() == [[1, 4, 2]] and _visual_tokens(dataset, sample) == 2
    assert dataset[0]["image_grid_thw"].tolist() == [[1, 2, 4]]
    assert qwen_dataset(checkpoint, records)[1]["image_grid_thw"].tolist() == [[1, 8, 4]]  # no cap


def test_max_length_never_cuts_visual_tokens(tmp_path_factory, tmp_path):
    checkpoint = tiny_checkpoint(tmp_path_factory, "qwen2_5_vl")
    write_image(tmp_path / "i.png", 60, 90)
    records = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "yes"},
                                  {"from": "human", "value": "<image>\nAnd this?"}, {"from": "gpt", "value": "Noise."}],
                "image": "i.png"},
               {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "yes"}]}]
    path = tmp_path / "records.json"
    path.write_text(json.dumps(records))
    full = qwen_dataset(checkpoint, path, max_length=None)
    estimate = full.length_estimates()[0]
    first_exchange, length = estimate.turn_ends[0], estimate.length
    assert first_exchange < length
    # keeping the first exchange alone would be a valid truncation of text, but it would lose the image: dropped
    dataset = qwen_dataset(checkpoint, path, max_length=length - 1, on_bad_record="skip")
    assert dataset[0]["index"] == 1 and dataset.bad_record_report().counts == {"too_long": 1}
    # the same rule from metadata: left out before loading
    early = qwen_dataset(checkpoint, path, max_length=length - 1, drop_long_before_loading=True)
    assert len(early) == 1 and early.bad_record_report().counts == {"too_long": 1}
    assert len(qwen_dataset(checkpoint, path, max_length=length)[0]["input_ids"]) == length


def test_time_instruction_follows_the_video_part(tmp_path_factory, records):
    checkpoint = tiny_checkpoint(tmp_path_factory, "qwen2_5_vl")
    dataset = qwen_dataset(checkpoint, records, add_time_instruction=True)
    text = dataset.tokenizer.decode(dataset[4]["input_ids"])
    # a.mp4: 30 frames at 10 fps, sampled at 2 fps: frames 0, 5, ..., 25
    expected = ("<|vision_end|>The video lasts for 3.00 seconds, and 6 frames are uniformly sampled from it. These "
                "frames are located at 0.00s,0.50s,1.00s,1.50s,2.00s,2.50s. Please answer the following questions "
                "related to this video.\nWhat happens?<|im_end|>")
    assert expected in text
    # several media: no instruction (as for LLaVA-OneVision); the plain dataset has none either
    assert "The video lasts" not in dataset.tokenizer.decode(dataset[3]["input_ids"])
    assert "The video lasts" not in dataset.tokenizer.decode(qwen_dataset(checkpoint, records)[4]["input_ids"])
