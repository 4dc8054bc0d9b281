"""The tiny offline Qwen-VL checkpoints: they load in plain transformers and refuse foreign folders."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

from lmms_engine.models.qwen_tiny import write_tiny_qwen_checkpoint


@pytest.mark.parametrize("family, cls", [("qwen2_vl", "Qwen2VLForConditionalGeneration"),
                                         ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
                                         ("qwen3_vl", "Qwen3VLForConditionalGeneration")])
def test_tiny_checkpoint_loads_in_plain_transformers(tmp_path, family, cls):
    folder = write_tiny_qwen_checkpoint(tmp_path / family, family, seed=3)
    config = AutoConfig.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert config.model_type == family and type(model).__name__ == cls
    assert config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert config.text_config.vocab_size == len(tokenizer)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "video", "video": "a.mp4"}, {"type": "text", "text": "Why?"}]}],
        tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Why?<|im_end|>\n"
                         "<|im_start|>assistant\n")
    # same seed, same weights
    again = AutoModelForImageTextToText.from_pretrained(write_tiny_qwen_checkpoint(tmp_path / "again", family, seed=3))
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_tiny_checkpoint_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        write_tiny_qwen_checkpoint(tmp_path, "qwen2_5_vl")
    assert (tmp_path / "notes.txt").read_text() == "mine"
