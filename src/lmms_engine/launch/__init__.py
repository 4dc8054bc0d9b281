"""Launching training from a pipeline config: ``python -m lmms_engine.launch.cli --config X.yaml``.

``lmms_engine.launch.config`` reads and checks the config (nothing is built there);
``lmms_engine.launch.pipeline`` runs it (its parts come from :func:`lmms_engine.parts.build_parts`).
Submodules load on use.
"""
