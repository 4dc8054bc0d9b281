"""Processor files in Qwen-VL checkpoints, so ``AutoProcessor.from_pretrained(checkpoint)`` works.

The source checkpoint's files (``preprocessor_config.json``, ``video_preprocessor_config.json``,
``processor_config.json``, ``chat_template.json``) are copied when it has them (a hub source that cannot
be read logs a warning), those it lacks are generated from the model config and the training's
processing (:class:`~lmms_engine.data.qwen_vision.QwenVideoProcessing`): patch, merge and temporal patch
sizes, mean/std, bicubic resizing. The training's pixel settings are written into copied and generated
files alike (:func:`pixel_settings`; also the older top-level ``min_pixels`` / ``max_pixels`` keys, which
transformers lets override ``size``, and the sub-processor entries of a nested ``processor_config.json``),
so processing with the saved files gives the sizes the model was trained on:

- video processor: per-frame ``min_pixels`` / ``max_pixels`` and the total budget ``total_pixels``.
  Qwen2-VL / Qwen2.5-VL's ``Qwen2VLVideoProcessor``: ``size`` = the per-frame bounds,
  ``cap_pixels_per_frame`` (the qwen-vl-utils rule the training applies) with ``max_video_tokens`` such
  that its budget ``int(max_video_tokens * factor**2 * 0.9)`` is ``total_pixels`` (no total: no cap).
  Qwen3-VL's ``Qwen3VLVideoProcessor`` counts ``size`` over all frames: ``shortest_edge`` = ``min_pixels``,
  ``max_video_tokens * factor**2`` = the per-frame ``max_pixels`` and ``longest_edge`` =
  ``temporal_patch_size * total_pixels`` (its per-frame share ``longest_edge // T`` is then the training's
  ``total_pixels * 2 / T``); without a total, ``max_pixels`` x the processor's ``max_frames``. Its 3-D
  resize rounds odd frame counts and checks the minimum over the whole video, so odd frame counts and
  frames below ``min_pixels`` can differ from the training's per-frame rule;
- image processor: the training's image bounds (the checkpoint's, ``image_min_pixels`` /
  ``image_max_pixels`` of the processing, the upper one lowered to ``dataset_config.max_image_pixels``).

The tokenizer is the training tokenizer, its ``processor_class`` the family's processor.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Mapping

from lmms_engine.export.processor import (
    IMAGE_PROCESSOR_FILE,
    NESTED_PROCESSOR_KEYS,
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


#: The frame budget qwen-vl-utils and transformers' Qwen2-VL video processor derive from ``max_video_tokens``.
_TOKEN_BUDGET_SHARE = 0.9


def _budget_tokens(total_pixels: int, factor: int) -> float:
    """The smallest ``max_video_tokens`` whose budget ``int(tokens * factor**2 * 0.9)`` is ``total_pixels``."""
    tokens = total_pixels / (factor * factor * _TOKEN_BUDGET_SHARE)
    if tokens == int(tokens) and int(int(tokens) * factor * factor * _TOKEN_BUDGET_SHARE) == total_pixels:
        return int(tokens)
    while int(tokens * factor * factor * _TOKEN_BUDGET_SHARE) < total_pixels:
        tokens = math.nextafter(tokens, math.inf)
    return tokens


def pixel_settings(family: str, processing: Any, video_file: Mapping[str, Any] | None = None,
                   max_image_pixels: int | None = None) -> tuple[dict, dict]:
    """(image processor keys, video processor keys) that reproduce the training's pixel settings
    (module docstring); ``video_file``: the video processor file they go into (its ``max_frames``);
    ``max_image_pixels``: ``dataset_config.max_image_pixels`` (lowers the images' upper bound)."""
    factor = processing.patch_size * processing.merge_size
    high = processing.image_max_pixels if max_image_pixels is None else min(processing.image_max_pixels,
                                                                             max_image_pixels)
    image = {"size": {"shortest_edge": min(processing.image_min_pixels, high), "longest_edge": high}}
    total = processing.total_pixels
    if family == "qwen3_vl":
        frames = int((video_file or {}).get("max_frames") or 768)  # Qwen3VLVideoProcessor's default
        longest = processing.temporal_patch_size * total if total is not None else processing.max_pixels * frames
        tokens = processing.max_pixels / (factor * factor)
        video = {"size": {"shortest_edge": processing.min_pixels, "longest_edge": longest},
                 "cap_pixels_per_frame": True, "max_video_tokens": int(tokens) if tokens == int(tokens) else tokens}
    else:
        video = {"size": {"shortest_edge": processing.min_pixels, "longest_edge": processing.max_pixels},
                 "cap_pixels_per_frame": total is not None}
        if total is not None:
            video["max_video_tokens"] = _budget_tokens(total, factor)
    return image, video


def _with_settings(data: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` (one processor's keys) with ``settings``; older top-level ``min_pixels`` / ``max_pixels``
    (which transformers lets override ``size``) set to the same bounds."""
    out = {**data, **settings}
    for key, edge in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
        if key in out:
            out[key] = settings["size"][edge]
    return out


def write_pixel_settings(files: Mapping[str, bytes], family: str, processing: Any,
                         max_image_pixels: int | None = None) -> dict[str, bytes]:
    """``files`` with the training's pixel settings (:func:`pixel_settings`) written into the image / video
    processor files and into the ``image_processor`` / ``video_processor`` entries of a nested
    ``processor_config.json``."""
    out = dict(files)
    video_data = json.loads(files[VIDEO_PROCESSOR_FILE]) if VIDEO_PROCESSOR_FILE in files else None
    image, video = pixel_settings(family, processing, video_data, max_image_pixels)
    for name, settings in ((IMAGE_PROCESSOR_FILE, image), (VIDEO_PROCESSOR_FILE, video)):
        if name in out:
            out[name] = _json_bytes(_with_settings(json.loads(out[name]), settings))
    if PROCESSOR_CONFIG_FILE in out:
        data = json.loads(out[PROCESSOR_CONFIG_FILE])
        nested = {key: _with_settings(data[key], settings)
                  for key, settings in ((NESTED_PROCESSOR_KEYS[IMAGE_PROCESSOR_FILE], image),
                                        (NESTED_PROCESSOR_KEYS[VIDEO_PROCESSOR_FILE], video))
                  if isinstance(data.get(key), dict)}
        if nested:
            out[PROCESSOR_CONFIG_FILE] = _json_bytes({**data, **nested})
    return out


def generate_qwen_processor_files(family: str, processing: Any, max_image_pixels: int | None = None) -> dict[str, bytes]:
    """The three processor files for ``family`` from the training's ``processing``."""
    processor, image_cls, video_cls = QWEN_PROCESSOR_CLASSES[family]
    common = {
        "do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "do_convert_rgb": True, "image_mean": list(processing.image_mean), "image_std": list(processing.image_std),
        "patch_size": processing.patch_size, "temporal_patch_size": processing.temporal_patch_size,
        "merge_size": processing.merge_size,
    }
    video = {**common, "video_processor_type": video_cls}
    if family == "qwen3_vl":
        video.update(fps=2, do_sample_frames=True)
    files = {IMAGE_PROCESSOR_FILE: _json_bytes({**common, "image_processor_type": image_cls}),
             VIDEO_PROCESSOR_FILE: _json_bytes(video),
             PROCESSOR_CONFIG_FILE: _json_bytes({"processor_class": processor})}
    return write_pixel_settings(files, family, processing, max_image_pixels)


def qwen_processing_class(tokenizer: Any, config: Any, processing: Any, source: str | None,
                          max_image_pixels: int | None = None) -> CheckpointProcessor:
    """The Trainer's ``processing_class`` for a Qwen-VL model (module docstring); ``max_image_pixels``:
    ``dataset_config.max_image_pixels``."""
    family = config.model_type
    files = generate_qwen_processor_files(family, processing, max_image_pixels)
    origin = {name: "generated" for name in files}
    if source:
        try:
            copied = source_processor_files(source)
        except Exception as err:  # noqa: BLE001 - offline/unknown repo must not stop training
            logger.warning("could not read the processor files of %r (%s: %s); generating them", source,
                           type(err).__name__, err)
            copied = {}
        files.update(write_pixel_settings(copied, family, processing, max_image_pixels))
        origin.update({name: f"source {source}, training's pixel settings" for name in copied})
    processor = json.loads(files.get(PROCESSOR_CONFIG_FILE, b"{}")).get("processor_class")
    return CheckpointProcessor(tokenizer, ProcessorFiles(files, origin),
                               processor_class=processor or QWEN_PROCESSOR_CLASSES[family][0])


__all__ = ["QWEN_PROCESSOR_CLASSES", "generate_qwen_processor_files", "pixel_settings", "qwen_processing_class",
           "write_pixel_settings"]
