"""Models: the video LLM, its video-token layouts and the autoregressive reconstruction module.

Names below load their module on first access, so ``import lmms_engine.models`` stays cheap.
"""

from __future__ import annotations

from lmms_engine.utils.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "LlavaVideoForConditionalGeneration": "llava_video",
    "LlavaVideoCausalLMOutput": "llava_video",
    "LossTerm": "loss_terms",
    "LossTerms": "loss_terms",
    "SupportsLossTerms": "loss_terms",
    "ModelConfig": "builder",
    "build_model": "builder",
    "build_tokenizer": "builder",
    "TinyConfig": "tiny",
    "tiny_llava_config": "tiny",
    "Qwen2VLVideoForConditionalGeneration": "qwen2_vl",
    "Qwen2_5_VLVideoForConditionalGeneration": "qwen2_5_vl",
    "Qwen3VLVideoForConditionalGeneration": "qwen3_vl",
    "write_tiny_qwen_checkpoint": "qwen_tiny",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
