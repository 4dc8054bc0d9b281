"""Images and several media per record on the LLaVA-OneVision path: anyres tiling and token counts equal
to transformers', logits equal to plain transformers' on image batches, several videos each with its
autoregressive targets, broken images as bad records, visual-token budgets and max_length."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clips import make_clip
from lmms_engine.data.collator import build_collator
from lmms_engine.data.dataset import DatasetConfig, build_dataset, fit_frames
from lmms_engine.data.images import images_to_pixel_values
from lmms_engine.data.preprocess import ProcessorInfo
from lmms_engine.data.tokenizer import build_tiny_tokenizer
from lmms_engine.models.builder import build_model

PINPOINTS = [[64, 64], [64, 128], [128, 64], [128, 128], [64, 192], [192, 64]]
AR = {"embedding_dim": 64, "num_hist": 2, "num_heads": 4, "num_layers": 1}


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def tiny_model(tok, autoregressive: bool = False):
    torch.manual_seed(0)
    model = build_model({"enable_autoregressive": True, "autoregressive_config": dict(AR)} if autoregressive else {},
                        tok)
    model.config.image_grid_pinpoints = PINPOINTS
    return model


def picture(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("media")
    make_clip(root / "a.mp4", 12)
    make_clip(root / "b.mp4", 9)
    picture(100, 150).save(root / "wide.png")
    picture(200, 70, seed=1).save(root / "tall.jpg")
    picture(300, 400, seed=2).save(root / "big.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    return root


def turns(question: str, answer: str = "Yes.") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.mark.parametrize("aspect", ["anyres_max_9", "anyres_max_1"])  # _1: the tiled grid is downsampled
def test_image_token_counts_equal_the_models_features(tok, aspect):
    model = tiny_model(tok)
    model.config.vision_aspect_ratio = aspect
    info = ProcessorInfo.from_model_config(model.config, layout=model.video_layout)
    assert info.image_grid_pinpoints == tuple(map(tuple, PINPOINTS)) and info.vision_aspect_ratio == aspect
    kwargs = dict(image_size=64, mean=info.image_mean, std=info.image_std, grid_pinpoints=PINPOINTS)
    with torch.no_grad():
        for height, width in [(100, 150), (30, 200), (64, 64), (300, 90), (50, 51), (128, 128)]:
            [(tiles, size)] = images_to_pixel_values([picture(height, width)], **kwargs)
            assert size == (height, width) and tiles.shape[1:] == (3, 64, 64)
            out = model.model.get_image_features(tiles[None], torch.tensor([size]),
                                                 batch_num_images=torch.tensor([1]), return_dict=True)
            assert out.pooler_output[0].shape[0] == info.image_token_count(height, width, tiled=True), (height, width)
        several = images_to_pixel_values([picture(100, 150), picture(30, 200)], **kwargs)
        assert [t.shape[0] for t, _ in several] == [1, 1]  # one padded tile each
        out = model.model.get_image_features(torch.stack([t for t, _ in several]), torch.tensor([s for _, s in several]),
                                             batch_num_images=torch.tensor([2]), return_dict=True)
        assert [f.shape[0] for f in out.pooler_output] == [info.image_token_count(h, w, tiled=False) for h, w in
                                                           ((100, 150), (30, 200))] == [65, 65]


def write(path: Path, records: list) -> str:
    path.write_text(json.dumps(records))
    return str(path)


def test_image_batches_give_plain_transformers_logits(tok, media, tmp_path):
    from transformers import LlavaOnevisionForConditionalGeneration

    model = tiny_model(tok).eval()
    info = ProcessorInfo.from_model_config(model.config, layout=model.video_layout)
    data = write(tmp_path / "images.json", [
        {"image": "wide.png", "conversations": turns("<image>\nWhat is it?")},
        {"image": ["wide.png", "tall.jpg"], "conversations": turns("Compare <image> and <image>.")},
        {"conversations": turns("No picture?")}])
    config = DatasetConfig(data_path=data, video_folder=str(media), image_folder=str(media))
    ds = build_dataset(config, tok, info)
    samples = [ds[i] for i in range(3)]
    image_id = model.config.image_token_id
    assert [int((s["input_ids"] == image_id).sum()) for s in samples] == [
        info.image_token_count(100, 150, tiled=True), 2 * 65, 0]
    batch = build_collator(config, tok)(samples)
    assert batch["batch_num_images"].tolist() == [1, 2, 0] and batch["image_sizes"].tolist() == [
        [100, 150], [100, 150], [200, 70]]
    assert batch["pixel_values"].shape[:2] == (3, samples[0]["pixel_values"][0].shape[0])
    model.save_pretrained(tmp_path / "ckpt")
    plain = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "ckpt").eval()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes", "batch_num_images")}
    with torch.no_grad():
        ours, theirs = model(**inputs).logits, plain(**inputs).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_several_videos_and_images_train_with_an_autoregressive_loss_per_video(tok, media, tmp_path):
    model = tiny_model(tok, autoregressive=True)
    info = ProcessorInfo.from_model_config(model.config, layout=model.video_layout)
    data = write(tmp_path / "mixed.json", [
        {"video": ["a.mp4", "b.mp4"], "image": "tall.jpg",
         "conversations": turns("First <video>, then <image>, then <video>: same shape?")},
        {"video": "b.mp4", "conversations": turns("<video>\nWhat moves?")},
        {"image": "wide.png", "conversations": turns("<image>\nColour?")},
        {"conversations": turns("Just text?")}])
    config = DatasetConfig(data_path=data, video_folder=str(media), image_folder=str(media), max_frames=6)
    ds = build_dataset(config, tok, info)
    first = ds[0]
    assert first["video_num_frames"] == [6, 6] and [v.shape[0] for v in first["pixel_values_videos"]] == [6, 6]
    ids = first["input_ids"].tolist()
    video_id, image_id = model.config.video_token_id, model.config.image_token_id
    runs = [(token, len(list(group))) for token, group in itertools.groupby(ids) if token in (video_id, image_id)]
    assert runs == [(video_id, info.video_token_count(6)),
                                           (image_id, info.image_token_count(200, 70, tiled=True)),
                                           (video_id, info.video_token_count(6))]
    batch = build_collator(config, tok)([ds[i] for i in range(4)])
    assert batch["video_row"].tolist() == [0, 0, 1] and batch["video_num_frames"].tolist() == [6, 6, 6]
    assert batch["batch_num_images"].tolist() == [1, 0, 1, 0]
    model.train()
    out = model(**batch)
    assert out.video_token_layout.num_frames.tolist() == [6, 6, 6]
    positions = out.video_token_layout.slow.positions  # flat positions row * L + column, per video
    length = batch["input_ids"].shape[1]
    assert [int(positions[v][positions[v] >= 0].min()) // length for v in range(3)] == [0, 0, 1]
    counts = model.count_loss_units(batch)
    assert all(int(v) > 0 for v in counts.values())
    assert {k: int(v) for k, v in out.loss_terms.counts().items()} == {k: int(v) for k, v in counts.items()}
    assert all(int(term.count) > 0 for term in out.loss_terms.autoregressive.values())
    out.loss_terms.objective(counts).backward()
    predictor = [p for n, p in model.autoregressive_module.named_parameters() if p.requires_grad]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in predictor)
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0


def test_broken_and_missing_images_are_bad_records(tok, media, tmp_path):
    info = ProcessorInfo(image_size=64, patch_size=8)
    data = write(tmp_path / "bad.json", [
        {"image": "broken.png", "conversations": turns("<image>\nWhat?")},
        {"image": "gone.png", "conversations": turns("<image>\nWhat?")},
        {"image": "wide.png", "conversations": turns("<image>\nWhat?")}])
    ds = build_dataset({"data_path": data, "image_folder": str(media), "on_bad_record": "skip"}, tok, info)
    assert [ds[i]["index"] for i in range(3)] == [2, 2, 2]
    report = ds.bad_record_report()
    assert report.counts == {"broken_image": 1, "missing_image": 1}
    assert "broken.png" in report.examples["broken_image"][0]


def test_fit_frames_rule():
    per_frame = lambda n: 16 * n + 1  # noqa: E731 - the tiny layout: 4x4 pooled tokens + one newline
    assert fit_frames([8, 8], 200, per_frame) == [6, 6]
    assert fit_frames([8, 3], 120, per_frame) == [4, 3]  # the longer video gives frames first
    assert fit_frames([8, 8], 10_000, per_frame) == [8, 8]
    assert fit_frames([8, 8], 30, per_frame) is None  # one frame each does not fit


def test_visual_token_budget_caps_frames_before_decoding_and_lengths_follow(tok, media, tmp_path):
    info = ProcessorInfo(image_size=64, patch_size=8)  # 4x4 pooled grid: 16 * T + 1 tokens a video
    image = info.image_token_count(200, 70, tiled=True)
    data = write(tmp_path / "budget.json", [
        {"video": ["a.mp4", "b.mp4"], "image": "tall.jpg", "conversations": turns("<video> <image> <video>?")},
        {"video": "a.mp4", "conversations": turns("<video>\nOne?")},
        {"video": "a.mp4", "image": "tall.jpg", "conversations": turns("<video><image>?")}])
    budget = image + 2 * 17 + 16 * 8  # image + two videos of 1 frame + 8 more frames
    ds = build_dataset({"data_path": data, "video_folder": str(media), "image_folder": str(media), "max_frames": 8,
                        "max_visual_tokens": budget}, tok, info)
    sample = ds[0]
    assert sample["video_num_frames"] == [5, 5]  # 10 frames fit: the cap went 8,8 -> 5,5
    assert ds[1]["video_num_frames"] == 8  # within budget
    assert ds.estimated_lengths() == [len(ds[i]["input_ids"]) for i in range(3)]  # capped lengths, no decode
    visual = (sample["input_ids"] == tok.convert_tokens_to_ids("<video>")).sum() + \
        (sample["input_ids"] == tok.convert_tokens_to_ids("<image>")).sum()
    assert int(visual) <= budget
    tight = build_dataset({"data_path": data, "video_folder": str(media), "image_folder": str(media),
                           "max_visual_tokens": image + 20, "on_bad_record": "skip"}, tok, info)
    assert tight[0]["index"] == 1  # record 0 cannot fit one frame per video: dropped, the next one served
    assert tight.bad_record_report().counts == {"too_long": 1}


def test_max_image_pixels_scales_images_down_before_tiling(tok, media, tmp_path):
    info = ProcessorInfo(image_size=64, patch_size=8, image_grid_pinpoints=tuple(map(tuple, PINPOINTS)))
    data = write(tmp_path / "big.json", [{"image": "big.png", "conversations": turns("<image>\nWhat?")}])
    full = build_dataset({"data_path": data, "image_folder": str(media)}, tok, info)[0]
    capped = build_dataset({"data_path": data, "image_folder": str(media), "max_image_pixels": 64 * 64}, tok, info)[0]
    assert full["image_sizes"] == [(300, 400)] and capped["image_sizes"] == [(55, 73)]  # 55 * 73 <= 4096
    image_id = tok.convert_tokens_to_ids("<image>")
    assert int((capped["input_ids"] == image_id).sum()) == info.image_token_count(55, 73, tiled=True) < \
        int((full["input_ids"] == image_id).sum())


def test_max_length_never_cuts_visual_tokens(tok, media, tmp_path):
    info = ProcessorInfo(image_size=64, patch_size=8)
    record = {"image": "wide.png", "conversations": turns("Hello?", "Hi.") + turns("<image>\nAnd this?", "A square.")}
    data = write(tmp_path / "late_image.json", [record, {"conversations": turns("Text?")}])
    loaded = build_dataset({"data_path": data, "image_folder": str(media)}, tok, info)[0]
    full_length = len(loaded["input_ids"])
    config = {"data_path": data, "image_folder": str(media), "max_length": full_length - 5, "truncation": "turns",
              "on_bad_record": "skip"}
    late = build_dataset(config, tok, info)
    assert late[0]["index"] == 1  # keeping the first exchange only would cut the image: dropped
    assert late.bad_record_report().counts == {"too_long": 1}
    early = build_dataset(dict(config, drop_long_before_loading=True), tok, info)
    assert len(early) == 1 and early.bad_record_report().counts == {"too_long": 1}  # from metadata, before loading
    assert "left out before loading" in early.bad_record_report().records[0]["message"]
