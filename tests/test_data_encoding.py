"""Chat-template encoding (labels, video-token expansion), the collator, and frame preprocessing."""

from __future__ import annotations

import pytest
import torch

from lmms_engine.data.chat import IGNORE_INDEX, encode_conversation
from lmms_engine.data.collator import VideoSFTCollator
from lmms_engine.data.preprocess import ProcessorInfo, frames_to_pixel_values
from lmms_engine.data.records import Turn
from lmms_engine.data.tokenizer import build_tiny_tokenizer
from lmms_engine.models.layout import VideoLayoutConfig

TURNS = [
    Turn("system", "Be brief."),
    Turn("user", "<video>\nWhich way does the red square move?"),
    Turn("assistant", "left"),
    Turn("user", "And the blue one?"),
    Turn("assistant", " It stays still.\nNo motion at all."),
]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def runs(labels: list[int]) -> list[list[int]]:
    """Contiguous runs of labelled (not -100) tokens."""
    out, current = [], []
    for label in labels + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            out.append(current)
            current = []
    return out


def test_labels_are_exactly_the_assistant_answers_and_end_tokens(tok):
    enc = encode_conversation(TURNS, tok, video_token_count=17)
    assert len(enc.input_ids) == len(enc.labels)
    assert [tok.decode(run) for run in runs(enc.labels)] == [
        "left<|im_end|>", " It stays still.\nNo motion at all.<|im_end|>"]
    # labelled tokens are the input tokens at the same positions (HF shifts inside the loss)
    assert all(label == i for i, label in zip(enc.input_ids, enc.labels) if label != IGNORE_INDEX)


