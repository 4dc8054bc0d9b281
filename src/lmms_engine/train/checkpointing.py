"""Atomic checkpoints: a ``checkpoint-N`` folder exists only once every file of it is written.

transformers' Trainer (5.x) writes ``output_dir/checkpoint-N`` in place: a run killed mid-save leaves a
folder that ``get_last_checkpoint`` and ``resume_from_checkpoint=True`` pick as the newest checkpoint,
with weights but no optimizer or trainer state. The trainer here writes into
``output_dir/.incomplete-checkpoint-N/checkpoint-N`` and renames it to ``output_dir/checkpoint-N`` when
every rank has finished (a rename within one filesystem is atomic). Leftover ``.incomplete-*`` folders
of a killed save match neither HF's checkpoint pattern nor its rotation glob; the next save of the same
step, or the next training run, removes them.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

STAGING_PREFIX = ".incomplete-"
CHECKPOINT_PREFIX = "checkpoint"
# Files a checkpoint of the Trainer always holds (weights may be sharded or named differently).
TRAINER_STATE_FILE = "trainer_state.json"
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")


def staging_parent(run_dir: str | os.PathLike, checkpoint_name: str) -> Path:
    """The folder a checkpoint is written under before it is published."""
    return Path(run_dir) / f"{STAGING_PREFIX}{checkpoint_name}"


def remove_stale_staging(run_dir: str | os.PathLike, checkpoint_name: str | None = None) -> list[Path]:
    """Delete staging folders left by killed saves (one checkpoint's, or all); return what was removed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    pattern = f"{STAGING_PREFIX}{checkpoint_name}" if checkpoint_name else f"{STAGING_PREFIX}{CHECKPOINT_PREFIX}-*"
    removed = []
    for path in sorted(run_dir.glob(pattern)):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def publish_checkpoint(staged: str | os.PathLike, final: str | os.PathLike) -> bool:
    """Rename the fully written ``staged`` folder to ``final``; return False if there was nothing to do.

    An existing ``final`` (the same step saved again after a resume) is moved aside first and deleted
    after the rename, so there is never a moment without a complete ``final`` folder. Tolerates another
    process of a shared filesystem having published the same folder already.
    """
    staged, final = Path(staged), Path(final)
    if not staged.is_dir():
        return False
    previous = None
    if final.exists():
        previous = final.with_name(f"{STAGING_PREFIX}replaced-{final.name}-{os.getpid()}")
        os.replace(final, previous)
    try:
        os.replace(staged, final)
    except FileNotFoundError:
        if not final.is_dir():
            raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    parent = staged.parent
    if parent.name.startswith(STAGING_PREFIX):
        shutil.rmtree(parent, ignore_errors=True)
    return True


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """A published ``checkpoint-N`` folder holding the trainer state (written last by the Trainer)."""
    path = Path(path)
    return path.is_dir() and _CHECKPOINT_RE.match(path.name) is not None and (path / TRAINER_STATE_FILE).is_file()


def last_complete_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step in ``run_dir``, or None."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in run_dir.iterdir()
             if (m := _CHECKPOINT_RE.match(p.name)) and is_complete_checkpoint(p)]
    return max(found)[1] if found else None


def _read_safetensors(checkpoint: Path) -> dict | None:
    """The checkpoint's full state dict from ``model.safetensors`` or its sharded index; None otherwise."""
    import json

    from safetensors.torch import load_file

    single = checkpoint / "model.safetensors"
    index = checkpoint / "model.safetensors.index.json"
    if single.is_file():
        return load_file(single, device="cpu")
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict = {}
        for name in files:
            state.update(load_file(checkpoint / name, device="cpu"))
        return state
    return None


def load_checkpoint_weights(model: "Any", checkpoint: str | os.PathLike) -> "Any":
    """Load a ``save_pretrained`` checkpoint's weights into ``model`` in place, as ``from_pretrained`` would.

    transformers 5 saves some models (LLaVA-OneVision among them) with their legacy key names
    (``language_model.model.*``) and renames them back only inside ``from_pretrained``; the Trainer's
    resume path (``load_state_dict`` on the raw file) then misses every renamed weight. This applies the
    model's own key conversion (renamings only) first.

    Returns:
        ``load_state_dict``'s result (missing / unexpected keys), or None when this checkpoint or model
        needs transformers' own loader (no plain safetensors, or a conversion that merges tensors).
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    state = _read_safetensors(Path(checkpoint))
    if state is None:
        return None
    transforms = get_model_conversion_mapping(model)
    if any(isinstance(t, WeightConverter) for t in transforms):
        return None
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    reference = model.state_dict()
    converted = {}
    for key, tensor in state.items():
        new_key, _ = rename_source_key(key, renamings, [], getattr(model, "base_model_prefix", None), reference)
        converted[new_key] = tensor
    result = model.load_state_dict(converted, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    if tied and any(key in tied for key in result.missing_keys):
        # Tied copies are not stored (safetensors refuses shared tensors); re-tie instead of warning.
        model.tie_weights()
        result.missing_keys[:] = [key for key in result.missing_keys if key not in tied]
    return result


__all__ = ["STAGING_PREFIX", "load_checkpoint_weights", "is_complete_checkpoint", "last_complete_checkpoint", "publish_checkpoint",
           "remove_stale_staging", "staging_parent"]
