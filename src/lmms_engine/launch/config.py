"""The pipeline config: a YAML (or JSON) list of blocks, checked completely before anything loads.

Format::

    - type: demo_data            # optional: generate the demo dataset if it is missing
      config: {output_dir: output/quickstart/data, num_train: 64}
    - type: trainer
      config:
        trainer_type: autoregressive_trainer    # or hf_trainer / sft (no autoregressive loss)
        model_config: {...}                     # lmms_engine.models.builder.ModelConfig
        dataset_config: {...}                   # lmms_engine.data.DatasetConfig
        output_dir: ./output/run                # any transformers.TrainingArguments field,
        per_device_train_batch_size: 2          # flattened beside the three keys above

Blocks run in order. Checks (each failure is a :class:`~lmms_engine.utils.config.ConfigError` naming
the block, the key and what would be valid): unknown block type or key (with the nearest valid name),
wrong value types (TrainingArguments fields are typed from ``dataclasses.fields(TrainingArguments)``
and built with transformers' own checks), missing files and folders (data files, video folders, local model
folders, checkpoints to resume from; files an earlier ``demo_data`` block writes count as present),
conflicting video-layout keys, an ``autoregressive_config.embedding_dim`` that differs from the vision
tower's width, and a trainer type that contradicts ``enable_autoregressive``. No model, tokenizer or
dataset is built here. Relative paths are relative to the current directory.

Each rule lives with the class that owns its fact, and the places that guard the Python API call the same
check (one message): ``DatasetConfig.check_files`` (data files and folders; also ``open_records`` and the
evaluate block), ``AutoregressiveConfig.check_against_tower`` (embedding_dim; also the module),
``lmms_engine.train.arguments.check_fsdp`` and ``check_liger_kernel`` (also the trainer), ``DemoDataConfig.check_folder`` (also
``ensure_demo_data``), :meth:`TrainerBlockConfig.check_autoregressive` (the trainer checks the built model),
``lmms_engine.models.builder.resolve_video_layout`` (also ``attach_autoregressive_module``).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence


from lmms_engine.data.demo import DemoDataConfig
from lmms_engine.utils.config import ConfigError, check_keys, from_mapping, parse_value, read_config_file, suggest

BLOCK_KEYS: tuple[str, ...] = ("type", "config")
BLOCK_TYPES: tuple[str, ...] = ("demo_data", "trainer", "evaluate")
#: ``trainer_type`` values: whether the autoregressive loss is trained.
TRAINER_TYPES: dict[str, bool] = {"autoregressive_trainer": True, "hf_trainer": False, "sft": False}
#: Keys of a trainer block's ``config`` besides the TrainingArguments fields.
TRAINER_KEYS: tuple[str, ...] = ("trainer_type", "model_config", "dataset_config")
#: TrainingArguments fields whose declared type is narrower than what transformers accepts.
WIDER_TYPES: dict[str, tuple[type, ...]] = {"fsdp": (bool, str, type(None))}
#: Read by the launcher (a path, or true for the newest complete checkpoint), not by transformers.
RESUME_KEY = "resume_from_checkpoint"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


@dataclass
class TrainerBlockConfig:
    """A checked ``trainer`` block.

    ``training_args`` holds the TrainingArguments keyword arguments exactly as given (build the object
    with :meth:`training_arguments`); ``resume_from_checkpoint`` is a path, ``True`` (the newest
    complete checkpoint in ``output_dir``) or None.
    """

    trainer_type: str
    model_config: Any  # lmms_engine.models.builder.ModelConfig
    dataset_config: Any  # lmms_engine.data.DatasetConfig
    training_args: dict[str, Any] = field(default_factory=dict)
    resume_from_checkpoint: str | bool | None = None
    where: str = "trainer"

    @staticmethod
    def check_autoregressive(trainer_type: str, model_config: Any, where: str = "trainer") -> Any:
        """The trainer type against ``model_config.enable_autoregressive``; returns the model config the
        run builds. ``autoregressive_trainer`` trains the loss, so with ``enable_autoregressive`` unset the
        module is attached (with the default ``autoregressive_config`` unless one is given; ``false`` is
        the plain-SFT baseline through the same trainer); a type without the loss and ``true`` contradict
        each other (ConfigError). The model built from the result carries the module exactly when
        :attr:`trains_autoregressive`, which the trainer checks again on the model itself
        (:func:`lmms_engine.train.autoregressive_trainer.configure_autoregressive`)."""
        if not TRAINER_TYPES[trainer_type] and model_config.enable_autoregressive:
            raise ConfigError(
                f"{where}: trainer_type {trainer_type!r} trains without the autoregressive loss but "
                f"model_config.enable_autoregressive is true; use trainer_type: autoregressive_trainer, or set "
                f"enable_autoregressive: false"
            )
        if TRAINER_TYPES[trainer_type] and model_config.enable_autoregressive is None:
            return dataclasses.replace(model_config, enable_autoregressive=True)
        return model_config

    @property
    def trains_autoregressive(self) -> bool:
        """Whether this block trains the autoregressive loss (``autoregressive_trainer`` and a model with
        the module)."""
        return TRAINER_TYPES[self.trainer_type] and self.model_config.enable_autoregressive is not False

    def training_arguments(self) -> Any:
        """A fresh :class:`lmms_engine.train.TrainingArguments` from ``training_args``."""
        from lmms_engine.train.arguments import TrainingArguments

        return TrainingArguments(**self.training_args)


@dataclass
class Block:
    """One block of the pipeline: ``type`` and its checked config (``DemoDataConfig``,
    ``TrainerBlockConfig`` or ``EvaluateConfig``)."""

    type: str
    config: Any
    where: str


@dataclass
class PipelineConfig:
    """The checked pipeline: its blocks in order and the file it came from."""

    blocks: list[Block]
    source: str = "<mapping>"

    def of_type(self, block_type: str) -> list[Any]:
        return [b.config for b in self.blocks if b.type == block_type]


# ---------------------------------------------------------------------------------------------- overrides
def apply_overrides(raw: Any, overrides: Sequence[str]) -> Any:
    """Apply ``KEY=VALUE`` overrides (``--set``) to a raw block list (a deep copy is returned).

    ``KEY`` is a dotted path inside the ``config`` of every ``trainer`` block (``max_steps``,
    ``model_config.autoregressive_config.loss_weight``), or, when its first part names another block
    type, inside that type's blocks (``demo_data.num_train``). ``VALUE`` is read as YAML.
    """
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set max_steps=10")
        parts = key.split(".")
        block_type = "trainer"
        if parts[0] in BLOCK_TYPES and parts[0] != "trainer" and len(parts) > 1:
            block_type, parts = parts[0], parts[1:]
        value = parse_value(text)
        targets = [b for b in (raw if isinstance(raw, list) else []) if isinstance(b, Mapping)
                   and b.get("type") == block_type]
        if not targets:
            raise ConfigError(f"--set {item!r}: the config has no {block_type!r} block to apply it to")
        for block in targets:
            node = block.setdefault("config", {})
            if node is None:
                node = block["config"] = {}
            for i, part in enumerate(parts[:-1]):
                child = node.get(part)
                if child is None:
                    child = node[part] = {}
                if not isinstance(child, dict):
                    raise ConfigError(f"--set {item!r}: {'.'.join(parts[:i + 1])} is {child!r}, not a mapping")
                node = child
            node[parts[-1]] = value
    return raw


# ---------------------------------------------------------------------------------------------- checks
def training_argument_fields() -> dict[str, dataclasses.Field]:
    """``{name: field}`` of every init field of ``TrainingArguments`` (transformers' and the engine's)."""
    from lmms_engine.train.arguments import TrainingArguments

    return {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}


def _looks_like_local_path(value: str) -> bool:
    """Not of the hub-id form ``name`` or ``org/name``."""
    return _HUB_ID.match(value) is None


def _check_model_files(model_config: Any, where: str) -> None:
    path = model_config.model_name_or_path
    if path is None or Path(path).expanduser().exists():
        return
    if _looks_like_local_path(path):
        raise ConfigError(f"{where}.model_name_or_path: folder {path!r} does not exist (and is not a hub id "
                          f"like 'llava-hf/llava-onevision-qwen2-0.5b-ov-hf'); omit the key for the tiny model")


def _model_hf_config(model_config: Any) -> Any | None:
    """The HF config ``model_config`` builds, read without weights (None: a hub id, read when built)."""
    if model_config.model_name_or_path is None:
        from lmms_engine.models.tiny import tiny_llava_config

        return tiny_llava_config(None, model_config.tiny_config)
    local = Path(model_config.model_name_or_path).expanduser() / "config.json"
    if not local.is_file():
        return None
    from transformers import AutoConfig

    import lmms_engine.models.llava_video_config  # noqa: F401 - registers model_type lmms_video_llava

    return AutoConfig.from_pretrained(str(local.parent))


def _vision_feature_size(config: Any) -> int | None:
    """The vision tower's feature width of the HF ``config`` (None: unknown)."""
    vision = getattr(config, "vision_config", None)
    if vision is None:
        return None
    from lmms_engine.models.vision import feature_size, vision_width

    return feature_size(vision_width(vision), getattr(config, "vision_feature_layer", -1))


