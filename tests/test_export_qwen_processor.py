"""Processor files of Qwen-VL checkpoints carry the training's pixel settings, copied or generated."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

from lmms_engine.data.qwen_vision import QwenVideoProcessing
from lmms_engine.export.qwen_processor import pixel_settings, qwen_processing_class

torch.set_num_threads(1)

#: A source's files as the hub checkpoints hold them: Qwen2.5-VL's flat image processor with the older
#: top-level pixel keys; Qwen3-VL's image + video processor files with ``size``.
SOURCE_FILES = {
    "qwen2_5_vl": {"preprocessor_config.json": {
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "do_convert_rgb": True, "do_resize": True}},
    "qwen3_vl": {
        "preprocessor_config.json": {
            "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen3VLProcessor",
            "size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16, "temporal_patch_size": 2,
            "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 3,
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
            "do_resize": True},
        "video_preprocessor_config.json": {
            "video_processor_type": "Qwen3VLVideoProcessor", "processor_class": "Qwen3VLProcessor",
            "size": {"longest_edge": 25165824, "shortest_edge": 4096}, "fps": 2, "max_frames": 768,
            "min_frames": 4, "do_sample_frames": True, "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}},
}


def _source(folder: Path, checkpoint: Path, family: str, nested: bool = False) -> Path:
    """The tiny checkpoint's config and tokenizer plus hub-style processor files (or, ``nested``, one
    ``processor_config.json`` holding both sub-processors as transformers 5 writes it)."""
    import shutil

    shutil.copytree(checkpoint, folder)
    files = SOURCE_FILES[family]
    if nested:
        video = files.get("video_preprocessor_config.json", {"video_processor_type": "Qwen2VLVideoProcessor",
                                                              "size": {"shortest_edge": 3136, "longest_edge": 9999}})
        data = {"processor_class": files["preprocessor_config.json"]["processor_class"],
                "image_processor": files["preprocessor_config.json"], "video_processor": video}
        (folder / "processor_config.json").write_text(json.dumps(data))
    else:
        for name, data in files.items():
            (folder / name).write_text(json.dumps(data))
    return folder


def _save(family: str, source: Path, processing: QwenVideoProcessing, out: Path,
          max_image_pixels: int | None = None) -> dict[str, dict]:
    config, tokenizer = AutoConfig.from_pretrained(source), AutoTokenizer.from_pretrained(source)
    assert config.model_type == family
    qwen_processing_class(tokenizer, config, processing, str(source), max_image_pixels).save_pretrained(out)
    return {p.name: json.loads(p.read_text()) for p in out.glob("*config.json")}


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_copied_files_get_the_trainings_pixels_and_keep_the_rest(tmp_path_factory, tmp_path, family):
    from qwen_support import tiny_checkpoint

    source = _source(tmp_path / "source", tiny_checkpoint(tmp_path_factory, family), family)
    config = AutoConfig.from_pretrained(source)
    f = config.vision_config.patch_size * config.vision_config.spatial_merge_size
    processing = QwenVideoProcessing.for_model(config, min_pixels=4 * f * f, max_pixels=12 * f * f,
                                               total_pixels=40 * f * f)
    # images: the source's bounds (read by the training's processing), the upper one lowered by
    # dataset_config.max_image_pixels to 6000 px
    source_image = SOURCE_FILES[family]["preprocessor_config.json"]
    low = source_image.get("min_pixels") or source_image["size"]["shortest_edge"]
    assert (processing.image_min_pixels, processing.image_max_pixels) == \
        (low, source_image.get("max_pixels") or source_image["size"]["longest_edge"])
    high = 6000
    saved = _save(family, source, processing, tmp_path / "out", max_image_pixels=high)
    image_file, video_file = saved["preprocessor_config.json"], saved["video_preprocessor_config.json"]
    assert image_file["size"] == {"shortest_edge": min(low, high), "longest_edge": high}
    low = min(low, high)
    if family == "qwen2_5_vl":
        # the older keys override `size` in transformers: they hold the same bounds; the rest is the source's
        assert (image_file["min_pixels"], image_file["max_pixels"]) == (low, high)
        assert image_file["image_mean"] == SOURCE_FILES[family]["preprocessor_config.json"]["image_mean"]
        # the source had no video file: generated with the training's settings (per frame 4..12 windows of
        # 28 x 28 px; budget 40 windows' worth: int(max_video_tokens * 28 * 28 * 0.9) == 40 * 784)
        assert video_file["video_processor_type"] == "Qwen2VLVideoProcessor"
        assert video_file["size"] == {"shortest_edge": 4 * 784, "longest_edge": 12 * 784}
        assert video_file["cap_pixels_per_frame"] is True
        assert int(video_file["max_video_tokens"] * 784 * 0.9) == 40 * 784
    else:
        # Qwen3-VL counts `size` over all frames: per-frame share longest_edge // T == 2 * total / T,
        # per-frame cap max_video_tokens * 32^2 == 12 windows; fps / frame counts stay the source's
        assert video_file["size"] == {"shortest_edge": 4 * 1024, "longest_edge": 2 * 40 * 1024}
        assert video_file["max_video_tokens"] == 12 and video_file["cap_pixels_per_frame"] is True
        assert (video_file["fps"], video_file["max_frames"], video_file["min_frames"]) == (2, 768, 4)
    # the image processor loads here (its video twin needs torchvision) and gives the training's patches
    image = torch.randint(0, 256, (3, 100, 150), dtype=torch.uint8)
    loaded = AutoImageProcessor.from_pretrained(tmp_path / "out")
    patches = loaded(images=[Image.fromarray(image.permute(1, 2, 0).numpy())], return_tensors="pt")
    ours = processing.preprocess_image(image, processing.image_size(100, 150, high))
    assert patches["image_grid_thw"].tolist() == [list(ours.grid_thw)]
    assert torch.equal(patches["pixel_values"], ours.pixel_values)
    # the source's own files would have given other patches (the point of writing the settings)
    original = AutoImageProcessor.from_pretrained(source)(images=[Image.fromarray(image.permute(1, 2, 0).numpy())],
                                                          return_tensors="pt")
    assert original["pixel_values"].shape != patches["pixel_values"].shape


def test_nested_processor_config_and_no_total_budget(tmp_path_factory, tmp_path):
    from qwen_support import tiny_checkpoint

    family = "qwen3_vl"
    source = _source(tmp_path / "source", tiny_checkpoint(tmp_path_factory, family), family, nested=True)
    config = AutoConfig.from_pretrained(source)
    processing = QwenVideoProcessing.for_model(config, min_pixels=4 * 1024, max_pixels=8 * 1024)
    processing = dataclasses.replace(processing, total_pixels=None)
    saved = _save(family, source, processing, tmp_path / "out")
    nested = saved["processor_config.json"]
    assert nested["processor_class"] == "Qwen3VLProcessor"
    # no total: the per-frame cap alone (longest_edge covers the processor's 768 frames at the cap)
    assert nested["video_processor"]["size"] == {"shortest_edge": 4 * 1024, "longest_edge": 8 * 1024 * 768}
    assert nested["video_processor"]["max_video_tokens"] == 8 and nested["video_processor"]["fps"] == 2
    image, video = pixel_settings(family, processing, nested["video_processor"])
    # the training's image bounds (transformers' defaults here: the source has no flat preprocessor_config.json)
    assert nested["image_processor"]["size"] == image["size"] == {"shortest_edge": processing.image_min_pixels,
                                                                  "longest_edge": processing.image_max_pixels}
    # generated flat files for what the source lacked hold the same settings
    assert saved["video_preprocessor_config.json"]["size"] == video["size"]


def test_qwen2_budget_tokens_reproduce_every_total():
    from lmms_engine.export.qwen_processor import _budget_tokens

    for factor in (28, 32):
        for total in (1, 40 * factor * factor, 12345677, int(0.9 * 128000 * factor * factor)):
            tokens = _budget_tokens(total, factor)
            assert int(tokens * factor * factor * 0.9) == total, (factor, total, tokens)
    assert _budget_tokens(int(0.9 * 128000 * 28 * 28), 28) == 128000  # transformers' default stays an int
