"""Qwen-VL records with images and several media: pixels equal to transformers' image processor, token
counts, logits equal to plain transformers on image and mixed batches, several videos per record with the
autoregressive loss per video, packing, broken images, and a mixed batch that trains."""

from __future__ import annotations

import json
from itertools import groupby

import numpy as np
import pytest
import torch
from clips import make_clip
from PIL import Image
from qwen_support import QWEN_AR, collate, qwen_dataset, tiny_checkpoint
from transformers import AutoConfig, AutoModelForImageTextToText

from lmms_engine.data.qwen_dataset import QwenVideoCollator
from lmms_engine.data.qwen_vision import QwenVideoProcessing, mm_token_type_ids, smart_resize
from lmms_engine.models.builder import build_model
from lmms_engine.models.qwen_vl_common import qwen_model_class

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


def write_image(path, height, width, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def media_records(folder):
    """Image records in the three forms, a record with two videos and an image, a video and a text-only one."""
    folder.mkdir(parents=True, exist_ok=True)
    write_image(folder / "i1.png", 60, 90, seed=1)
    write_image(folder / "i2.png", 100, 50, seed=2)
    make_clip(folder / "a.mp4", 30, fps=10, size=(48, 96))
    make_clip(folder / "b.mp4", 20, fps=10, size=(96, 48))
    records = [
        {"conversations": [{"from": "human", "value": "<image>\nWhat is shown?"},
                           {"from": "gpt", "value": "A pattern."}], "image": "i1.png"},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "i2.png"}},
                                                   {"type": "text", "text": "Describe."}]},
                      {"role": "assistant", "content": "Noise."}]},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "i1.png"},
                                                   {"type": "text", "text": "Describe."}]},
                      {"role": "assistant", "content": "Noise."}]},
        {"conversations": [{"from": "human", "value": "<video>\nFirst. <image>\nA picture. <video>\nCompare."},
                           {"from": "gpt", "value": "They differ."}], "video": ["a.mp4", "b.mp4"], "image": "i2.png"},
        {"conversations": [{"from": "human", "value": "<video>\nWhat happens?"},
                           {"from": "gpt", "value": "A square moves."}], "video": "a.mp4"},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "yes"}]},
    ]
    path = folder / "records.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return media_records(tmp_path_factory.mktemp("qwen_media"))


def _token(dataset, text):
    return dataset.tokenizer.convert_tokens_to_ids(text)


def _plain_inputs(batch, config):
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
    out = {k: batch[k] for k in keys if k in batch}
    out["mm_token_type_ids"] = mm_token_type_ids(batch["input_ids"], config.video_token_id, config.image_token_id)
    if config.model_type == "qwen2_5_vl" and "second_per_grid_ts" in batch:
        out["second_per_grid_ts"] = batch["second_per_grid_ts"]
    return out


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_image_pixels_equal_transformers_image_processor(tmp_path_factory, family):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    config = AutoConfig.from_pretrained(tiny_checkpoint(tmp_path_factory, family))
    processing = QwenVideoProcessing.for_model(config, image_min_pixels=4 * 28 * 28, image_max_pixels=40 * 32 * 32)
    reference = Qwen2VLImageProcessorPil(patch_size=processing.patch_size, merge_size=processing.merge_size,
                                         temporal_patch_size=processing.temporal_patch_size,
                                         image_mean=list(processing.image_mean), image_std=list(processing.image_std),
                                         size={"shortest_edge": processing.image_min_pixels,
                                               "longest_edge": processing.image_max_pixels})
    folder = tmp_path_factory.mktemp(f"images_{family}")
    for k, (height, width) in enumerate([(60, 90), (100, 50), (333, 517), (20, 20)]):
        path = write_image(folder / f"{k}.png", height, width, seed=k)
        image = Image.open(path).convert("RGB")
        expected = reference(images=[image], return_tensors="pt")
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
        ours = processing.preprocess_image(pixels)
        assert [list(ours.grid_thw)] == expected["image_grid_thw"].tolist()
        diff = (ours.pixel_values - expected["pixel_values"]).abs().max().item()
        print(f"{family} {height}x{width} -> grid {ours.grid_thw}: max abs pixel difference {diff:.3g}")
        assert diff == 0.0
        factor = processing.factor
        assert ours.size == smart_resize(height, width, factor, processing.image_min_pixels, processing.image_max_pixels)


