"""The run summary names the class that loads the saved model, per family."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from lmms_engine.launch.pipeline import RunSummary, load_instructions


def _summary(load_with: str) -> str:
    return RunSummary(output_dir=Path("out"), last_checkpoint=None, loss_plot=None, log_file=Path("out/log.jsonl"),
                      global_step=1, seconds=1.0, trained_autoregressive=False, load_with=load_with).describe()


def test_llava_models_name_the_engine_class_and_plain_transformers_or_why_not():
    from lmms_engine.models.llava_video import LlavaVideoForConditionalGeneration
    from lmms_engine.models.tiny import tiny_llava_config

    native = LlavaVideoForConditionalGeneration(tiny_llava_config())
    text = load_instructions(native)
    assert text == ("lmms_engine.models.LlavaVideoForConditionalGeneration.from_pretrained, or plain transformers' "
                    "LlavaOnevisionForConditionalGeneration.from_pretrained (AutoModelForImageTextToText)")
    # the class named is the one transformers' Auto class builds for this config
    assert type(AutoModelForImageTextToText.from_config(native.config)).__name__ == \
        "LlavaOnevisionForConditionalGeneration"
    native.attach_autoregressive_module({"num_layers": 1, "num_heads": 4})
    assert load_instructions(native).endswith("; the autoregressive module's weights are ignored there")

    from lmms_engine.data.tokenizer import build_tiny_tokenizer
    from lmms_engine.models.builder import build_model

    grid = build_model({"mm_spatial_pool_mode": "average", "mm_newline_position": "grid"}, build_tiny_tokenizer())
    assert grid.config.model_type == "lmms_video_llava"
    text = load_instructions(grid)
    assert text.startswith("lmms_engine.models.LlavaVideoForConditionalGeneration.from_pretrained (model_type "
                           "lmms_video_llava") and "refuses" in text and "Onevision" not in text
    assert f"  load with    {text}\n" in _summary(text)


@pytest.mark.parametrize("family, plain", [("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
                                           ("qwen3_vl", "Qwen3VLForConditionalGeneration")])
def test_qwen_models_name_their_own_classes(tmp_path_factory, family, plain):
    import lmms_engine.models as models
    from lmms_engine.models.qwen_vl_common import qwen_model_class
    from qwen_support import tiny_checkpoint

    config = AutoConfig.from_pretrained(tiny_checkpoint(tmp_path_factory, family))
    torch.manual_seed(0)
    model = qwen_model_class(family)(config)
    text = load_instructions(model)
    engine = type(model).__name__
    assert text == (f"lmms_engine.models.{engine}.from_pretrained, or plain transformers' {plain}.from_pretrained "
                    f"(AutoModelForImageTextToText)")
    assert getattr(models, engine) is type(model)  # the name printed is importable as printed
    assert type(AutoModelForImageTextToText.from_config(config)).__name__ == plain
    assert "Llava" not in _summary(text)
