"""LoRA on the language model through ``peft`` (the optional ``lora`` extra), for every model family.

``model_config.lora: {r, alpha, dropout, target_modules}`` injects LoRA adapters into the LLM's linear
layers named in ``target_modules`` (suffixes, matched only under the family's language-model prefix, so
the vision tower's linear layers, e.g. Qwen2.5-VL's ``gate_proj``/``down_proj`` or SigLIP's
``q_proj``/``v_proj``, and a target-encoder copy stay as they are), with peft's
``inject_adapter_in_model``: the model keeps its own class, forward, loss and checkpoint logic. Then
the LLM's base weights and ``lm_head`` are frozen; the adapters train, and so do, in full, the projector
(LLaVA-OneVision's ``multi_modal_projector``, ``image_newline``/``faster_token``; Qwen-VL's merger and
Qwen3-VL's deepstack mergers; unless ``freeze_projector``) and the autoregressive predictor (its own
rule); the vision tower follows ``freeze_vision_tower``.

The adapters are float32 in a bf16/fp16 model (peft casts each layer's input to them and the result back),
as peft's ``get_peft_model`` makes them: measured on the tiny model in bf16 (AdamW, lr 1e-4, 8 steps),
bf16 adapters left 72% of the ``lora_A`` elements never updated (the update is below bf16's resolution of
the value) and their updates differed from float32 adapters' by 60% (6% at lr 1e-3). The adapter
parameters are in ``_keep_in_fp32_modules_strict``, so a reload keeps them float32, bit-identical.

Checkpoints: the settings are stored in ``config.json`` (``lora``), so ``from_pretrained`` on a training
checkpoint injects the same adapters before loading (:class:`~lmms_engine.models.family.VideoFamilyMixin`),
and the Trainer's resume restores adapters, fully trained modules, optimizer and scheduler. Every
checkpoint also holds ``adapter_model.safetensors``: the trained tensors only (adapters + fully trained
modules). ``python -m lmms_engine.export merge-lora`` folds ``W + (alpha / r) * B @ A`` into each base
weight and writes a checkpoint without ``lora``: plain transformers loads it (the family's own class,
e.g. ``LlavaOnevisionForConditionalGeneration`` or ``AutoModelForImageTextToText``) with the adapter
model's logits.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmms_engine.utils.config import ConfigError, from_mapping

if TYPE_CHECKING:
    from torch import nn

#: Where the settings live in config.json.
CONFIG_LORA_KEY = "lora"
ADAPTER_FILE = "adapter_model.safetensors"
LORA_EXTRA = "pip install 'lmms-video[lora]' (the `peft` library)"
#: Qwen2's attention and MLP projections (LLaVA-OneVision's and Qwen-VL's language models).
DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Parameter-name prefix of the language model, per ``config.model_type``.
LANGUAGE_MODEL_PREFIX: dict[str, str] = {family: "model.language_model." for family in (
    "llava_onevision", "lmms_video_llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")}


@dataclass
class LoraSettings:
    """The ``model_config.lora`` block.

    Attributes:
        r: adapter rank.
        alpha: scaling numerator; the update is ``(alpha / r) * B @ A``.
        dropout: dropout on the adapters' input.
        target_modules: names of the LLM's linear layers that get adapters (module-name suffixes, e.g.
            ``q_proj``); only modules inside the language model match.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one linear layer of the language model")


def require_peft() -> Any:
    """Import ``peft`` or raise an ImportError naming the extra that installs it."""
    try:
        import peft
    except ImportError as err:
        raise ImportError(f"model_config.lora needs the `peft` library: {LORA_EXTRA}") from err
    return peft


def _prefix(model: nn.Module) -> str:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in LANGUAGE_MODEL_PREFIX:
        raise ConfigError(f"model_config.lora: no language-model prefix known for model_type {model_type!r}")
    return LANGUAGE_MODEL_PREFIX[model_type]


def target_pattern(model: nn.Module, settings: LoraSettings) -> str:
    """peft's full-match regex of the targeted module names: the LLM's modules ending in a target name."""
    names = "|".join(re.escape(n) for n in settings.target_modules)
    return rf"{re.escape(_prefix(model))}.*\.({names})"


#: What names an adapter parameter (peft's ``<layer>.lora_A.<adapter>.weight``, ``lora_B`` alike).
ADAPTER_NAME_MARKERS: tuple[str, ...] = (".lora_A.", ".lora_B.")
#: Adapter parameters as transformers' ``_keep_in_fp32_modules_strict`` patterns (regexes searched in each
#: parameter name): a bf16/fp16 checkpoint reloads its float32 adapters without rounding them.
FP32_ADAPTER_PATTERNS: tuple[str, ...] = tuple(re.escape(marker) for marker in ADAPTER_NAME_MARKERS)


def is_lora_parameter(name: str) -> bool:
    return any(marker in name for marker in ADAPTER_NAME_MARKERS)