def test_checkpoint_image_pixels_are_read(tmp_path_factory, tmp_path):
    checkpoint = tiny_checkpoint(tmp_path_factory, "qwen2_5_vl")
    config = AutoConfig.from_pretrained(checkpoint)
    assert (QwenVideoProcessing.for_model(config).image_min_pixels,
            QwenVideoProcessing.for_model(config).image_max_pixels) == (56 * 56, 28 * 28 * 1280)  # no file: defaults
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 1000,
                                                                            "longest_edge": 9000}}))
    config._name_or_path = str(tmp_path)
    processing = QwenVideoProcessing.for_model(config)
    assert (processing.image_min_pixels, processing.image_max_pixels) == (1000, 9000)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 3136, "max_pixels": 12845056}))
    assert QwenVideoProcessing.for_model(config).image_max_pixels == 12845056
    # transformers 5's nested processor_config.json alone: its image_processor entry (not the video one's)
    (tmp_path / "preprocessor_config.json").unlink()
    (tmp_path / "processor_config.json").write_text(json.dumps({
        "processor_class": "Qwen2_5_VLProcessor",
        "image_processor": {"size": {"shortest_edge": 2000, "longest_edge": 8000}},
        "video_processor": {"size": {"shortest_edge": 5, "longest_edge": 7}}}))
    processing = QwenVideoProcessing.for_model(config)
    assert (processing.image_min_pixels, processing.image_max_pixels) == (2000, 8000)
    # both present: the flat file is what transformers reads first
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 1000,
                                                                            "longest_edge": 9000}}))
    assert QwenVideoProcessing.for_model(config).image_max_pixels == 9000


