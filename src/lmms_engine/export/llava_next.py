"""Export a checkpoint to the LLaVA-NeXT format that lmms-eval's ``llava_vid`` class loads.

Plain transformers lays video tokens out one way only (bilinear pooling at stride 2, one newline token
after the video). Models trained with another layout (average/max pooling, ``grid``/``frame``/
``no_token`` newlines) are evaluated with LLaVA-NeXT's own model code (``LlavaQwenForCausalLM``), which
lmms-eval's ``llava_vid`` loads with ``mm_spatial_pool_mode``/``mm_newline_position`` as model arguments.

Parameter names, ours -> LLaVA-NeXT's (the inverse of transformers' ``convert_llava_onevision_weights_to_hf``):

- ``model.language_model.{embed_tokens,layers,norm}.*`` -> ``model.{embed_tokens,layers,norm}.*``
- ``lm_head.weight`` -> ``lm_head.weight`` (left out when tied to the embedding)
- ``model.vision_tower.*`` (or ``model.vision_tower.vision_model.*``)
  -> ``model.vision_tower.vision_tower.vision_model.*``
- ``model.multi_modal_projector.linear_1.*`` / ``linear_2.*`` -> ``model.mm_projector.0.*`` / ``model.mm_projector.2.*``
- ``model.image_newline`` -> ``model.image_newline``; ``faster_token`` -> ``model.faster_token``
- ``autoregressive_module.*`` -> the same name, only when asked for (LLaVA-NeXT ignores it)

Every exported tensor is the checkpoint's, bit for bit. Left out: the autoregressive module (unless
asked for), tower layers past the one the LLM reads and the tower's pooling head (neither model
computes with them).

The layout mapping is one-to-one only where LLaVA-NeXT's released code computes what our model does;
:func:`llava_next_incompatibilities` lists the cases where it does not, and the export refuses them:

- ``add_faster_video``: ``llava_vid`` forces ``add_faster_video=False``; LLaVA-NeXT's video path with it
  on references an undefined variable, and ``faster_token`` is not created when a checkpoint loads.
- ``mm_spatial_pool_stride`` other than 2: LLaVA-NeXT pools video frames with ``get_2dPool``'s default
  stride 2 whatever the config says.
- Tower geometry: LLaVA-NeXT's SigLIP wrapper asserts 729 patches (384 px in 14 px patches) and its image
  processor resizes to 384 px with mean/std 0.5; it reads the last tower layer it keeps, all patches
  (``vision_feature_select_strategy: full``, one ``vision_feature_layer``).
- Projector: ``mlp2x_gelu`` (Linear, exact GELU, Linear, with biases); LLM: Qwen2 with default RoPE.

Pooling arithmetic is identical (``get_2dPool``: ``avg_pool2d``/``max_pool2d`` at the stride,
``interpolate(size=ceil(side/stride), mode="bilinear")``, after the projector, as ours) and so is the
newline placement (``add_token_per_grid``: one after each row; ``add_token_per_frame``: one after each
frame; ``one_token``: one after the video, with ``mm_patch_merge_type: spatial_unpad``; ``no_token``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from lmms_engine.export.processor import _processor_info, checkpoint_config, make_tokenizer_config_portable

logger = logging.getLogger(__name__)

#: The SigLIP checkpoint LLaVA-OneVision/LLaVA-Video were trained from (config.mm_vision_tower).
SO400M = "google/siglip-so400m-patch14-384"
#: Its architecture (LLaVA-NeXT drops the last of its 27 layers: the LLM reads layer 26).
SO400M_CONFIG: dict[str, Any] = {"hidden_size": 1152, "intermediate_size": 4304, "num_attention_heads": 16,
                                 "num_hidden_layers": 27, "image_size": 384, "patch_size": 14}
TOWER_KEYS: tuple[str, ...] = ("hidden_size", "intermediate_size", "num_attention_heads", "image_size", "patch_size")
AR_PREFIX = "autoregressive_module."
_TOWER = "model.vision_tower."
_THEIR_TOWER = "model.vision_tower.vision_tower.vision_model."
#: Name prefixes, ours -> LLaVA-NeXT's (first match wins). transformers 5.24 names the SigLIP tower's
#: parts directly under ``model.vision_tower.``; a ``vision_model.`` level (other transformers versions)
#: maps to the same names.
NAME_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.language_model.", "model."),
    (_TOWER + "vision_model.", _THEIR_TOWER),
    (_TOWER, _THEIR_TOWER),
    ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
    ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
    ("model.image_newline", "model.image_newline"),
    ("faster_token", "model.faster_token"),
    ("lm_head.", "lm_head."),
    (AR_PREFIX, AR_PREFIX),
)
#: Words that send LLaVA-NeXT's ``load_pretrained_model`` to another model class when they appear in
#: the model name (it tests them before ``qwen``), and ``vicuna``/``yi`` that also change llava_vid's RoPE.
_OTHER_MODEL_WORDS: tuple[str, ...] = ("mixtral", "mistral", "zephyr", "llama", "yi", "nous-hermes", "llava-v1.6-34b",
                                       "llava-v1.5", "vicuna", "moe", "a14b")
#: lmms-eval ``llava_vid`` conversation template for Qwen2 (ChatML with the default system prompt).
CONV_TEMPLATE = "qwen_1_5"


def _text_rope_theta(text: Any) -> tuple[float | None, str]:
    params = getattr(text, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(text, "rope_theta", None))
    return theta, params.get("rope_type", "default")


def _layout(config: Any) -> Any:
    return _processor_info(config).layout


def used_tower_layers(config: Any) -> int | None:
    """Tower layers the LLM's features pass through (``vision_feature_layer`` counted into
    ``hidden_states``, whose entry 0 is the patch embedding); None for a list of layers."""
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        return None
    total = config.vision_config.num_hidden_layers
    return layer if layer >= 0 else total + 1 + layer


def llava_next_incompatibilities(config: Any) -> list[str]:
    """Why LLaVA-NeXT's model code would not compute what ``config``'s model computes (empty: it would).

    ``config``: a LLaVA-OneVision HF config as our checkpoints store it (``video_layout`` included).
    """
    reasons: list[str] = []
    info = _processor_info(config)
    layout = info.layout
    vision, text = config.vision_config, config.text_config
    if layout.add_faster_video:
        reasons.append("add_faster_video=True: lmms-eval's llava_vid forces add_faster_video=False, LLaVA-NeXT's "
                       "released video path with it on references an undefined variable "
                       "(all_faster_video_features) and does not create model.faster_token when a checkpoint loads; "
                       "evaluate this model with `python -m lmms_engine.eval`")
    if layout.mm_spatial_pool_stride != 2:
        reasons.append(f"mm_spatial_pool_stride={layout.mm_spatial_pool_stride}: LLaVA-NeXT pools video frames "
                       f"with get_2dPool's default stride 2 and ignores config.mm_spatial_pool_stride")
    if getattr(vision, "model_type", None) != "siglip_vision_model":
        reasons.append(f"vision tower {getattr(vision, 'model_type', None)!r}: only SigLIP is exported")
    elif (vision.image_size, vision.patch_size) != (384, 14):
        reasons.append(f"vision tower image_size={vision.image_size}, patch_size={vision.patch_size}: LLaVA-NeXT's "
                       f"SigLIP wrapper asserts 729 patches (384 px, 14 px patches) and its image processor "
                       f"resizes frames to 384 px")
    if info.image_mean != (0.5, 0.5, 0.5) or info.image_std != (0.5, 0.5, 0.5):
        reasons.append(f"image mean/std {info.image_mean}/{info.image_std}: LLaVA-NeXT's SigLIP image processor "
                       f"normalises with 0.5/0.5")
    if config.vision_feature_select_strategy != "full":
        reasons.append(f"vision_feature_select_strategy={config.vision_feature_select_strategy!r}: LLaVA-NeXT's "
                       f"SigLIP wrapper keeps every patch ('full')")
    used = used_tower_layers(config)
    if used is None:
        reasons.append(f"vision_feature_layer={config.vision_feature_layer!r}: LLaVA-NeXT reads one tower layer")
    elif not 1 <= used <= vision.num_hidden_layers:
        reasons.append(f"vision_feature_layer={config.vision_feature_layer}: LLaVA-NeXT reads the output of a "
                       f"transformer layer, not the patch embedding")
    if config.projector_hidden_act != "gelu" or not getattr(config, "multimodal_projector_bias", True):
        reasons.append(f"projector act={config.projector_hidden_act!r}, bias={config.multimodal_projector_bias}: "
                       f"LLaVA-NeXT's mlp2x_gelu is Linear, exact GELU, Linear, with biases")
    if getattr(text, "model_type", None) != "qwen2":
        reasons.append(f"language model {getattr(text, 'model_type', None)!r}: only Qwen2 (LlavaQwenForCausalLM) "
                       f"is exported")
    else:
        theta, rope_type = _text_rope_theta(text)
        if rope_type != "default" or theta is None:
            reasons.append(f"RoPE {rope_type!r}: LlavaQwenForCausalLM sets rope_scaling=None")
        head_dim = getattr(text, "head_dim", None)
        if head_dim is not None and head_dim != text.hidden_size // text.num_attention_heads:
            reasons.append(f"head_dim={head_dim} != hidden_size/num_attention_heads: transformers 4's Qwen2 "
                           f"derives it")
    return reasons


def llava_vid_model_name(path: str | os.PathLike) -> str:
    """The model name lmms-eval's ``llava_vid`` derives from ``pretrained`` (LLaVA-NeXT's
    ``get_model_name_from_path``): the folder name, prefixed by its parent's for ``checkpoint-*``."""
    parts = Path(os.path.abspath(path)).parts
    last = parts[-1]
    return f"{parts[-2]}_{last}" if last.startswith("checkpoint-") and len(parts) > 1 else last