def inject_lora(model: nn.Module, settings: LoraSettings | dict) -> nn.Module:
    """Add the adapters to ``model`` in place, freeze what LoRA freezes (module docstring), record the
    settings in ``model.config``; return the model."""
    peft = require_peft()
    settings = settings if isinstance(settings, LoraSettings) else from_mapping(LoraSettings, settings,
                                                                                 "model_config.lora")
    if any(is_lora_parameter(n) for n, _ in model.named_parameters()):  # a LoRA checkpoint loaded
        if asdict(settings) != getattr(model.config, CONFIG_LORA_KEY, None):
            raise ConfigError(f"model_config.lora={asdict(settings)} differs from the checkpoint's "
                              f"{getattr(model.config, CONFIG_LORA_KEY, None)}; remove the key to continue its adapters")
        freeze_for_lora(model)
        return model
    config = peft.LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                             target_modules=target_pattern(model, settings))
    trains = {n: p.requires_grad for n, p in model.named_parameters()}
    pattern = re.compile(config.target_modules)
    if not any(pattern.fullmatch(name) for name, _ in model.named_modules()):
        raise ConfigError(f"model_config.lora.target_modules={settings.target_modules}: no linear layer of the "
                          f"language model ({_prefix(model)}) has such a name")
    peft.inject_adapter_in_model(config, model)
    # float32 adapters beside bf16/fp16 base weights, as peft's get_peft_model makes them (autocast_adapter_dtype):
    # half-precision adapters lose small optimizer updates to rounding (module docstring)
    from peft.tuners.tuners_utils import cast_adapter_dtype

    cast_adapter_dtype(model, adapter_name="default")
    for name, param in model.named_parameters():  # peft freezes all but the adapters: undo that first
        if name in trains:
            param.requires_grad_(trains[name])
    setattr(model.config, CONFIG_LORA_KEY, asdict(settings))
    freeze_for_lora(model)
    return model


def freeze_for_lora(model: nn.Module) -> None:
    """Adapters train; the language model's base weights and ``lm_head`` do not."""
    prefix = _prefix(model)
    for name, param in model.named_parameters():
        if is_lora_parameter(name):
            param.requires_grad_(True)
        elif name.startswith(prefix) or name.startswith("lm_head."):
            param.requires_grad_(False)


def lora_settings(config: Any) -> LoraSettings | None:
    """The settings a checkpoint's config records, or None."""
    stored = getattr(config, CONFIG_LORA_KEY, None)
    return None if not stored else from_mapping(LoraSettings, stored, f"config.json {CONFIG_LORA_KEY}")


def save_trained_tensors(model: nn.Module, folder: str | Path) -> Path:
    """Write the trained tensors (adapters and fully trained modules) to ``folder/adapter_model.safetensors``
    and the settings to ``adapter_settings.json``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    path = folder / ADAPTER_FILE
    save_file(tensors, str(path))
    (folder / "adapter_settings.json").write_text(json.dumps(getattr(model.config, CONFIG_LORA_KEY), indent=1) + "\n")
    return path


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the base layers back (no peft module left); the
    config loses its ``lora`` entry. In place; returns the model."""
    peft = require_peft()
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
            merged += 1
    if not merged:
        raise ValueError("the model holds no LoRA adapters to merge")
    del peft
    if hasattr(model.config, CONFIG_LORA_KEY):
        delattr(model.config, CONFIG_LORA_KEY)
    return model


def merge_lora_checkpoint(checkpoint: str | Path, output: str | Path) -> Path:
    """``python -m lmms_engine.export merge-lora``: load a LoRA training checkpoint, merge, save to
    ``output`` (weights, config, and the checkpoint's tokenizer / processor files)."""
    import shutil

    from transformers import AutoConfig

    from lmms_engine.data.qwen_vision import QWEN_FAMILIES
    from lmms_engine.models.llava_video_config import LLAVA_MODEL_TYPES

    checkpoint, output = Path(checkpoint), Path(output)
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint}: no config.json; give a folder saved by training")
    config = AutoConfig.from_pretrained(checkpoint)
    if lora_settings(config) is None:
        raise ValueError(f"{checkpoint}: its config.json has no '{CONFIG_LORA_KEY}' entry: not a LoRA checkpoint")
    if config.model_type in QWEN_FAMILIES:
        from lmms_engine.models.qwen_vl_common import qwen_model_class

        model_class = qwen_model_class(config.model_type)
    elif config.model_type in LLAVA_MODEL_TYPES:
        from lmms_engine.models.llava_video import LlavaVideoForConditionalGeneration

        model_class = LlavaVideoForConditionalGeneration
    else:
        raise ValueError(f"{checkpoint}: merge-lora handles LLaVA-OneVision ({', '.join(LLAVA_MODEL_TYPES)}) and "
                         f"Qwen-VL ({', '.join(QWEN_FAMILIES)}) checkpoints, not {config.model_type!r}")
    if output.exists() and any(output.iterdir()):
        raise ValueError(f"{output}: exists and is not empty; give a new folder")
    model = model_class.from_pretrained(checkpoint)
    merge_lora(model)
    model.save_pretrained(output)
    for item in checkpoint.iterdir():  # tokenizer, chat template, processor files
        if item.is_file() and (item.name.startswith(("tokenizer", "special_tokens", "chat_template", "processor",
                                                     "preprocessor", "video_preprocessor"))):
            shutil.copy2(item, output / item.name)
    return output


__all__ = ["ADAPTER_FILE", "CONFIG_LORA_KEY", "DEFAULT_TARGETS", "LoraSettings", "freeze_for_lora", "inject_lora",
           "lora_settings", "merge_lora", "merge_lora_checkpoint", "require_peft", "save_trained_tensors",
           "target_pattern"]