@pytest.mark.parametrize("family", FAMILIES)
def test_image_records_tokens_and_types(tmp_path_factory, records, family):
    checkpoint = tiny_checkpoint(tmp_path_factory, family)
    dataset = qwen_dataset(checkpoint, records)
    pad, start, end = (_token(dataset, t) for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>"))
    # i1 60 x 90: Qwen2/2.5 (factor 28) -> 56 x 84 = 4 x 6 patches; Qwen3 (factor 32) -> 64 x 96 = 4 x 6 patches:
    # 2 x 3 = 6 tokens. i2 100 x 50: factor 28 -> 112 x 56 = 8 x 4 patches (8 tokens); factor 32 -> 96 x 64 = 6 x 4
    # (6 tokens).
    i2_grid, i2_tokens = ([1, 8, 4], 8) if family != "qwen3_vl" else ([1, 6, 4], 6)
    for index, grid, tokens in ((0, [1, 4, 6], 6), (1, i2_grid, i2_tokens), (2, [1, 4, 6], 6)):
        sample = dataset[index]
        ids = sample["input_ids"]
        assert sample["image_grid_thw"].tolist() == [grid]
        assert sample["pixel_values"].shape == (grid[1] * grid[2], 3 * 2 * dataset.processing.patch_size ** 2)
        assert int((ids == pad).sum()) == tokens and sample["video_num_frames"] == 0
        first = int((ids == pad).nonzero()[0])
        assert ids[first - 1] == start and ids[first + tokens] == end  # one vision_start/end pair, no timestamp
        assert "pixel_values_videos" not in sample
        text = dataset.tokenizer.decode(ids[first + tokens + 1:first + tokens + 3])
        assert not text.startswith("\n")  # the template's part text is followed directly by the question
        assert (sample["labels"] != -100).sum() > 0 and (sample["labels"][ids == pad] == -100).all()
    types = mm_token_type_ids(dataset[0]["input_ids"], _token(dataset, "<|video_pad|>"), pad)
    assert types.tolist() == [1 if t == pad else 0 for t in dataset[0]["input_ids"].tolist()]


@pytest.mark.parametrize("family", FAMILIES)
def test_several_media_in_tag_order(tmp_path_factory, records, family):
    checkpoint = tiny_checkpoint(tmp_path_factory, family)
    dataset = qwen_dataset(checkpoint, records)
    sample = dataset[3]
    # a.mp4 3 s at 2 fps -> 6 frames -> 3 groups of 4 x 6 patches; b.mp4 2 s -> 2 groups of 6 x 4 (both families)
    assert sample["video_grid_thw"].tolist() == [[3, 4, 6], [2, 6, 4]]
    assert sample["video_num_frames"] == [3, 2]
    assert sample["pixel_values_videos"].shape[0] == 3 * 24 + 2 * 24
    ids = sample["input_ids"].tolist()
    video, image = _token(dataset, "<|video_pad|>"), _token(dataset, "<|image_pad|>")
    runs = [[token, len(list(group))] for token, group in groupby(ids) if token in (video, image)]
    if family == "qwen3_vl":  # one run per temporal group, each behind its own timestamp
        expected = [[video, 6]] * 3 + [[image, 6]] + [[video, 6]] * 2
    else:
        expected = [[video, 18], [image, 8], [video, 12]]
    assert runs == expected
    text = dataset.tokenizer.decode(sample["input_ids"])
    assert text.index("First.") < text.index("A picture.") < text.index("Compare.")


@torch.no_grad()
def _real_logit_difference(ours, plain, batch):
    """Max abs difference of the logits at the batch's real (unpadded) tokens."""
    difference = ours(**batch).logits - plain(**_plain_inputs(batch, plain.config)).logits
    return difference[batch["attention_mask"].bool()].abs().max().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_generation_equal_plain_transformers_on_image_and_mixed_batches(tmp_path_factory, records, family):
    checkpoint = tiny_checkpoint(tmp_path_factory, family)
    dataset = qwen_dataset(checkpoint, records)
    ours = qwen_model_class(family).from_pretrained(checkpoint).eval()
    plain = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    for name, indices in (("images", [0, 1, 2]), ("image+video+text, 2 videos and an image in one record",
                                                  [3, 0, 4, 5])):
        diff = _real_logit_difference(ours, plain, collate(dataset, indices, padding_side="left"))
        print(f"{family} {name}: max abs logit difference vs transformers: {diff:.3g}")
        assert diff <= 1e-5
    # greedy answers from the collator's batch (no mm_token_type_ids given) equal transformers' from its inputs
    prompts = [dataset.generation_sample(i) for i in (0, 3, 1)]
    batch = QwenVideoCollator(pad_token_id=dataset.tokenizer.pad_token_id, padding_side="left")(prompts)
    batch.pop("labels")
    expected = plain.generate(**_plain_inputs(batch, plain.config), max_new_tokens=6, do_sample=False)
    assert torch.equal(ours.generate(**batch, max_new_tokens=6, do_sample=False), expected)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_autoregressive_loss_per_video_and_packing(tmp_path_factory, records, family):
    checkpoint = tiny_checkpoint(tmp_path_factory, family)
    dataset = qwen_dataset(checkpoint, records)
    from transformers import AutoTokenizer

    model = build_model({"model_name_or_path": str(checkpoint), "enable_autoregressive": True,
                         "autoregressive_config": QWEN_AR}, AutoTokenizer.from_pretrained(checkpoint)).eval()
    padded = collate(dataset, [3, 0, 4, 5])
    packed = collate(dataset, [3, 0, 4, 5], packing_length=256)
    assert packed["input_ids"].shape[0] < 4 and packed["video_row"].tolist() == sorted(packed["video_row"].tolist())
    assert padded["video_num_frames"].tolist() == [3, 2, 3] and padded["video_row"].tolist() == [0, 0, 2]
    with torch.no_grad():
        out_padded, out_packed = model(**padded), model(**packed)
    # num_hist 2: a video of t groups supervises (t - 1) groups of its h/2 * w/2 tokens: a: 2 x 6, b: 1 x 6,
    # the second a: 2 x 6 -> 30 target tokens; the image adds none.
    units = model.count_loss_units(padded)
    streams = out_padded.loss_terms.autoregressive
    assert sum(int(t.count) for t in streams.values()) == 30
    assert {k: int(v) for k, v in units.items() if k != "language_model"} == \
        {f"autoregressive.{k}": int(t.count) for k, t in streams.items()}
    assert int(units["language_model"]) == int(out_padded.loss_terms.language_model.count)
    assert {k: int(v) for k, v in model.count_loss_units(packed).items()} == {k: int(v) for k, v in units.items()}
    for key in ("main_loss", "autoregressive_loss"):
        a, b = out_padded.loss_components[key].item(), out_packed.loss_components[key].item()
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (key, a, b)


def test_broken_image_is_a_bad_record(tmp_path_factory, tmp_path):
    checkpoint = tiny_checkpoint(tmp_path_factory, "qwen2_5_vl")
    write_image(tmp_path / "good.png", 60, 90)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    records = [{"conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}],
                "image": name} for name in ("bad.png", "good.png")]
    path = tmp_path / "records.json"
    path.write_text(json.dumps(records))
    dataset = qwen_dataset(checkpoint, path, on_bad_record="skip")
    assert dataset[0]["index"] == 1
    report = dataset.bad_record_report()
    assert report.counts == {"broken_image": 1} and "bad.png" in report.examples["broken_image"][0]
    from lmms_engine.data.records import BadRecordError

    with pytest.raises(BadRecordError, match="bad.png.*broken_image"):
        qwen_dataset(checkpoint, path)[0]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_mixed_batches_train_and_touch_every_visual_parameter(tmp_path_factory, records, family):
    """An image-only batch reaches the same parameters in backward as a video batch (DDP ranks need no
    unused-parameter search); a mixed image / video / text batch trains: the loss falls."""
    from transformers import AutoTokenizer

    checkpoint = tiny_checkpoint(tmp_path_factory, family)
    dataset = qwen_dataset(checkpoint, records)
    torch.manual_seed(0)
    model = build_model({"model_name_or_path": str(checkpoint), "enable_autoregressive": True,
                         "autoregressive_config": {**QWEN_AR, "target_encoder": "copy"}},
                        AutoTokenizer.from_pretrained(checkpoint))
    model.train()
    reached = {}
    for name, indices in (("video", [4, 5]), ("image", [0, 1]), ("text", [5])):
        model.zero_grad(set_to_none=True)
        model(**collate(dataset, indices)).loss.backward()
        reached[name] = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("model.visual.") for n in trainable)
    assert reached["image"] == reached["video"] == reached["text"] == trainable
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    batch = collate(dataset, [3, 0, 4, 5])
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        out = model(**batch)
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    print(f"{family}: mixed-batch losses {[round(x, 3) for x in losses]}")
    assert losses[-1] < 0.8 * losses[0]


