"""Models: the video LLM, its video-token layouts and the autoregressive reconstruction module.

Names below load their module on first access, so ``import lmms_engine.models`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, str] = {
    "LlavaVideoForConditionalGeneration": "lmms_engine.models.llava_video",
    "LlavaVideoCausalLMOutput": "lmms_engine.models.llava_video",
    "ModelConfig": "lmms_engine.models.builder",
    "build_model": "lmms_engine.models.builder",
    "TinyConfig": "lmms_engine.models.tiny",
    "tiny_llava_config": "lmms_engine.models.tiny",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lmms_engine.models' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
