"""Processor files in Qwen-VL checkpoints, so ``AutoProcessor.from_pretrained(checkpoint)`` works.

The source checkpoint's files (``preprocessor_config.json``, ``video_preprocessor_config.json``,
``processor_config.json``, ``chat_template.json``) are copied as they are when it has them (a hub source
that cannot be read logs a warning); otherwise they are generated from the model config and the
training's video processing (:class:`~lmms_engine.data.qwen_vision.QwenVideoProcessing`): patch, merge
and temporal patch sizes, mean/std, bicubic resizing and the per-frame ``min_pixels`` / ``max_pixels``
(Qwen3-VL's video processor counts its ``size`` over all frames of a video: its ``longest_edge`` is
then the training's ``total_pixels`` when set). The tokenizer is the training tokenizer, its
``processor_class`` the family's processor.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from lmms_engine.export.processor import (
    IMAGE_PROCESSOR_FILE,
    PROCESSOR_CONFIG_FILE,
    VIDEO_PROCESSOR_FILE,
    CheckpointProcessor,
    ProcessorFiles,
    _json_bytes,
    source_processor_files,
)

logger = logging.getLogger(__name__)

#: (processor, image processor, video processor) class names per family.
QWEN_PROCESSOR_CLASSES: dict[str, tuple[str, str, str]] = {
    "qwen2_vl": ("Qwen2VLProcessor", "Qwen2VLImageProcessor", "Qwen2VLVideoProcessor"),
    "qwen2_5_vl": ("Qwen2_5_VLProcessor", "Qwen2VLImageProcessor", "Qwen2VLVideoProcessor"),
    "qwen3_vl": ("Qwen3VLProcessor", "Qwen2VLImageProcessor", "Qwen3VLVideoProcessor"),
}


def generate_qwen_processor_files(family: str, processing: Any) -> dict[str, bytes]:
    """The three processor files for ``family`` from the training's ``processing``."""
    processor, image_cls, video_cls = QWEN_PROCESSOR_CLASSES[family]
    common = {
        "do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "do_convert_rgb": True, "image_mean": list(processing.image_mean), "image_std": list(processing.image_std),
        "patch_size": processing.patch_size, "temporal_patch_size": processing.temporal_patch_size,
        "merge_size": processing.merge_size,
    }
    image = {**common, "image_processor_type": image_cls,
             "size": {"shortest_edge": processing.min_pixels, "longest_edge": processing.max_pixels}}
    video_size = {"shortest_edge": processing.min_pixels, "longest_edge": processing.max_pixels}
    if family == "qwen3_vl" and processing.total_pixels is not None:
        video_size["longest_edge"] = processing.total_pixels
    video = {**common, "video_processor_type": video_cls, "size": video_size}
    if family == "qwen3_vl":
        video.update(fps=2, do_sample_frames=True)
    return {IMAGE_PROCESSOR_FILE: _json_bytes(image), VIDEO_PROCESSOR_FILE: _json_bytes(video),
            PROCESSOR_CONFIG_FILE: _json_bytes({"processor_class": processor})}


def qwen_processing_class(tokenizer: Any, config: Any, processing: Any, source: str | None) -> CheckpointProcessor:
    """The Trainer's ``processing_class`` for a Qwen-VL model (module docstring)."""
    family = config.model_type
    files = generate_qwen_processor_files(family, processing)
    origin = {name: "generated" for name in files}
    if source:
        try:
            copied = source_processor_files(source)
        except Exception as err:  # noqa: BLE001 - offline/unknown repo must not stop training
            logger.warning("could not read the processor files of %r (%s: %s); generating them", source,
                           type(err).__name__, err)
            copied = {}
        if copied:
            files, origin = dict(copied), {name: f"source {source}" for name in copied}
    processor = json.loads(files.get(PROCESSOR_CONFIG_FILE, b"{}")).get("processor_class")
    return CheckpointProcessor(tokenizer, ProcessorFiles(files, origin),
                               processor_class=processor or QWEN_PROCESSOR_CLASSES[family][0])


__all__ = ["QWEN_PROCESSOR_CLASSES", "generate_qwen_processor_files", "qwen_processing_class"]