def llava_vid_name_problems(path: str | os.PathLike) -> list[str]:
    """Why ``llava_vid`` would not load ``path`` as a LLaVA-Qwen model, judging by its name alone
    (LLaVA-NeXT's ``load_pretrained_model`` picks the model class from the name)."""
    name = llava_vid_model_name(path).lower()
    problems = []
    if "llava" not in name:
        problems.append("it lacks 'llava' (LLaVA-NeXT would load a plain language model)")
    if "qwen" not in name:
        problems.append("it lacks 'qwen' (LLaVA-NeXT would not pick LlavaQwenForCausalLM)")
    clashes = [w for w in _OTHER_MODEL_WORDS if w in name]
    if clashes:
        problems.append(f"it contains {', '.join(repr(w) for w in clashes)}, which LLaVA-NeXT tests before 'qwen' "
                        f"(another model class) or which changes llava_vid's RoPE settings")
    return problems


def to_llava_next_name(name: str) -> str:
    """Our parameter name -> LLaVA-NeXT's (module docstring table)."""
    for ours, theirs in NAME_PREFIXES:
        if name == ours or name.startswith(ours):
            return theirs + name[len(ours):]
    raise ValueError(f"parameter {name!r} has no LLaVA-NeXT name; known prefixes: "
                     f"{', '.join(p for p, _ in NAME_PREFIXES)}")


