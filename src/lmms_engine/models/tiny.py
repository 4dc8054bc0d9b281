"""A tiny LLaVA-OneVision config (SigLIP + Qwen2, random weights) built fully offline.

Used by the tests and the quickstart: a forward+backward on 2 videos x 8 frames takes milliseconds on
one CPU core. The vision tower sees 64 px frames in 8 px patches (an 8x8 patch grid); the LLM has
hidden size 64. Vocabulary size and special token ids come from a tokenizer (the engine's tiny BPE
tokenizer, or any HF tokenizer with ``<video>`` and ``<image>`` tokens) or are given explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from lmms_engine.utils.config import ConfigError, check_keys

if TYPE_CHECKING:
    from transformers import LlavaOnevisionConfig, PreTrainedTokenizerBase

TINY_VISION_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 64,
    "patch_size": 8,
    # LLaVA-OneVision's SigLIP has no pooling head: the LLM reads patch features, never a pooled vector.
    "vision_use_head": False,
}
TINY_TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
}
# Used when neither a tokenizer nor explicit ids are given.
TINY_VOCAB_SIZE = 512
TINY_IMAGE_TOKEN_ID = 510
TINY_VIDEO_TOKEN_ID = 511
TINY_PAD_TOKEN_ID = 0


@dataclass
class TinyConfig:
    """Overrides of the tiny model (the ``model_config.tiny_config`` block).

    ``vision_config`` / ``text_config`` update :data:`TINY_VISION_CONFIG` / :data:`TINY_TEXT_CONFIG`
    (keys of ``SiglipVisionConfig`` / ``Qwen2Config``). Ids left ``None`` come from the tokenizer, else
    from the ``TINY_*`` constants. ``vision_feature_layer``: the tower layer the LLM (and a shared
    autoregressive target) reads; ``-1`` is LLaVA-OneVision's choice, ``0`` the patch embeddings, a
    linear function of the pixels (the untrained tiny tower's deeper layers mix them randomly); a list
    of layers is read concatenated.
    """

    vision_config: dict = field(default_factory=dict)
    text_config: dict = field(default_factory=dict)
    vision_feature_layer: int | list[int] = -1
    vocab_size: int | None = None
    video_token_id: int | None = None
    image_token_id: int | None = None
    pad_token_id: int | None = None
    eos_token_id: int | None = None
    bos_token_id: int | None = None


def _token_id(tokenizer: "PreTrainedTokenizerBase", token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (tokenizer.unk_token_id is not None and token_id == tokenizer.unk_token_id):
        raise ConfigError(f"the tokenizer has no {token!r} token; add it as a special token first")
    return int(token_id)


def _checked_overrides(overrides: Mapping[str, Any], config_cls: type, where: str) -> dict[str, Any]:
    check_keys(overrides, config_cls().to_dict().keys(), where)
    return dict(overrides)


def tiny_llava_config(
    tokenizer: "PreTrainedTokenizerBase | None" = None,
    overrides: TinyConfig | Mapping[str, Any] | None = None,
) -> "LlavaOnevisionConfig":
    """The tiny LLaVA-OneVision config.

    Args:
        tokenizer: gives ``vocab_size = len(tokenizer)``, the ids of ``<video>`` / ``<image>`` and the
            pad/eos/bos ids.
        overrides: a :class:`TinyConfig` or its dict form; explicit values win over the tokenizer's.

    Returns:
        ``LlavaOnevisionConfig`` with ``vision_feature_select_strategy="full"``,
        ``vision_feature_layer=-1`` (LLaVA-OneVision's own choice; see :class:`TinyConfig`) and
        ``image_grid_pinpoints=[[image_size, image_size]]`` (one tile per image at tiny sizes).
    """
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    from lmms_engine.utils.config import from_mapping

    if overrides is None:
        tiny = TinyConfig()
    elif isinstance(overrides, TinyConfig):
        tiny = overrides
    else:
        tiny = from_mapping(TinyConfig, overrides, "model_config.tiny_config")
    vision = {**TINY_VISION_CONFIG,
              **_checked_overrides(tiny.vision_config, SiglipVisionConfig, "model_config.tiny_config.vision_config")}
    text = {**TINY_TEXT_CONFIG,
            **_checked_overrides(tiny.text_config, Qwen2Config, "model_config.tiny_config.text_config")}

    ids: dict[str, int | None] = {
        "vocab_size": TINY_VOCAB_SIZE,
        "video_token_id": TINY_VIDEO_TOKEN_ID,
        "image_token_id": TINY_IMAGE_TOKEN_ID,
        "pad_token_id": TINY_PAD_TOKEN_ID,
        "eos_token_id": None,
        "bos_token_id": None,
    }
    if tokenizer is not None:
        ids.update(
            vocab_size=len(tokenizer),
            video_token_id=_token_id(tokenizer, "<video>"),
            image_token_id=_token_id(tokenizer, "<image>"),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
    for key in ids:
        if getattr(tiny, key) is not None:
            ids[key] = getattr(tiny, key)
    vocab_size = int(ids["vocab_size"])
    if tokenizer is not None and vocab_size < len(tokenizer):
        raise ConfigError(f"model_config.tiny_config.vocab_size={vocab_size} is smaller than the tokenizer's "
                          f"{len(tokenizer)} tokens")
    for key in ("video_token_id", "image_token_id", "pad_token_id", "eos_token_id", "bos_token_id"):
        value = ids[key]
        if value is not None and not 0 <= value < vocab_size:
            raise ConfigError(f"model_config.tiny_config.{key}={value} is outside the vocabulary [0, {vocab_size})")
    if ids["video_token_id"] == ids["image_token_id"]:
        raise ConfigError(f"video_token_id and image_token_id must differ, both are {ids['video_token_id']}")

    text_config = Qwen2Config(
        **text,
        vocab_size=vocab_size,
        pad_token_id=ids["pad_token_id"],
        eos_token_id=ids["eos_token_id"],
        bos_token_id=ids["bos_token_id"],
    )
    vision_config = SiglipVisionConfig(**vision)
    size = vision_config.image_size
    return LlavaOnevisionConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=ids["image_token_id"],
        video_token_index=ids["video_token_id"],
        vision_feature_select_strategy="full",
        vision_feature_layer=tiny.vision_feature_layer,
        image_grid_pinpoints=[[size, size]],
        tie_word_embeddings=False,
    )


__all__ = ["TINY_TEXT_CONFIG", "TINY_VISION_CONFIG", "TinyConfig", "tiny_llava_config"]
