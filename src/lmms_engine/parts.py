"""One way to build a run's parts: tokenizer -> model -> processor info -> datasets -> collator.

:func:`build_parts` serves the launcher's trainer blocks, the evaluator, the Python example and the
tests alike, for LLaVA-OneVision checkpoints (the tiny model too) and Qwen-VL checkpoints. It sits below
both the launcher and the evaluator, which import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from lmms_engine.utils.config import ConfigError

#: DatasetConfig keys that only Qwen-VL checkpoints read.
QWEN_ONLY_DATA_KEYS: tuple[str, ...] = ("video_min_pixels", "video_max_pixels", "video_total_pixels")


@dataclass
class RunParts:
    """What :func:`build_parts` returns.

    Attributes:
        tokenizer: the tiny tokenizer for the tiny model, else the checkpoint's (or the one passed in).
        model: the model (:func:`~lmms_engine.models.builder.build_model`), in train mode.
        train_dataset: the training split of ``dataset_config.data_path`` (None when not asked for).
        eval_dataset: ``dataset_config.eval_data_path``'s split when asked for, else None.
        collator: pads (or packs) samples into the model's batches.
        processing_class: what checkpoints save beside the weights: the tokenizer with the family's
            processor files (``AutoProcessor``; lmms-eval ``llava_hf`` for LLaVA-OneVision).
    """

    tokenizer: Any
    model: Any
    train_dataset: Any
    eval_dataset: Any
    collator: Any
    processing_class: Any


def build_parts(model_config: Any, dataset_config: Any, *, with_train: bool = True, with_eval: bool = False,
                tokenizer: Any = None, where: str = "trainer") -> RunParts:
    """Build the tokenizer, the model, the datasets and the collator of one run.

    Args:
        model_config: a :class:`~lmms_engine.models.builder.ModelConfig` or its mapping.
        dataset_config: a :class:`~lmms_engine.data.dataset.DatasetConfig` or its mapping.
        with_train, with_eval: build the ``data_path`` split / the ``eval_data_path`` split.
        tokenizer: use this tokenizer instead of :func:`~lmms_engine.models.builder.build_tokenizer`'s.
        where: how error messages name the block.

    Raises:
        ConfigError: a Qwen-VL-only dataset key for another model.
    """
    from lmms_engine.data.collator import build_collator
    from lmms_engine.data.dataset import DatasetConfig, build_dataset
    from lmms_engine.data.preprocess import ProcessorInfo
    from lmms_engine.export.processor import build_processing_class
    from lmms_engine.models.builder import ModelConfig, build_model, build_tokenizer
    from lmms_engine.models.qwen_vl_common import is_qwen_model
    from lmms_engine.utils.config import from_mapping

    if isinstance(model_config, Mapping):
        model_config = from_mapping(ModelConfig, model_config, f"{where}.model_config")
    if isinstance(dataset_config, Mapping):
        dataset_config = from_mapping(DatasetConfig, dataset_config, f"{where}.dataset_config")
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(model_config)
    model = build_model(model_config, tokenizer)
    if is_qwen_model(model):
        from lmms_engine.data.qwen_dataset import build_qwen_data

        from lmms_engine.export.qwen_processor import qwen_processing_class

        train_dataset, eval_dataset, collator = build_qwen_data(model.config, dataset_config, tokenizer,
                                                                with_train=with_train, with_eval=with_eval)
        processing = (train_dataset if train_dataset is not None else eval_dataset).processing
        processing_class = qwen_processing_class(tokenizer, model.config, processing, model_config.model_name_or_path,
                                                 max_image_pixels=dataset_config.max_image_pixels)
        return RunParts(tokenizer, model, train_dataset, eval_dataset, collator, processing_class)
    qwen_keys = [k for k in QWEN_ONLY_DATA_KEYS if getattr(dataset_config, k) is not None]
    if qwen_keys:
        raise ConfigError(f"{where}: dataset_config.{qwen_keys[0]} applies to Qwen-VL checkpoints only "
                          f"(this model is {model.config.model_type}); remove it")
    info = ProcessorInfo.from_model_config(model.config, layout=model.video_layout)
    train_dataset = build_dataset(dataset_config, tokenizer, info, split="train") if with_train else None
    eval_dataset = build_dataset(dataset_config, tokenizer, info, split="eval") if with_eval else None
    processing_class = build_processing_class(tokenizer, model, model_config.model_name_or_path)
    return RunParts(tokenizer, model, train_dataset, eval_dataset, build_collator(dataset_config, tokenizer),
                    processing_class)


__all__ = ["QWEN_ONLY_DATA_KEYS", "RunParts", "build_parts"]