def from_llava_next_name(name: str, tower_prefix: str = _TOWER) -> str:
    """LLaVA-NeXT's parameter name -> ours (inverse of :func:`to_llava_next_name`); tower parameters get
    ``tower_prefix`` (transformers 5.24's ``model.vision_tower.``)."""
    inverse = [(tower_prefix if theirs == _THEIR_TOWER else ours, theirs) for ours, theirs in NAME_PREFIXES]
    matches = [(ours, theirs) for ours, theirs in inverse if name == theirs or name.startswith(theirs)]
    if not matches:
        raise ValueError(f"LLaVA-NeXT parameter {name!r} matches none of {', '.join(t for _, t in NAME_PREFIXES)}")
    ours, theirs = max(matches, key=lambda m: len(m[1]))  # the tower's prefix before the LLM's "model."
    return ours + name[len(theirs):]


def _unused_tower_name(name: str, used_layers: int) -> bool:
    if not name.startswith(_TOWER):
        return False
    rest = name[len(_TOWER):].removeprefix("vision_model.")
    if rest.startswith("head."):
        return True
    if rest.startswith("encoder.layers."):
        return int(rest.split(".")[2]) >= used_layers
    return False


def to_llava_next_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    used_tower_layers: int,
    include_autoregressive: bool = False,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename ``state_dict`` (our names) to LLaVA-NeXT's; return it and the names left out.

    Left out: ``autoregressive_module.*`` unless ``include_autoregressive``; tower layers from
    ``used_tower_layers`` on and the tower's pooling head (unused); ``lm_head.weight`` when it is the
    embedding's tensor (tied: LLaVA-NeXT re-ties it from ``tie_word_embeddings``).
    Tensors are the same objects, not copies.
    """
    embed = state_dict.get("model.language_model.embed_tokens.weight")
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for name, tensor in state_dict.items():
        tied = (name == "lm_head.weight" and embed is not None and tensor.data_ptr() == embed.data_ptr()
                and tensor.shape == embed.shape)
        if (name.startswith(AR_PREFIX) and not include_autoregressive) or tied \
                or _unused_tower_name(name, used_tower_layers):
            dropped.append(name)
            continue
        out[to_llava_next_name(name)] = tensor
    return out, dropped


def _qwen2_fields(text: Any) -> dict[str, Any]:
    """The LLM's config in transformers 4's Qwen2Config terms (LLaVA-NeXT runs on transformers 4)."""
    theta, _ = _text_rope_theta(text)
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
            "use_sliding_window", "sliding_window", "max_window_layers", "attention_dropout", "bos_token_id",
            "eos_token_id", "pad_token_id")
    fields_ = {key: getattr(text, key) for key in keys if hasattr(text, key)}
    fields_.update(rope_theta=theta, rope_scaling=None, use_cache=True)
    return fields_


def _tower_config_problems(vision: Any, used_layers: int, tower: str) -> list[str]:
    """Differences between ``tower``'s config (what LLaVA-NeXT builds the tower from) and ours."""
    folder = Path(tower)
    if tower == SO400M:
        theirs = SO400M_CONFIG
    elif (folder / "config.json").is_file():
        theirs = json.loads((folder / "config.json").read_text())
        theirs = theirs.get("vision_config", theirs) if theirs.get("model_type") == "siglip" else theirs
    else:
        return []  # a hub id we cannot read here: the caller vouches for it
    problems = [f"{key}: {theirs.get(key)} there, {getattr(vision, key)} here" for key in TOWER_KEYS
                if theirs.get(key) != getattr(vision, key)]
    if theirs.get("num_hidden_layers") != used_layers + 1:
        problems.append(f"num_hidden_layers: {theirs.get('num_hidden_layers')} there, {used_layers + 1} needed "
                        f"(LLaVA-NeXT deletes the last layer; the LLM reads layer {used_layers})")
    return problems


