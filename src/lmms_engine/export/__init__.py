"""Evaluator-ready exports of trained checkpoints.

- :func:`build_processing_class`: the Trainer's ``processing_class``; every checkpoint then holds the
  LLaVA-OneVision processor files ``AutoProcessor.from_pretrained`` needs (lmms-eval ``llava_hf``).
- :func:`export_llava_next`: a LLaVA-NeXT-format copy for layouts plain transformers cannot express
  (lmms-eval ``llava_vid``); ``python -m lmms_engine.export llava-next --checkpoint DIR --output DIR``.
- :func:`evaluation_routes`: which evaluators reproduce a checkpoint exactly, with their commands
  (``python -m lmms_engine.export routes --checkpoint DIR``).

Names load lazily: ``import lmms_engine.export`` does not import torch or transformers.
"""

from __future__ import annotations

from lmms_engine.utils.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "CheckpointProcessor": "processor",
    "ProcessorFiles": "processor",
    "add_processor_files": "processor",
    "build_processing_class": "processor",
    "generate_processor_files": "processor",
    "make_tokenizer_config_portable": "processor",
    "resolve_processor_files": "processor",
    "LlavaNextExport": "llava_next",
    "export_llava_next": "llava_next",
    "from_llava_next_name": "llava_next",
    "llava_next_incompatibilities": "llava_next",
    "read_llava_next_state_dict": "llava_next",
    "to_llava_next_name": "llava_next",
    "to_llava_next_state_dict": "llava_next",
    "EvaluationRoute": "routes",
    "describe_routes": "routes",
    "evaluation_routes": "routes",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
