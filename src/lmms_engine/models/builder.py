"""Build the video LLM from the YAML ``model_config`` block.

``build_model(model_config, tokenizer=None)`` loads a LLaVA-OneVision checkpoint (path or hub id) or
builds the tiny offline model, sets the video-token layout, applies freezing, attaches the
autoregressive module (after freezing, so ``target_encoder: auto`` sees the frozen tower) and turns
on gradient checkpointing.

Layout keys (``mm_spatial_pool_stride``, ``mm_spatial_pool_mode``, ``add_faster_video``) may be given in
``model_config`` and, with ``enable_multiscale_pooling: true``, in ``model_config.autoregressive_config``
(LLaVA-NeXT's names; that block then sets the layout, its defaults included). The layout is one fact:
two different values for one key is a :class:`~lmms_engine.utils.config.ConfigError` naming both
places. Keys left unset keep the checkpoint's stored layout, else HF LLaVA-OneVision's own
(bilinear, stride 2, one newline token after the video).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Mapping

from lmms_engine.models.layout import LAYOUT_FIELDS, VideoLayoutConfig
from lmms_engine.models.lora import LoraSettings
from lmms_engine.models.tiny import TinyConfig
from lmms_engine.utils.config import ConfigError, from_mapping

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

AttnImplementation = Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"]


@dataclass
class ModelConfig:
    """The ``model_config`` block.

    Attributes:
        model_name_or_path: a checkpoint in HF format (local folder or hub id): LLaVA-OneVision (e.g.
            ``llava-hf/llava-onevision-qwen2-0.5b-ov-hf``), Qwen2.5-VL (``Qwen/Qwen2.5-VL-7B-Instruct``) or
            Qwen3-VL (``Qwen/Qwen3-VL-8B-Instruct``) or Qwen2-VL, picked by its ``model_type``; None builds the tiny
            offline LLaVA-OneVision model (tiny Qwen-VL folders: ``python -m lmms_engine.models.qwen_tiny``).
        tiny_config: overrides of the tiny model (:class:`~lmms_engine.models.tiny.TinyConfig`); only
            without ``model_name_or_path``.
        torch_dtype: parameter dtype; ``auto`` = the checkpoint's (float32 for the tiny model).
        attn_implementation: LLM/tower attention kernel; None = transformers' default (sdpa).
        mm_spatial_pool_stride, mm_spatial_pool_mode, mm_newline_position, add_faster_video,
            faster_token_stride: the video-token layout (:class:`VideoLayoutConfig`); None = the
            checkpoint's stored value, else the default. LLaVA-OneVision only (a config error for Qwen-VL,
            whose layout is one token per 2x2 merge window).
        freeze_vision_tower: default True (LLaVA-OneVision/LLaVA-Video fine-tuning mostly keeps SigLIP
            fixed; it also lets the autoregressive targets share the tower). The tower's unused
            ``post_layernorm``/``head`` are frozen in every case (DDP).
        freeze_projector: freezes the projector, ``image_newline`` and ``faster_token``.
        freeze_language_model: freezes the LLM and ``lm_head``.
        freeze_autoregressive: freezes the autoregressive predictor (a trained predictor kept fixed: its loss
            then trains only what feeds it, the LLM's hidden states).
        gradient_checkpointing: activation checkpointing of the LLM and tower layers.
        enable_autoregressive: attach the autoregressive module; None = as the checkpoint has it
            (False for an HF checkpoint or the tiny model), or True when ``autoregressive_config`` is given.
        lora: LoRA adapters on the language model (:class:`~lmms_engine.models.lora.LoraSettings`: ``r``,
            ``alpha``, ``dropout``, ``target_modules``; needs the ``lora`` extra); the LLM's base weights
            freeze, the projector and the autoregressive predictor train in full. None = no LoRA.
        autoregressive_config: the module's keys (``AutoregressiveConfig``); ``embedding_dim`` defaults to
            the tower's feature size; ``vision_feature_layer``/``vision_feature_select_strategy`` come from
            the model.
    """

    model_name_or_path: str | None = None
    tiny_config: TinyConfig | None = None
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: AttnImplementation | None = None
    mm_spatial_pool_stride: int | None = None
    mm_spatial_pool_mode: Literal["average", "max", "bilinear"] | None = None
    mm_newline_position: Literal["grid", "frame", "one_token", "no_token"] | None = None
    add_faster_video: bool | None = None
    faster_token_stride: int | None = None
    freeze_vision_tower: bool = True
    freeze_projector: bool = False
    freeze_language_model: bool = False
    freeze_autoregressive: bool = False
    gradient_checkpointing: bool = False
    lora: dict | None = None
    enable_autoregressive: bool | None = None
    autoregressive_config: dict | None = None

    def layout_keys(self) -> dict[str, Any]:
        """The video-layout keys this block sets (the others are None: the checkpoint's or the default)."""
        return {key: getattr(self, key) for key in LAYOUT_FIELDS if getattr(self, key) is not None}

    def __post_init__(self) -> None:
        if self.lora is not None:
            from_mapping(LoraSettings, self.lora, "model_config.lora")  # checked now, before any model is built
        if self.model_name_or_path is not None and self.tiny_config is not None:
            raise ValueError("tiny_config only applies without model_name_or_path (the tiny model); remove one")
        if self.enable_autoregressive is False and self.autoregressive_config is not None:
            logger.info("model_config.enable_autoregressive is false: autoregressive_config only sets the layout")


def resolve_video_layout(
    layout_keys: Mapping[str, Any],
    autoregressive: Mapping[str, Any] | None = None,
    stored: Mapping[str, Any] | None = None,
    where: str = "model_config",
    *,
    ar_where: str | None = None,
    unused_is_error: bool = True,
) -> VideoLayoutConfig:
    """The one resolution of the video layout, for the launcher's check, :func:`build_model` and
    ``attach_autoregressive_module``: ``layout_keys`` (the keys set where the layout is owned:
    :meth:`ModelConfig.layout_keys`, or a built model's whole layout) and, with
    ``enable_multiscale_pooling: true``, the layout keys of the ``autoregressive`` block (raw keys, checked
    as :class:`AutoregressiveConfig`), over the checkpoint's ``stored`` layout, over the defaults.

    ``where`` names the place of ``layout_keys`` in messages, ``ar_where`` the block's
    (default ``{where}.autoregressive_config``).

    Raises:
        ConfigError: a key with different values in ``layout_keys`` and the block (with
            ``enable_multiscale_pooling: true``), or, with ``unused_is_error``, a layout key the block sets
            that differs from the layout while ``enable_multiscale_pooling`` is off (it would have no
            effect; off for a stored block, which holds every key).
    """
    from lmms_engine.models.autoregressive_config import LAYOUT_KEYS, AutoregressiveConfig

    raw_ar = dict(autoregressive or {})
    ar_where = ar_where or f"{where}.autoregressive_config"
    ar_overrides: dict[str, Any] = {}
    if raw_ar:
        ar_overrides = AutoregressiveConfig.from_dict(raw_ar, ar_where).layout_overrides()
    for key, value in ar_overrides.items():
        if key in layout_keys and layout_keys[key] != value:
            origin = "" if key in raw_ar else " (its default)"
            raise ConfigError(
                f"{where}.{key}={layout_keys[key]!r} disagrees with {ar_where}.{key}={value!r}{origin}; with "
                f"enable_multiscale_pooling: true the autoregressive_config keys set the video layout when the "
                f"model is built: give one value in one place"
            )
    merged = {**VideoLayoutConfig().to_dict(), **dict(stored or {}), **ar_overrides, **layout_keys}
    layout = from_mapping(VideoLayoutConfig, merged, f"{where} (video layout)")
    if not ar_overrides and unused_is_error:
        for key in LAYOUT_KEYS:
            if key in raw_ar and raw_ar[key] != getattr(layout, key):
                raise ConfigError(
                    f"{ar_where}.{key}={raw_ar[key]!r} differs from the model's video layout "
                    f"{key}={getattr(layout, key)!r} and has no effect while enable_multiscale_pooling is false; "
                    f"set enable_multiscale_pooling: true to make it set the layout, or remove it"
                )
    return layout


def _torch_dtype(name: str, tiny: bool) -> Any:
    import torch

    if name == "auto":
        return torch.float32 if tiny else "auto"
    return getattr(torch, name)


def _check_tokenizer(hf_config: Any, tokenizer: "PreTrainedTokenizerBase", where: str) -> None:
    for token, key in (("<video>", "video_token_id"), ("<image>", "image_token_id")):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            if key == "video_token_id":
                raise ConfigError(f"the tokenizer has no {token!r} token, which {where} uses as its video placeholder")
            continue
        if token_id != getattr(hf_config, key):
            raise ConfigError(
                f"the tokenizer's {token!r} id {token_id} differs from {where}'s {key}={getattr(hf_config, key)}; "
                f"use the checkpoint's own tokenizer"
            )


def autoregressive_plan(cfg: ModelConfig, hf_config: Any) -> tuple[bool, bool, dict[str, Any]]:
    """``(enable, restore, autoregressive_config)`` for the checkpoint config ``hf_config`` (updated in
    place): ``restore`` = the checkpoint holds the module's weights, so the model builds it inside
    ``__init__`` with the stored target mode; otherwise an enabled module is attached after freezing.
    The same rule for every model family."""
    from lmms_engine.models.autoregressive_config import CONFIG_AR_ENABLE_KEY, CONFIG_AR_KEY

    stored_enabled = bool(getattr(hf_config, CONFIG_AR_ENABLE_KEY, False))
    stored_ar = dict(getattr(hf_config, CONFIG_AR_KEY, None) or {}) if stored_enabled else {}
    enable = cfg.enable_autoregressive
    if enable is None:
        enable = stored_enabled or cfg.autoregressive_config is not None
    ar_config = {**stored_ar, **dict(cfg.autoregressive_config or {})}
    restore = enable and stored_enabled
    if restore:
        asked = (cfg.autoregressive_config or {}).get("target_encoder", "auto")
        stored_mode = stored_ar.get("target_encoder")
        if asked != "auto" and asked != stored_mode:
            raise ConfigError(
                f"model_config.autoregressive_config.target_encoder={asked!r} differs from the checkpoint's "
                f"{stored_mode!r}; a checkpoint's target encoder cannot be switched"
            )
        if stored_mode == "shared" and not cfg.freeze_vision_tower:
            raise ConfigError(
                "the checkpoint's autoregressive module shares the vision tower (target_encoder: shared), "
                "which needs model_config.freeze_vision_tower: true"
            )
        ar_config["target_encoder"] = stored_mode
        setattr(hf_config, CONFIG_AR_ENABLE_KEY, True)
        setattr(hf_config, CONFIG_AR_KEY, ar_config)
    else:
        setattr(hf_config, CONFIG_AR_ENABLE_KEY, False)
        setattr(hf_config, CONFIG_AR_KEY, None)
    return enable, restore, ar_config


def finish_model(model: Any, cfg: ModelConfig, tokenizer: Any, enable: bool, restore: bool,
                 ar_config: dict[str, Any]) -> Any:
    """After loading, for every family: grow the vocabulary to the tokenizer's, freeze per
    ``model_config``, attach the autoregressive module (after freezing), activation checkpointing, train
    mode."""
    if tokenizer is not None and len(tokenizer) > model.config.text_config.vocab_size:
        logger.warning("growing the vocabulary from %d to the tokenizer's %d tokens",
                       model.config.text_config.vocab_size, len(tokenizer))
        model.resize_token_embeddings(len(tokenizer))
    model.set_trainable(
        vision_tower=not cfg.freeze_vision_tower,
        projector=not cfg.freeze_projector,
        language_model=not cfg.freeze_language_model,
    )
    if enable and not restore:
        model.attach_autoregressive_module(ar_config)
    module = getattr(model, "autoregressive_module", None)
    if cfg.freeze_autoregressive:
        if module is None:
            raise ConfigError("model_config.freeze_autoregressive: the model has no autoregressive module")
        module.requires_grad_(False)
    if cfg.lora is not None:
        from lmms_engine.models.lora import inject_lora

        inject_lora(model, cfg.lora)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable()
    model.train()
    return model


def build_tokenizer(model_config: Any) -> Any:
    """The tiny BPE tokenizer for the tiny model, else the checkpoint's own tokenizer."""
    if model_config.model_name_or_path is None:
        from lmms_engine.data.tokenizer import build_tiny_tokenizer

        return build_tiny_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_config.model_name_or_path)


def build_model(
    model_config: ModelConfig | Mapping[str, Any] | None = None,
    tokenizer: "PreTrainedTokenizerBase | None" = None,
) -> Any:
    """Build (or load) the video LLM described by ``model_config``.

    The family follows the checkpoint's ``model_type``: ``llava_onevision`` (and the tiny model) ->
    :class:`~lmms_engine.models.llava_video.LlavaVideoForConditionalGeneration`; ``qwen2_5_vl`` /
    ``qwen3_vl`` (and ``qwen2_vl``) -> :func:`lmms_engine.models.qwen_vl_common.build_qwen_model`.

    Args:
        model_config: a :class:`ModelConfig` or its dict form (the YAML block).
        tokenizer: for the tiny model, gives the vocabulary size and special ids; for a checkpoint, its
            video/image placeholder ids must match the checkpoint's and the embeddings grow when it has
            more tokens than the checkpoint's vocabulary.

    Returns:
        The family's model class, in train mode.
    """
    from transformers import AutoConfig

    from lmms_engine.data.qwen_vision import QWEN_FAMILIES
    from lmms_engine.models.llava_video import CONFIG_LAYOUT_KEY, LlavaVideoForConditionalGeneration
    from lmms_engine.models.tiny import tiny_llava_config

    if isinstance(model_config, ModelConfig):
        cfg = model_config
    else:
        cfg = from_mapping(ModelConfig, model_config, "model_config")
    tiny = cfg.model_name_or_path is None
    if tiny:
        hf_config = tiny_llava_config(tokenizer, cfg.tiny_config)
    else:
        from lmms_engine.models.llava_video_config import LLAVA_MODEL_TYPES  # registers lmms_video_llava

        hf_config = AutoConfig.from_pretrained(cfg.model_name_or_path)
        if hf_config.model_type in QWEN_FAMILIES:
            from lmms_engine.models.qwen_vl_common import build_qwen_model

            return build_qwen_model(cfg, hf_config, tokenizer)
        if hf_config.model_type not in LLAVA_MODEL_TYPES:
            raise ConfigError(
                f"model_config.model_name_or_path={cfg.model_name_or_path!r} is a {hf_config.model_type!r} "
                f"checkpoint; supported: LLaVA-OneVision (llava_onevision, or lmms_video_llava: ours with a "
                f"layout plain transformers cannot reproduce), Qwen2-VL (qwen2_vl), Qwen2.5-VL (qwen2_5_vl), "
                f"Qwen3-VL (qwen3_vl)"
            )
        if tokenizer is not None:
            _check_tokenizer(hf_config, tokenizer, repr(cfg.model_name_or_path))

    layout = resolve_video_layout(cfg.layout_keys(), cfg.autoregressive_config, getattr(hf_config, CONFIG_LAYOUT_KEY, None))
    setattr(hf_config, CONFIG_LAYOUT_KEY, layout.to_dict())
    enable, restore, ar_config = autoregressive_plan(cfg, hf_config)

    kwargs: dict[str, Any] = {"dtype": _torch_dtype(cfg.torch_dtype, tiny)}
    if cfg.attn_implementation is not None:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if tiny:
        model = LlavaVideoForConditionalGeneration._from_config(hf_config, **kwargs)
    else:
        model = LlavaVideoForConditionalGeneration.from_pretrained(cfg.model_name_or_path, config=hf_config, **kwargs)
    return finish_model(model, cfg, tokenizer, enable, restore, ar_config)


__all__ = ["LAYOUT_FIELDS", "ModelConfig", "autoregressive_plan", "build_model", "build_tokenizer", "finish_model", "resolve_video_layout"]
