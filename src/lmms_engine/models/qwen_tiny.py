"""Tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoints, written fully offline (config, random weights, tokenizer).

``write_tiny_qwen_checkpoint(folder, family)`` writes a folder that ``AutoConfig``,
``AutoTokenizer`` and ``AutoModelForImageTextToText`` load like a hub checkpoint of that family, and
that ``model_config.model_name_or_path`` accepts: tests, the docs' examples and users without a GPU
or a network can train the engine's Qwen path on it in seconds. Also the command line::

    python -m lmms_engine.models.qwen_tiny output/tiny-qwen2_5_vl --family qwen2_5_vl

Sizes: a vision tower of depth 2 and width 64 (patch 14 for Qwen2.5-VL with window attention over
2x2 merged tokens, patch 16 for Qwen3-VL with one deepstack layer, patch 14 for Qwen2-VL), a 2-layer text model of width 64
(4 heads of 16, M-RoPE sections [2, 3, 3]). The tokenizer is the engine's byte-level BPE tokenizer
with Qwen's special tokens (``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``, ``<|vision_end|>``,
``<|video_pad|>``, ``<|image_pad|>``) and a chat template that renders conversations as Qwen's own
templates do: string or content-part messages, a ``{"type": "video"}`` part as
``<|vision_start|><|video_pad|><|vision_end|>``; Qwen2-VL's and Qwen2.5-VL's default system prompt.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmms_engine.data.qwen_vision import QWEN_FAMILIES

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerFast

QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>",
)

_PART = (
    "{% if content is string %}{{ content }}"
    "{% else %}{% for part in content %}"
    "{% if part['type'] == 'video' or 'video' in part %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'image' or 'image' in part %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
)


def qwen_chat_template(default_system: str | None) -> str:
    """A chat template that renders like Qwen-VL's (see the module docstring)."""
    system = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n" + default_system
              + "<|im_end|>\\n' }}{% endif %}") if default_system else ""
    return (
        system
        + "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
        + "{% set content = message['content'] %}" + _PART + "{{ '<|im_end|>\\n' }}{% endfor %}"
        + "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )


def tiny_qwen_tokenizer(family: str) -> "PreTrainedTokenizerFast":
    """The engine's tiny BPE tokenizer with Qwen's special tokens and a Qwen-style chat template."""
    from lmms_engine.data.tokenizer import build_tiny_tokenizer

    _check_family(family)
    system = None if family == "qwen3_vl" else "You are a helpful assistant."
    tokenizer = build_tiny_tokenizer(special_tokens=QWEN_SPECIAL_TOKENS, chat_template=qwen_chat_template(system))
    tokenizer.eos_token = "<|im_end|>"  # as Qwen's instruct tokenizers: generation stops at the end of a turn
    return tokenizer


def tiny_qwen_config(family: str, tokenizer: Any) -> "PretrainedConfig":
    """The tiny config of ``family`` (module docstring), special ids from ``tokenizer``."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig

    _check_family(family)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, in_channels=3, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64)
    if family == "qwen2_vl":
        qwen2 = dict(depth=2, embed_dim=64, hidden_size=64, mlp_ratio=2, num_heads=4, in_channels=3, patch_size=14,
                     spatial_merge_size=2, temporal_patch_size=2)
        return Qwen2VLConfig(vision_config=qwen2, text_config=text, tie_word_embeddings=False, **ids)
    if family == "qwen2_5_vl":
        vision.update(patch_size=14, window_size=56, fullatt_block_indexes=[1], tokens_per_second=2)
        return Qwen2_5_VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=False, **ids)
    vision.update(patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[0])
    text.update(head_dim=16)
    text["rope_parameters"]["mrope_interleaved"] = True
    return Qwen3VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=False, **ids)


def write_tiny_qwen_checkpoint(folder: str | Path, family: str = "qwen2_5_vl", seed: int = 0) -> Path:
    """Write the tiny ``family`` checkpoint (config, seeded random float32 weights, tokenizer) to ``folder``.

    Refuses a non-empty folder that is not such a checkpoint (it never overwrites what it did not
    write); an existing tiny checkpoint of the same family is rewritten. Returns the folder.
    """
    import torch
    from transformers import AutoModelForImageTextToText

    _check_family(family)
    out = Path(folder)
    if out.exists() and any(out.iterdir()):
        marker = out / "config.json"
        if not marker.is_file() or f'"model_type": "{family}"' not in marker.read_text(encoding="utf-8"):
            raise FileExistsError(f"{out} is not empty and holds no {family} checkpoint; choose an empty folder")
    tokenizer = tiny_qwen_tokenizer(family)
    config = tiny_qwen_config(family, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _check_family(family: str) -> None:
    if family not in QWEN_FAMILIES:
        raise ValueError(f"unknown Qwen-VL family {family!r}; valid: {', '.join(QWEN_FAMILIES)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a tiny offline Qwen-VL checkpoint (random weights).")
    parser.add_argument("folder", help="output folder (created; must be empty or hold a tiny checkpoint)")
    parser.add_argument("--family", choices=QWEN_FAMILIES, default="qwen2_5_vl")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_tiny_qwen_checkpoint(args.folder, args.family, args.seed))


if __name__ == "__main__":
    main()


__all__ = ["QWEN_SPECIAL_TOKENS", "qwen_chat_template", "tiny_qwen_config", "tiny_qwen_tokenizer",
           "write_tiny_qwen_checkpoint"]
