"""The config class of checkpoints whose video layout plain transformers cannot reproduce.

A module of its own, importing only transformers' config classes, so that config checks (``--dry-run``)
can read such a checkpoint's ``config.json`` with ``AutoConfig`` without loading any model code.
"""

from __future__ import annotations

from transformers import AutoConfig, LlavaOnevisionConfig

#: ``model_type`` of checkpoints whose video layout plain transformers cannot reproduce.
LLAVA_VIDEO_MODEL_TYPE = "lmms_video_llava"
#: The ``model_type`` values of checkpoints this class loads.
LLAVA_MODEL_TYPES: tuple[str, ...] = ("llava_onevision", LLAVA_VIDEO_MODEL_TYPE)


class LlavaVideoConfig(LlavaOnevisionConfig):
    """The config class of a model whose video layout plain transformers cannot reproduce (any layout
    but bilinear stride 2 with one newline token, no faster frames).

    Identical to ``LlavaOnevisionConfig`` but for ``model_type`` (``lmms_video_llava``), so such a
    checkpoint does not silently load in plain transformers with the wrong video-token layout (e.g. 129
    tokens built where 53 were trained): ``AutoConfig`` / ``AutoModel*`` / ``pipeline`` (and lmms-eval's
    ``llava_hf``) refuse the unknown model type, and ``LlavaOnevisionForConditionalGeneration.from_pretrained``
    warns that the checkpoint is of another type. Importing ``lmms_engine.models.llava_video`` registers it
    with ``AutoConfig``; :class:`LlavaVideoForConditionalGeneration` picks the class from the layout.
    """

    model_type = LLAVA_VIDEO_MODEL_TYPE


AutoConfig.register(LLAVA_VIDEO_MODEL_TYPE, LlavaVideoConfig)


__all__ = ["LLAVA_MODEL_TYPES", "LLAVA_VIDEO_MODEL_TYPE", "LlavaVideoConfig"]
