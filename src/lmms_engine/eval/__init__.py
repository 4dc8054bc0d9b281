"""Evaluation: generation accuracy on held-out records and next-frame reconstruction of the
autoregressive predictor, as the ``evaluate`` pipeline block (:func:`run_evaluate`) or from
``python -m lmms_engine.eval``.

Names load lazily: ``import lmms_engine.eval`` does not import torch or transformers.
"""

from __future__ import annotations

from lmms_engine.utils.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "EvaluateConfig": "config",
    "run_evaluate": "config",
    "load_model": "config",
    "results_markdown": "config",
    "Prediction": "accuracy",
    "ScoredPrediction": "accuracy",
    "AccuracyReport": "accuracy",
    "normalize_answer": "accuracy",
    "match_option": "accuracy",
    "score_prediction": "accuracy",
    "score_predictions": "accuracy",
    "accuracy_markdown": "accuracy",
    "generate_answers": "generation",
    "prompt_loader": "generation",
    "stop_token_ids": "generation",
    "OffsetSums": "reconstruction",
    "ReconstructionAccumulator": "reconstruction",
    "batch_reconstruction_errors": "reconstruction",
    "next_frame_errors": "reconstruction",
    "reconstruction_markdown": "reconstruction",
    "video_hidden_states": "reconstruction",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