def _check_model(raw: Any, where: str) -> Any:
    from lmms_engine.models.builder import ModelConfig, resolve_video_layout

    model_config = from_mapping(ModelConfig, raw, where)
    # layout conflicts, autoregressive_config keys/types
    resolve_video_layout(model_config.layout_keys(), model_config.autoregressive_config, None, where)
    _check_model_files(model_config, where)
    if model_config.model_name_or_path is None and model_config.tiny_config is not None:
        from lmms_engine.models.tiny import tiny_llava_config

        try:  # the keys inside tiny_config.vision_config / text_config, checked like every other key
            tiny_llava_config(None, model_config.tiny_config)
        except (ValueError, TypeError) as err:  # its messages start with "model_config.tiny_config..."
            raise ConfigError(f"{where.removesuffix('model_config')}{err}") from err
    hf_config = _model_hf_config(model_config)
    from lmms_engine.data.qwen_vision import QWEN_FAMILIES

    from lmms_engine.models.llava_video_config import LLAVA_MODEL_TYPES

    if hf_config is not None and hf_config.model_type not in (*LLAVA_MODEL_TYPES, *QWEN_FAMILIES):
        raise ConfigError(f"{where}.model_name_or_path={model_config.model_name_or_path!r} is a "
                          f"{hf_config.model_type!r} checkpoint; supported: llava_onevision, {', '.join(QWEN_FAMILIES)} "
                          f"(and {LLAVA_MODEL_TYPES[1]}: ours with a layout plain transformers cannot reproduce)")
    if hf_config is not None and hf_config.model_type in QWEN_FAMILIES:
        from lmms_engine.models.qwen_vl_common import check_qwen_model_config

        check_qwen_model_config(model_config, hf_config.model_type, where)
    ar = model_config.autoregressive_config or {}
    if model_config.enable_autoregressive is not False and "embedding_dim" in ar and hf_config is not None:
        width = _vision_feature_size(hf_config)
        if width is not None:
            from lmms_engine.models.autoregressive_config import AutoregressiveConfig

            model = "the tiny model" if model_config.model_name_or_path is None else \
                repr(model_config.model_name_or_path)
            ar_where = f"{where}.autoregressive_config"
            AutoregressiveConfig.from_dict(ar, ar_where).check_against_tower(width, ar_where, f"of {model}")
    return model_config


