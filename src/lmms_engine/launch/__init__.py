"""Launching training from a pipeline config: ``python -m lmms_engine.launch.cli --config X.yaml``.

``lmms_engine.launch.config`` reads and checks the config (nothing is built there);
``lmms_engine.launch.pipeline`` runs it; :func:`build_parts` builds a run's tokenizer, model, datasets
and collator (the launcher's, the Python example's and the tests' one way). Submodules load on use.
"""

from __future__ import annotations

from lmms_engine.utils.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "RunParts": "parts",
    "build_parts": "parts",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