def llava_next_config(config: Any, *, vision_tower: str, tied: bool, dtype: torch.dtype,
                      tokenizer_max_length: int | None = None) -> dict[str, Any]:
    """``config.json`` of the export: LLaVA-NeXT's ``LlavaQwenConfig`` (Qwen2 fields and the ``mm_*`` keys)."""
    layout = _layout(config)
    vision = config.vision_config
    max_length = tokenizer_max_length if tokenizer_max_length and tokenizer_max_length < 10**7 \
        else config.text_config.max_position_embeddings
    data = {
        "architectures": ["LlavaQwenForCausalLM"],
        "model_type": "llava_qwen",
        **_qwen2_fields(config.text_config),
        "tie_word_embeddings": tied,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "mm_vision_tower": vision_tower,
        "mm_hidden_size": vision.hidden_size,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": "spatial_unpad",
        "mm_resampler_type": None,
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        # The tower is built at load time (not delayed), so the checkpoint's tower weights replace the
        # weights of mm_vision_tower (LLaVA-NeXT's SigLIP wrapper tests these two keys).
        "mm_tunable_parts": "mm_vision_tower,mm_mlp_adapter,mm_language_model",
        "unfreeze_mm_vision_tower": True,
        "use_mm_proj": True,
        "image_aspect_ratio": getattr(config, "vision_aspect_ratio", "anyres_max_9"),
        "image_grid_pinpoints": [list(p) for p in (getattr(config, "image_grid_pinpoints", None) or [])],
        "mm_spatial_pool_stride": layout.mm_spatial_pool_stride,
        "mm_spatial_pool_mode": layout.mm_spatial_pool_mode,
        "mm_newline_position": layout.mm_newline_position,
        "add_faster_video": layout.add_faster_video,
        "faster_token_stride": layout.faster_token_stride,
        "tokenizer_model_max_length": int(max_length),
        "tokenizer_padding_side": "right",
        "vision_tower_pretrained": None,
    }
    return data


