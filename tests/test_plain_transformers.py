"""Checkpoints as plain transformers and evaluators see them: generation stops where answers end, and
the saved processor resizes frames to the pixels training saw."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lmms_engine.data.preprocess import ProcessorInfo, frames_to_pixel_values
from lmms_engine.data.tokenizer import build_tiny_tokenizer
from lmms_engine.export.processor import build_processing_class
from lmms_engine.models.builder import build_model
from lmms_engine.models.tiny import tiny_llava_config
from lmms_engine.video.decode import read_video

torch.set_num_threads(1)



@pytest.fixture(scope="module")
def hd_clip(tmp_path_factory) -> Path:
    """A 1280x720 H.264 (4:2:0) clip of sharp-edged colour blocks and smooth gradients: chroma at half
    resolution, as in real video, so scaling before or after the RGB conversion makes a difference."""
    from lmms_engine.video.encode import write_video

    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (18, 32, 3), dtype=np.uint8).repeat(40, 0).repeat(40, 1)
    ys, xs = np.mgrid[0:720, 0:1280]
    gradient = np.stack([xs * 255 // 1279, ys * 255 // 719, (xs + ys) * 255 // 1998], -1).astype(np.uint8)
    frame = np.where((xs // 320 + ys // 240)[..., None] % 2 == 0, blocks, gradient)
    path = tmp_path_factory.mktemp("hd") / "hd.mp4"
    write_video(path, [frame, frame], fps=2.0, crf=12)
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def _always_answer(model, token_id: int) -> None:
    """Rig the LLM so every greedy step emits ``token_id``: the last layer's attention writes a large
    constant into hidden dimension 0 (value bias through o_proj), the final norm keeps only that
    dimension, and only ``token_id``'s lm_head row reads it."""
    lm = model.model.language_model
    attn = lm.layers[-1].self_attn
    with torch.no_grad():
        attn.v_proj.weight.zero_()
        attn.v_proj.bias.fill_(1.0)
        attn.o_proj.weight.zero_()
        attn.o_proj.weight[0].fill_(100.0)
        lm.norm.weight.zero_()
        lm.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[token_id, 0] = 1.0


def test_plain_transformers_generation_stops_at_the_chats_end_token(tokenizer, tmp_path):
    from transformers import GenerationConfig, LlavaOnevisionForConditionalGeneration

    from lmms_engine.train import AutoregressiveTrainer, TrainingArguments

    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token_id == im_end != tokenizer.pad_token_id
    model = build_model({}, tokenizer)
    _always_answer(model, im_end)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to="none", save_strategy="no")
    trainer = AutoregressiveTrainer(model=model, args=args, processing_class=build_processing_class(tokenizer, model),
                                    enable_autoregressive=False)
    trainer.save_model(str(tmp_path / "ckpt"))

    def first(eos):
        return eos if isinstance(eos, int) else eos[0]

    saved = json.loads((tmp_path / "ckpt" / "generation_config.json").read_text())
    assert first(saved["eos_token_id"]) == im_end and saved["pad_token_id"] == tokenizer.pad_token_id
    assert first(GenerationConfig.from_pretrained(tmp_path / "ckpt").eos_token_id) == im_end

    plain = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "ckpt").eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    out = plain.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    # One new token, <|im_end|>, then stop (the old eos, <|endoftext|>, let it run to max_new_tokens).
    assert out[0, ids.shape[1]:].tolist() == [im_end]


@pytest.mark.parametrize("size,patch", [(64, 8), (384, 14)])
def test_saved_processor_resizes_a_frame_to_the_training_pixels(tokenizer, hd_clip, tmp_path, size, patch):
    """An evaluator decodes frames at the native size and resizes them with the checkpoint's image
    processor (PIL backend); training resized inside the decoder. Same filter, in RGB: within 4-5
    levels of 255 at worst, 0.3 on average (on a real 720p frame, YUV-bilinear training against the
    bicubic processor differed by 1.7 on average and up to 55)."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    config = tiny_llava_config(tokenizer, {"vision_config": {"image_size": size, "patch_size": patch}})
    build_processing_class(tokenizer, config).save_pretrained(tmp_path)
    processor = LlavaOnevisionImageProcessorPil.from_pretrained(tmp_path)
    assert processor.resample == Image.Resampling.BICUBIC
    video = json.loads((tmp_path / "video_preprocessor_config.json").read_text())
    assert video["resample"] == int(Image.Resampling.BICUBIC)

    native = read_video(hd_clip, [1]).frames[0]  # [3, 720, 1280]
    trained = read_video(hd_clip, [1], target_size=(size, size)).frames  # [1, 3, size, size]
    info = ProcessorInfo.from_model_config(config)
    ours = frames_to_pixel_values(trained, size, info.image_mean, info.image_std)[0]
    theirs = processor(Image.fromarray(native.permute(1, 2, 0).numpy()), return_tensors="pt")["pixel_values"][0][0]
    levels = (ours - theirs).abs() * 255 * info.image_std[0]  # back to 0..255 pixel levels
    print(size, float(levels.mean()), float(levels.max()))
    assert levels.mean() < 0.5 and levels.max() <= 6
    # The tensor path (frames decoded at another size, resized by frames_to_pixel_values) agrees too.
    resized = frames_to_pixel_values(native[None].contiguous(), size, info.image_mean, info.image_std)[0]
    assert ((resized - theirs).abs() * 255 * info.image_std[0]).max() <= 2
    assert np.isfinite(levels.numpy()).all()