def _check_dataset(raw: Any, where: str, generated: set[Path]) -> Any:
    from lmms_engine.data.dataset import DatasetConfig

    if raw is None:
        raise ConfigError(f"{where}: missing; give dataset_config with at least data_path (a JSON/JSONL file "
                          f"of LLaVA records), or add a demo_data block and point data_path at its train.json")
    from lmms_engine.data.sources import first_usable_record

    dataset_config = from_mapping(DatasetConfig, raw, where)
    # Each source is read up to its first usable record: a file that is no record file, empty, or without a
    # usable record is a data error now, not after the model is built (DataFileError / BadRecordError).
    for sources in dataset_config.check_files(where, generated).values():
        for source in sources:
            first_usable_record(source, on_bad_record=dataset_config.on_bad_record,
                                videos_inside_folder=dataset_config.videos_inside_folder)
    return dataset_config


def _check_resume(value: Any, where: str) -> str | bool | None:
    if value is None or value is False:
        return None
    if value is True or value in ("last", "latest", "true", "True"):
        return True
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a checkpoint folder, true (the newest complete checkpoint in "
                          f"output_dir) or null, got {value!r}")
    from lmms_engine.train.checkpointing import checkpoint_problem

    if not Path(value).is_dir():
        raise ConfigError(f"{where}: checkpoint folder {value!r} does not exist")
    problem = checkpoint_problem(value)
    if problem is not None:
        hint = (f"; to start a new run from its weights, set model_config.model_name_or_path: {value!r} and no "
                f"resume_from_checkpoint" if "save_only_model" in problem else "")
        raise ConfigError(f"{where}: {value!r} is {problem if problem.startswith('not ') else 'unusable: ' + problem}"
                          f"{hint}")
    return value


