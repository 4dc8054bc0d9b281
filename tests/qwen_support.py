"""Shared pieces of the Qwen-VL tests: one tiny checkpoint per family, coded clips and a small dataset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from clips import make_clip

torch.set_num_threads(1)

#: A small autoregressive module (the tiny towers are 64 wide); two temporal groups of history.
QWEN_AR: dict[str, Any] = {"num_hist": 2, "loss_weight": 0.5, "num_heads": 4, "num_layers": 1}
_CACHE: dict[str, Path] = {}


def tiny_checkpoint(tmp_path_factory: Any, family: str) -> Path:
    """The tiny ``family`` checkpoint, written once per session."""
    if family not in _CACHE:
        from lmms_engine.models.qwen_tiny import write_tiny_qwen_checkpoint

        _CACHE[family] = write_tiny_qwen_checkpoint(tmp_path_factory.mktemp(family) / "checkpoint", family)
    return _CACHE[family]


def small_processing(config: Any) -> Any:
    """Frames of at most 4 x 4 LLM tokens per group (tiny clips stay tiny)."""
    from lmms_engine.data.qwen_vision import QwenVideoProcessing

    f = config.vision_config.patch_size * config.vision_config.spatial_merge_size
    return QwenVideoProcessing.for_model(config, min_pixels=4 * f * f, max_pixels=8 * f * f)


def qwen_records(folder: Path) -> Path:
    """Four records: videos of different sizes and lengths (LLaVA form, Qwen content part, a time range), one text-only."""
    folder.mkdir(parents=True, exist_ok=True)
    make_clip(folder / "a.mp4", 30, fps=10, size=(48, 96))
    make_clip(folder / "b.mp4", 20, fps=10, size=(96, 48))
    records = [
        {"conversations": [{"from": "human", "value": "<video>\nWhat happens?"},
                           {"from": "gpt", "value": "A square moves."}], "video": "a.mp4"},
        {"messages": [{"role": "user", "content": [{"type": "video", "video": "b.mp4"},
                                                   {"type": "text", "text": "Describe it."}]},
                      {"role": "assistant", "content": "The shape moves left."}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "yes"}]},
        {"conversations": [{"from": "human", "value": "Where does it go? <video>"},
                           {"from": "gpt", "value": "Right."}], "video": "a.mp4", "video_start": 1.0},
    ]
    path = folder / "records.json"
    path.write_text(json.dumps(records))
    return path


def qwen_trainer_block(checkpoint: Path, records: Path, **overrides: Any) -> dict[str, Any]:
    """A trainer block (YAML form) on the tiny checkpoint with the autoregressive loss."""
    block: dict[str, Any] = {
        "trainer_type": "autoregressive_trainer",
        "model_config": {"model_name_or_path": str(checkpoint), "enable_autoregressive": True,
                         "autoregressive_config": dict(QWEN_AR)},
        "dataset_config": {"data_path": str(records), "max_frames": 8, "video_min_pixels": 3136,
                           "video_max_pixels": 6272},
        "max_steps": 3, "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 3, "report_to": "none",
        "disable_tqdm": True, "seed": 0, "per_device_train_batch_size": 2,
    }
    block.update(overrides)
    return block


def qwen_dataset(checkpoint: Path, records: Path, **config: Any) -> Any:
    from transformers import AutoConfig, AutoTokenizer

    from lmms_engine.data.qwen_dataset import build_qwen_dataset

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    processing = small_processing(AutoConfig.from_pretrained(checkpoint))
    return build_qwen_dataset({"data_path": str(records), "max_frames": 8, **config}, tokenizer, processing)


def collate(dataset: Any, indices: list[int], **collator: Any) -> dict[str, torch.Tensor]:
    from lmms_engine.data.qwen_dataset import QwenVideoCollator

    return QwenVideoCollator(pad_token_id=dataset.tokenizer.pad_token_id, **collator)([dataset[i] for i in indices])