def llava_vid_model_args(output_dir: str | os.PathLike, config: Mapping[str, Any], max_frames: int = 32) -> str:
    """lmms-eval ``--model_args`` for ``llava_vid`` that reproduce the exported layout (llava_vid overwrites
    the checkpoint's pooling/newline keys with its own arguments, whose defaults are average/grid)."""
    args = {
        "pretrained": os.path.abspath(output_dir),
        "conv_template": CONV_TEMPLATE,
        "torch_dtype": "bfloat16" if config.get("torch_dtype") == "bfloat16" else "float16",
        "max_frames_num": max_frames,
        "force_sample": True,
        "mm_spatial_pool_stride": config["mm_spatial_pool_stride"],
        "mm_spatial_pool_mode": config["mm_spatial_pool_mode"],
        "mm_newline_position": config["mm_newline_position"],
        "add_faster_video": False,
    }
    return ",".join(f"{k}={v}" for k, v in args.items())


@dataclass(frozen=True)
class LlavaNextExport:
    """What :func:`export_llava_next` wrote: the folder, its config, the names left out, the model args."""

    output_dir: Path
    config: dict[str, Any]
    tensors: int
    dropped: list[str] = field(default_factory=list)
    model_args: str = ""


def _export_plan(checkpoint: Path, output: Path, vision_tower: str | None) -> tuple[Any, int, str]:
    """Check everything that can be checked before loading weights; return (HF config, tower layers the
    LLM reads, ``mm_vision_tower``). Raises ValueError / FileNotFoundError naming the problem."""

    if output.exists() and any(output.iterdir()):
        raise ValueError(f"--output {output} exists and is not empty; give a new folder (stale shards of an earlier "
                         f"export would be loaded with the new ones)")
    problems = llava_vid_name_problems(output)
    if problems:
        raise ValueError(f"output folder name {llava_vid_model_name(output)!r}: {'; '.join(problems)}. lmms-eval's "
                         f"llava_vid derives the model class from this name: use e.g. "
                         f"{str(output.parent / (output.name + '-llava-qwen'))!r}")
    config = checkpoint_config(checkpoint)
    reasons = llava_next_incompatibilities(config)
    if reasons:
        raise ValueError(f"{checkpoint} cannot be exported one-to-one to LLaVA-NeXT:\n- " + "\n- ".join(reasons))
    used = used_tower_layers(config)
    assert used is not None  # a list of layers is among the reasons above
    vision = config.vision_config
    tower = vision_tower or (SO400M if not _tower_config_problems(vision, used, SO400M) else None)
    if tower is None:
        raise ValueError(
            f"the vision tower (hidden_size={vision.hidden_size}, intermediate_size={vision.intermediate_size}, "
            f"num_attention_heads={vision.num_attention_heads}, {used} layers read) is not SigLIP-so400m: pass "
            f"--vision-tower with a SigLIP checkpoint (folder or hub id, name containing 'siglip') of the same "
            f"shape and {used + 1} layers; LLaVA-NeXT builds the tower from it, then loads the exported weights")
    if Path(tower).is_dir():
        tower = str(Path(tower).resolve())  # LLaVA-NeXT would resolve a relative path from its own cwd
    if "siglip" not in tower or "clip" in tower or tower.startswith(("openai", "laion")) or "ShareGPT4V" in tower:
        raise ValueError(f"vision tower {tower!r}: LLaVA-NeXT picks its SigLIP wrapper only for names containing "
                         f"'siglip' and none of its CLIP markers ('clip', 'openai...', 'laion...', 'ShareGPT4V')")
    mismatch = _tower_config_problems(vision, used, tower)
    if mismatch:
        raise ValueError(f"vision tower {tower!r} does not have this model's tower shape: {'; '.join(mismatch)}")
    return config, used, tower


