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


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is unusable (header unreadable, or shorter than its header says), or None.

    Reads only the header: the file must be exactly 8 + header length + the largest tensor end offset.
    """
    import json
    import struct

    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return f"{path.name} is {size} bytes: no safetensors header"
            (length,) = struct.unpack("<Q", head)
            if length > size - 8:
                return f"{path.name} is truncated ({size} bytes, its header alone claims {length})"
            header = json.loads(handle.read(length))
    except (OSError, ValueError) as err:
        return f"{path.name} cannot be read: {err}"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    expected = 8 + length + max(ends, default=0)
    if size != expected:
        return f"{path.name} is {size} bytes but its header describes {expected} (truncated or damaged)"
    return None


#: Files (or folders) whose presence shows the optimizer state was saved (plain, FSDP, DeepSpeed).
_OPTIMIZER_PREFIXES = ("optimizer", "global_step")


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be resumed from exactly, or None: not a complete checkpoint, saved with
    ``save_only_model`` (no optimizer, scheduler or RNG state), or a weights / optimizer file that is
    truncated (checked from safetensors headers and zip directories; nothing is loaded)."""
    import json
    import zipfile

    path = Path(path)
    if not is_complete_checkpoint(path):
        return "not a complete checkpoint (a checkpoint-N folder holding trainer_state.json)"
    names = [p.name for p in path.iterdir()]
    if not any(name.startswith(_OPTIMIZER_PREFIXES) for name in names):
        return ("saved with save_only_model: true (weights only: no optimizer, scheduler or RNG state), so an "
                "exact resume is impossible")
    weights = [path / "model.safetensors"] if (path / "model.safetensors").is_file() else []
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weights += [path / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (OSError, ValueError, KeyError) as err:
            return f"{index.name} cannot be read: {err}"
    for file in weights:
        if not file.is_file():
            return f"{file.name} (named by {index.name}) is missing"
        problem = _safetensors_problem(file)
        if problem:
            return problem
    for name in ("optimizer.pt", "scheduler.pt"):  # torch.save writes zip archives
        file = path / name
        if file.is_file() and not zipfile.is_zipfile(file):
            return f"{name} is truncated or damaged (not a complete torch archive)"
    return None


def resumable_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint of ``run_dir`` that can be resumed from exactly, or None when there is none.

    A newer checkpoint that is damaged (truncated weights or optimizer file) is passed over with a
    warning naming it and why, for the previous complete one. A weights-only checkpoint
    (``save_only_model``) raises ValueError: falling back past it would silently drop training.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    found = sorted(((int(m.group(1)), p) for p in run_dir.iterdir()
                    if (m := _CHECKPOINT_RE.match(p.name)) and is_complete_checkpoint(p)), reverse=True)
    for _, path in found:
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        if "save_only_model" in problem:
            raise ValueError(f"{path}: {problem}; to start a new run from its weights, set "
                             f"model_config.model_name_or_path: {str(path)!r} and no resume_from_checkpoint")
        logger.warning("not resuming from %s: %s; trying the previous checkpoint", path, problem)
    return None


def finished_run(checkpoint: str | os.PathLike, args: Any) -> int | None:
    """The checkpoint's step when resuming it under ``args`` would train nothing more, else None.

    Finished: ``max_steps`` > 0 and the checkpoint is at or past it; or, for a run by epochs, the
    checkpoint ended its run (its step equals its own ``max_steps``) and ``num_train_epochs`` is not raised.
    (transformers would otherwise train one more step on every resume of a finished run.)
    """
    import json

    state = json.loads((Path(checkpoint) / TRAINER_STATE_FILE).read_text())
    step = int(state.get("global_step", 0))
    if args.max_steps > 0:
        return step if step >= args.max_steps else None
    stored_max, stored_epochs = int(state.get("max_steps", 0) or 0), state.get("num_train_epochs")
    if stored_max and step >= stored_max and stored_epochs is not None and args.num_train_epochs <= stored_epochs:
        return step
    return None


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


__all__ = ["STAGING_PREFIX", "checkpoint_problem", "finished_run", "load_checkpoint_weights", "resumable_checkpoint", "is_complete_checkpoint", "last_complete_checkpoint", "publish_checkpoint",
           "remove_stale_staging", "staging_parent"]