def test_pieces_tokenize_like_the_whole_text(tok):
    enc = encode_conversation(TURNS, tok, video_token_count=5)
    text = tok.apply_chat_template([{"role": t.role, "content": t.text} for t in TURNS], tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    vid = tok.convert_tokens_to_ids("<video>")
    at = ids.index(vid)
    assert enc.input_ids == ids[:at] + [vid] * 5 + ids[at + 1:]


def test_turn_ends_and_video_span(tok):
    enc = encode_conversation(TURNS, tok, video_token_count=9)
    im_end, newline = tok.convert_tokens_to_ids("<|im_end|>"), tok("\n", add_special_tokens=False)["input_ids"]
    assert enc.turn_ends[-1] == len(enc.input_ids)
    for end in enc.turn_ends:
        assert enc.input_ids[end - 1 - len(newline)] == im_end
        assert enc.input_ids[end - len(newline):end] == newline
    start, stop = enc.video_span
    vid = tok.convert_tokens_to_ids("<video>")
    assert enc.input_ids[start:stop] == [vid] * 9 and enc.input_ids.count(vid) == 9
    # the video comes right after the user header, before any question text
    assert tok.decode(enc.input_ids[:start]).endswith("<|im_start|>user\n")
    assert tok.decode(enc.input_ids[stop:stop + 2]).startswith("\nWhich")


LAYOUTS = [
    VideoLayoutConfig(),
    VideoLayoutConfig(mm_spatial_pool_stride=4, mm_spatial_pool_mode="average", mm_newline_position="grid"),
    VideoLayoutConfig(mm_spatial_pool_mode="max", mm_newline_position="frame"),
    VideoLayoutConfig(mm_newline_position="no_token", add_faster_video=True, faster_token_stride=3),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda c: f"{c.mm_spatial_pool_mode}{c.mm_spatial_pool_stride}"
                                                         f"-{c.mm_newline_position}-faster{c.add_faster_video}")
@pytest.mark.parametrize("frames", [1, 8])
def test_video_token_count_follows_the_layout(tok, layout, frames):
    info = ProcessorInfo(image_size=64, patch_size=8, layout=layout)
    expected = layout.video_token_count(frames, 8)
    assert info.video_token_count(frames) == expected
    enc = encode_conversation(TURNS, tok, video_token_count=info.video_token_count(frames))
    assert enc.input_ids.count(tok.convert_tokens_to_ids("<video>")) == expected


def test_known_token_counts():
    side = ProcessorInfo(image_size=384, patch_size=14).patch_side
    assert side == 27
    assert ProcessorInfo(image_size=384, patch_size=14).video_token_count(8) == 8 * 14 * 14 + 1  # HF LLaVA-OV
    avg = VideoLayoutConfig(mm_spatial_pool_mode="average", mm_newline_position="no_token")
    assert ProcessorInfo(image_size=384, patch_size=14, layout=avg).video_token_count(32) == 32 * 169


def test_text_only_and_generation_prompt(tok):
    text_only = [Turn("user", "Hi"), Turn("assistant", "Hello")]
    enc = encode_conversation(text_only, tok)
    assert enc.video_span is None and [tok.decode(r) for r in runs(enc.labels)] == ["Hello<|im_end|>"]
    prompt = encode_conversation(TURNS[:4], tok, video_token_count=3, add_generation_prompt=True)
    assert tok.decode(prompt.input_ids).endswith("And the blue one?<|im_end|>\n<|im_start|>assistant\n")
    assert [tok.decode(r) for r in runs(prompt.labels)] == ["left<|im_end|>"]
    with pytest.raises(ValueError, match=r"holds the placeholders \[\]; expected \['<video>'\]"):
        encode_conversation(text_only, tok, video_token_count=4)
    with pytest.raises(ValueError, match=r"holds the placeholders \['<video>'\]; expected \[\]"):
        encode_conversation(TURNS, tok, video_token_count=0)


def test_several_media_expand_in_order(tok):
    turns = [Turn("user", "<video>\nThen <image> and <video>?"), Turn("assistant", "Yes.")]
    enc = encode_conversation(turns, tok, media=[("<video>", 5), ("<image>", 3), ("<video>", 2)])
    video, image = tok.convert_tokens_to_ids("<video>"), tok.convert_tokens_to_ids("<image>")
    assert [enc.input_ids[a:b] for a, b in enc.media_spans] == [[video] * 5, [image] * 3, [video] * 2]
    assert enc.video_span == enc.media_spans[0]
    assert enc.input_ids.count(video) == 7 and enc.input_ids.count(image) == 3
    assert all(enc.labels[i] == -100 for a, b in enc.media_spans for i in range(a, b))
    with pytest.raises(ValueError, match="expected \\['<image>', '<video>', '<video>'\\]"):
        encode_conversation(turns, tok, media=[("<image>", 3), ("<video>", 5), ("<video>", 2)])


def _samples():
    g = torch.Generator().manual_seed(0)
    return [
        {"input_ids": torch.arange(5), "labels": torch.tensor([-100, -100, 7, 8, 9]),
         "pixel_values_videos": torch.randn(3, 3, 4, 4, generator=g), "video_num_frames": 3},
        {"input_ids": torch.arange(10, 13), "labels": torch.tensor([-100, 1, 2]), "video_num_frames": 0},
        {"input_ids": torch.arange(20, 28), "labels": torch.arange(20, 28),
         "pixel_values_videos": torch.randn(2, 3, 4, 4, generator=g), "video_num_frames": 2, "index": 4},
    ]


def test_collator_left_and_right_padding_hold_the_same_samples():
    samples = _samples()
    right = VideoSFTCollator(pad_token_id=99, padding_side="right")(samples)
    left = VideoSFTCollator(pad_token_id=99, padding_side="left")(samples)
    assert set(right) == {"input_ids", "attention_mask", "labels", "pixel_values_videos", "video_num_frames"}
    assert right["input_ids"].shape == (3, 8) and right["input_ids"].dtype == torch.long
    for batch in (right, left):
        for i, sample in enumerate(samples):
            keep = batch["attention_mask"][i].bool()
            assert torch.equal(batch["input_ids"][i][keep], sample["input_ids"])
            assert torch.equal(batch["labels"][i][keep], sample["labels"])
            assert (batch["input_ids"][i][~keep] == 99).all() and (batch["labels"][i][~keep] == -100).all()
    assert right["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert left["attention_mask"][1].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert torch.equal(right["pixel_values_videos"], left["pixel_values_videos"])
    pixels = right["pixel_values_videos"]
    assert pixels.shape == (3, 3, 3, 4, 4)
    assert torch.equal(pixels[0], samples[0]["pixel_values_videos"])
    assert torch.equal(pixels[2, :2], samples[2]["pixel_values_videos"]) and (pixels[2, 2] == 0).all()
    assert (pixels[1] == 0).all()
    assert right["video_num_frames"].tolist() == [3, 0, 2] and right["video_num_frames"].dtype == torch.long


def test_collator_without_videos_omits_pixels():
    batch = VideoSFTCollator(pad_token_id=0)([_samples()[1]])
    assert "pixel_values_videos" not in batch and batch["video_num_frames"].tolist() == [0]
    with pytest.raises(ValueError, match="padding_side"):
        VideoSFTCollator(pad_token_id=0, padding_side="middle")


def test_frames_to_pixel_values():
    frames = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    frames[0] = 255
    frames[1, 0] = 51  # R = 0.2
    out = frames_to_pixel_values(frames, 8)  # SigLIP: (x - 0.5) / 0.5
    assert out.dtype == torch.float32 and out.shape == (2, 3, 8, 8)
    assert torch.allclose(out[0], torch.ones_like(out[0]))
    assert torch.allclose(out[1, 0], torch.full((8, 8), -0.6)) and torch.allclose(out[1, 1:], -torch.ones(2, 8, 8))
    imagenet = frames_to_pixel_values(frames, 8, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    assert torch.allclose(imagenet[0, :, 0, 0], torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224,
                                                              (1 - 0.406) / 0.225]))
    resized = frames_to_pixel_values(frames, 4)
    assert resized.shape == (2, 3, 4, 4) and torch.allclose(resized[1, 0], torch.full((4, 4), -0.6), atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        frames_to_pixel_values(frames.float(), 8)


def test_processor_info_from_model_config(tok):
    from lmms_engine.models.tiny import tiny_llava_config

    config = tiny_llava_config(tok)
    info = ProcessorInfo.from_model_config(config)
    assert (info.image_size, info.patch_size, info.patch_side) == (64, 8, 8)
    assert info.image_mean == (0.5, 0.5, 0.5) and info.layout == VideoLayoutConfig()
    config.mm_spatial_pool_stride = 4
    config.image_mean = [0.1, 0.2, 0.3]
    info = ProcessorInfo.from_model_config(config)
    assert info.layout.mm_spatial_pool_stride == 4 and info.image_mean == (0.1, 0.2, 0.3)
    config.video_layout = {"mm_spatial_pool_stride": 2, "mm_newline_position": "frame"}  # the engine's models
    assert ProcessorInfo.from_model_config(config).layout == VideoLayoutConfig(mm_newline_position="frame")
    with pytest.raises(ValueError, match="image_std"):
        ProcessorInfo(image_size=64, patch_size=8, image_std=(0.5, 0.0, 0.5))