def test_template_must_render_image_parts_as_qwen_does(tmp_path_factory):
    from transformers import AutoTokenizer

    from lmms_engine.data.qwen_dataset import check_video_template
    from lmms_engine.utils.config import ConfigError

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint(tmp_path_factory, "qwen2_5_vl"))
    check_video_template(tokenizer)  # the tiny template renders both parts as Qwen's
    tokenizer.chat_template = tokenizer.chat_template.replace("<|image_pad|>", "<|video_pad|>")
    with pytest.raises(ConfigError, match="does not render an image content part"):
        check_video_template(tokenizer)


def test_reconstruction_errors_on_batches_with_images_and_several_videos(tmp_path_factory, records):
    """The evaluate block's next-frame table on a batch with an image record and a record of two videos and
    an image: each video on its own grid, the batch's sums those of its samples run alone."""
    from transformers import AutoTokenizer

    checkpoint = tiny_checkpoint(tmp_path_factory, "qwen2_5_vl")
    dataset = qwen_dataset(checkpoint, records)
    model = build_model({"model_name_or_path": str(checkpoint), "enable_autoregressive": True,
                         "autoregressive_config": QWEN_AR}, AutoTokenizer.from_pretrained(checkpoint)).eval()
    together = model.reconstruction_errors(collate(dataset, [3, 0, 4]))["all"]
    alone = [model.reconstruction_errors(collate(dataset, [i]))["all"] for i in (3, 4)]
    # videos of 3, 2 and 3 groups: offset 1 has 2 + 1 + 2 windows, offset 2 has 1 + 0 + 1
    assert [together[k].windows for k in (1, 2)] == [5, 2]
    for k in (1, 2):
        assert together[k].windows == sum(a[k].windows for a in alone)
        assert together[k].sq_error == pytest.approx(sum(a[k].sq_error for a in alone), rel=1e-5)
