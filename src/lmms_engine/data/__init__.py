"""Data: conversation records, the tiny tokenizer, frame preprocessing, the SFT dataset and collator,
and the generated demo dataset (``python -m lmms_engine.data.demo``).

Names load lazily, so ``import lmms_engine.data`` stays cheap (no torch/transformers until used).
"""

from __future__ import annotations

from lmms_engine.utils.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "BAD_RECORD_REASONS": "records",
    "METADATA_KEYS": "records",
    "BadRecordError": "records",
    "ConversationRecord": "records",
    "Turn": "records",
    "parse_record": "records",
    "build_tiny_tokenizer": "tokenizer",
    "ProcessorInfo": "preprocess",
    "frames_to_pixel_values": "preprocess",
    "IGNORE_INDEX": "chat",
    "encode_conversation": "chat",
    "BadRecordReport": "dataset",
    "DatasetConfig": "dataset",
    "VideoSFTDataset": "dataset",
    "build_dataset": "dataset",
    "load_records": "dataset",
    "VideoSFTCollator": "collator",
    "build_collator": "collator",
    "generate_demo_dataset": "demo",
    "DemoDataConfig": "demo",
    "ensure_demo_data": "demo",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