def _check_trainer(raw: Any, where: str, generated: set[Path]) -> TrainerBlockConfig:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(raw).__name__}")
    valid = list(TRAINER_KEYS) + list(training_argument_fields())
    for key in raw:
        if key not in valid:  # the full list (over 100 names) would bury the message: point to the docs
            raise ConfigError(f"{where}: unknown key {key!r}{suggest(str(key), valid)}; valid keys: "
                              f"{', '.join(TRAINER_KEYS)} and the fields of transformers.TrainingArguments "
                              f"(docs/config.md)")
    trainer_type = raw.get("trainer_type", "autoregressive_trainer")
    if trainer_type not in TRAINER_TYPES:
        raise ConfigError(f"{where}.trainer_type: unknown {trainer_type!r}{suggest(str(trainer_type), TRAINER_TYPES)}; "
                          f"valid: {', '.join(TRAINER_TYPES)}")
    model_config = TrainerBlockConfig.check_autoregressive(
        trainer_type, _check_model(raw.get("model_config"), f"{where}.model_config"), where)
    dataset_config = _check_dataset(raw.get("dataset_config"), f"{where}.dataset_config", generated)
    args = {key: value for key, value in raw.items() if key not in TRAINER_KEYS}
    resume = _check_resume(args.pop(RESUME_KEY, None), f"{where}.{RESUME_KEY}")
    from lmms_engine.train.arguments import TrainingArguments, check_fsdp, check_liger_kernel

    # Types (from the dataclass fields) and transformers' own consistency checks, before any model.
    wide = {key: args[key] for key in WIDER_TYPES if key in args}
    for key, value in wide.items():
        if not isinstance(value, WIDER_TYPES[key]):
            raise ConfigError(f"{where}.{key}: expected {' or '.join(t.__name__ for t in WIDER_TYPES[key])}, "
                              f"got {value!r} ({type(value).__name__})")
    try:  # built here, as the run builds it: transformers' own checks (and deepspeed's) now, not later
        training = from_mapping(TrainingArguments, {k: v for k, v in args.items() if k not in wide}, where)
        if wide:
            training = TrainingArguments(**args)
    except ConfigError:
        raise
    except ImportError as err:
        missing = "deepspeed" if args.get("deepspeed") else "a package"
        raise ConfigError(f"{where}: TrainingArguments need {missing} that is not installed: {err}"
                          + (f"; install it (pip install deepspeed) or remove deepspeed: {args['deepspeed']!r}"
                             if args.get("deepspeed") else "")) from err
    except (ValueError, TypeError, OSError) as err:
        raise ConfigError(f"{where}: {err}") from err
    _check_training_values(training, args, where, dataset_config)
    check_fsdp(training, f"{where}.fsdp")
    check_liger_kernel(training, f"{where}.use_liger_kernel")
    return TrainerBlockConfig(trainer_type, model_config, dataset_config, args, resume, where)


def _check_training_values(training: Any, given: Mapping[str, Any], where: str, dataset_config: Any) -> None:
    """What transformers accepts but cannot train with, or fails on only once the model is built."""
    import math

    lr = training.learning_rate
    if not (math.isfinite(lr) and lr >= 0):
        raise ConfigError(f"{where}.learning_rate: {lr!r} is not a finite number >= 0 (e.g. 2.0e-5)")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(training, key) < 1:
            raise ConfigError(f"{where}.{key}: must be >= 1, got {getattr(training, key)}")
    for key, strategy in (("save_steps", "save_strategy"), ("logging_steps", "logging_strategy"),
                          ("eval_steps", "eval_strategy")):
        value = getattr(training, key)
        if value is not None and not value > 0 and (key in given or _strategy(training, strategy) != "no"):
            raise ConfigError(f"{where}.{key}: must be > 0 (a number of steps, or a fraction of the run below 1), "
                              f"got {value}")
    if _strategy(training, "eval_strategy") != "no" and dataset_config.eval_data_path is None:
        raise ConfigError(f"{where}.eval_strategy: {_strategy(training, 'eval_strategy')!r} needs held-out data: set "
                          f"dataset_config.eval_data_path, or eval_strategy: 'no'")
    _check_report_to(training.report_to, given.get("report_to"), where)
    _check_writable(training.output_dir, f"{where}.output_dir")


def _strategy(training: Any, key: str) -> str:
    value = getattr(training, key)
    return str(getattr(value, "value", value))