def export_llava_next(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    include_autoregressive: bool = False,
    vision_tower: str | None = None,
    max_frames: int = 32,
    max_shard_size: str = "5GB",
) -> LlavaNextExport:
    """Write ``checkpoint`` (ours) as a LLaVA-NeXT ``LlavaQwenForCausalLM`` checkpoint in ``output_dir``.

    Args:
        checkpoint: a folder saved by training (final output or ``checkpoint-N``).
        output_dir: a new (or empty) folder; its name must contain ``llava`` and ``qwen`` (``llava_vid``
            picks the model class from it, :func:`llava_vid_name_problems`).
        include_autoregressive: also write ``autoregressive_module.*`` and its config.
        vision_tower: ``mm_vision_tower``: the SigLIP checkpoint LLaVA-NeXT builds the tower from before
            the exported weights replace its weights (name with ``siglip``; its config must match ours with
            one more layer). Default: ``google/siglip-so400m-patch14-384`` when the tower has its shape.
        max_frames: ``max_frames_num`` in the suggested lmms-eval arguments.
        max_shard_size: safetensors shard size (``"5GB"``).

    Raises:
        ValueError: the model is not one-to-one with LLaVA-NeXT (:func:`llava_next_incompatibilities`), the
            output name would make ``llava_vid`` load another class, or the vision tower does not match.
    """
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from lmms_engine.models.llava_video import LlavaVideoForConditionalGeneration

    checkpoint, output = Path(checkpoint), Path(output_dir)
    hf_config, used, tower = _export_plan(checkpoint, output, vision_tower)
    model = LlavaVideoForConditionalGeneration.from_pretrained(checkpoint, dtype="auto")
    if include_autoregressive and getattr(model, "autoregressive_module", None) is None:
        raise ValueError(f"--include-autoregressive: {checkpoint} has no autoregressive module")
    state, dropped = to_llava_next_state_dict(model.state_dict(), used, include_autoregressive)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    config = llava_next_config(hf_config, vision_tower=tower, tied="lm_head.weight" in dropped,
                               dtype=model.model.language_model.embed_tokens.weight.dtype,
                               tokenizer_max_length=getattr(tokenizer, "model_max_length", None))
    if include_autoregressive:
        config["enable_autoregressive"] = True
        config["autoregressive_config"] = hf_config.autoregressive_config

    output.mkdir(parents=True, exist_ok=True)
    _save_sharded(state, output, max_shard_size, save_file)
    (output / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(output)
    make_tokenizer_config_portable(output)
    model_args = llava_vid_model_args(output, config, max_frames)
    info = {"source_checkpoint": str(checkpoint.resolve()), "format": "LLaVA-NeXT LlavaQwenForCausalLM",
            "video_layout": _layout(hf_config).to_dict(), "left_out": dropped,
            "lmms_eval": {"model": "llava_vid", "model_args": model_args}}
    (output / "export_info.json").write_text(json.dumps(info, indent=2) + "\n")
    logger.info("exported %d tensors to %s (left out %d)", len(state), output, len(dropped))
    return LlavaNextExport(output, config, len(state), dropped, model_args)


def _save_sharded(state: Mapping[str, torch.Tensor], output: Path, max_shard_size: str, save_file: Any) -> None:
    """``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards with the index transformers reads
    (the split is huggingface_hub's, the one ``save_pretrained`` uses)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(dict(state), max_shard_size=max_shard_size)
    seen: set[int] = set()
    for filename, names in split.filename_to_tensors.items():
        shard = {}
        for name in names:
            tensor = state[name]
            storage = tensor.untyped_storage().data_ptr()
            # safetensors refuses tensors that share memory: write a second view of a storage as a copy
            shard[name] = tensor.clone() if storage in seen else tensor.contiguous()
            seen.add(storage)
        save_file(shard, str(output / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (output / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def read_llava_next_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of an export (LLaVA-NeXT names), single file or shards."""
    from safetensors.torch import load_file

    folder = Path(folder)
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no model*.safetensors")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(load_file(str(path)))
    return state


__all__ = ["LlavaNextExport", "SO400M", "export_llava_next", "from_llava_next_name", "llava_next_config",
           "llava_next_incompatibilities", "llava_vid_model_args", "llava_vid_model_name", "llava_vid_name_problems",
           "read_llava_next_state_dict", "to_llava_next_name", "to_llava_next_state_dict", "used_tower_layers"]