def _check_report_to(resolved: Any, given: Any, where: str) -> None:
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    if given in (None, "all", "none", ["all"], ["none"]):
        return
    valid = list(INTEGRATION_TO_CALLBACK)
    available = set(get_available_reporting_integrations())
    for name in resolved or []:
        if name not in INTEGRATION_TO_CALLBACK:
            raise ConfigError(f"{where}.report_to: unknown integration {name!r}{suggest(str(name), valid)}; "
                              f"valid: none, all, {', '.join(valid)}")
        if name not in available:
            raise ConfigError(f"{where}.report_to: {name!r} is not installed here (pip install {name}); "
                              f"installed: {', '.join(sorted(available)) or 'none'}; or report_to: none")


def _check_writable(folder: str, where: str) -> None:
    """``folder`` exists as a writable folder, or can be created (its nearest existing parent is one)."""
    path = Path(folder).expanduser().absolute()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{where}: {folder!r} cannot be created: {str(probe)!r} is a file, not a folder")
    import tempfile

    try:  # a real write (os.access says yes to root on read-only mounts); the probe file is removed at once
        with tempfile.TemporaryFile(dir=probe, prefix=".lmms-write-check-"):
            pass
    except OSError as err:
        what = "is not writable" if probe == path else f"cannot be created: {str(probe)!r} is not writable"
        raise ConfigError(f"{where}: {folder!r} {what} ({err.strerror}); choose another output_dir") from err


def _check_output_dirs(blocks: list[Block]) -> None:
    """Two trainer blocks writing one output_dir would overwrite each other's model and checkpoints; a
    later block that resumes from the earlier one's checkpoint continues it deliberately."""
    seen: dict[Path, Block] = {}
    for block in blocks:
        if block.type != "trainer":
            continue
        out = Path(block.config.training_args.get("output_dir", "trainer_output")).expanduser().resolve()
        if out in seen and not block.config.resume_from_checkpoint:
            raise ConfigError(f"{block.where}.output_dir: {str(out)!r} is also the output_dir of "
                              f"{seen[out].where}; the second run would overwrite the first one's model and "
                              f"checkpoints: give each trainer block its own output_dir (or resume_from_checkpoint "
                              f"to continue the same run)")
        seen.setdefault(out, block)


def check_pipeline(raw: Any, source: str = "<mapping>") -> PipelineConfig:
    """Check a parsed block list and return the typed :class:`PipelineConfig` (nothing is built)."""
    if isinstance(raw, Mapping) and "type" in raw:
        raise ConfigError(f"{source}: expected a list of blocks; write the block as a list item: '- type: ...'")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{source}: expected a non-empty list of blocks like '- type: trainer' with a 'config:' "
                          f"mapping, got {type(raw).__name__}")
    blocks: list[Block] = []
    generated: set[Path] = set()
    for i, item in enumerate(raw):
        where = f"{source}: block {i}"
        if not isinstance(item, Mapping):
            raise ConfigError(f"{where}: expected a mapping with 'type' and 'config', got {item!r}")
        check_keys(item, BLOCK_KEYS, where)
        block_type = item.get("type")
        if block_type not in BLOCK_TYPES:
            raise ConfigError(f"{where}: unknown block type {block_type!r}{suggest(str(block_type), BLOCK_TYPES)}; "
                              f"valid: {', '.join(BLOCK_TYPES)}")
        where = f"{source}: block {i} ({block_type}).config"
        if block_type == "demo_data":
            config = from_mapping(DemoDataConfig, item.get("config"), where)
            config.check_folder(where)  # refused now, not after a --dry-run said OK
            generated |= config.outputs()
        elif block_type == "evaluate":
            from lmms_engine.eval.config import EvaluateConfig  # files are checked when it runs: an
            config = from_mapping(EvaluateConfig, item.get("config"), where)  # earlier block may write them
        else:
            config = _check_trainer(item.get("config"), where, generated)
        blocks.append(Block(block_type, config, where))
    if not any(b.type in ("trainer", "evaluate") for b in blocks):
        raise ConfigError(f"{source}: no 'trainer' or 'evaluate' block; nothing would run")
    _check_output_dirs(blocks)
    return PipelineConfig(blocks, source)


def load_pipeline_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Read ``path``, apply ``--set`` overrides and check everything (see the module docstring)."""
    raw = read_config_file(path)
    if overrides:
        raw = apply_overrides(raw, overrides)
    return check_pipeline(raw, str(path))


__all__ = ["BLOCK_TYPES", "Block", "PipelineConfig", "TRAINER_KEYS", "TRAINER_TYPES",
           "TrainerBlockConfig", "apply_overrides", "check_pipeline", "load_pipeline_config",
           "training_argument_fields"]
