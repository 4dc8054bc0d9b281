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


_PLAIN_LOAD = """
import logging, sys
from transformers import AutoConfig, LlavaOnevisionForConditionalGeneration
try:
    AutoConfig.from_pretrained(sys.argv[1])
    print("AUTOCONFIG loaded")
except (ValueError, KeyError) as err:
    print("AUTOCONFIG refused:", str(err).splitlines()[0])
LlavaOnevisionForConditionalGeneration.from_pretrained(sys.argv[1])
"""


def test_a_layout_plain_transformers_cannot_reproduce_is_refused_there_and_loads_here(tokenizer, tmp_path):
    """Average pooling with grid newlines: plain transformers would build 129 video tokens for 8 frames
    where the model was trained on 8 x 4 x (4 + 1) = 160. Its Auto classes refuse the checkpoint's model
    type, its LLaVA-OneVision class warns; the engine loads it with its layout."""
    import subprocess
    import sys

    from lmms_engine.models.llava_video import LlavaVideoConfig, LlavaVideoForConditionalGeneration

    layout = {"mm_spatial_pool_mode": "average", "mm_newline_position": "grid"}
    model = build_model(layout, tokenizer)
    assert type(model.config) is LlavaVideoConfig and model.config.model_type == "lmms_video_llava"
    model.save_pretrained(tmp_path / "grid")
    assert json.loads((tmp_path / "grid" / "config.json").read_text())["model_type"] == "lmms_video_llava"

    plain = subprocess.run([sys.executable, "-c", _PLAIN_LOAD, str(tmp_path / "grid")], capture_output=True,
                           text=True, timeout=180)
    assert "AUTOCONFIG refused:" in plain.stdout and "lmms_video_llava" in plain.stdout, plain.stdout + plain.stderr
    assert "You are using a model of type `lmms_video_llava`" in plain.stderr

    from lmms_engine.launch.config import load_pipeline_config

    config, records = tmp_path / "finetune.yaml", tmp_path / "train.json"  # the check reads the model type too
    records.write_text(json.dumps([{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}]))
    config.write_text(f"- type: trainer\n  config:\n    model_config: {{model_name_or_path: {tmp_path / 'grid'}}}\n"
                      f"    dataset_config: {{data_path: {records}}}\n    output_dir: {tmp_path / 'out'}\n")
    assert load_pipeline_config(config).of_type("trainer")[0].model_config.model_name_or_path == str(tmp_path / "grid")

    again = LlavaVideoForConditionalGeneration.from_pretrained(tmp_path / "grid")
    assert again.video_layout == model.video_layout and type(again.config) is LlavaVideoConfig
    assert again.video_layout.video_token_count(8, again.patch_side) == 8 * 4 * 5
    reloaded = build_model({"model_name_or_path": str(tmp_path / "grid")}, tokenizer)
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in model.state_dict().items())
    # Back to HF's own layout: the checkpoint is a plain llava_onevision one again.
    native = build_model({"model_name_or_path": str(tmp_path / "grid"), "mm_spatial_pool_mode": "bilinear",
                          "mm_newline_position": "one_token"}, tokenizer)
    native.save_pretrained(tmp_path / "native")
    assert json.loads((tmp_path / "native" / "config.json").read_text())["model_type"] == "llava_onevision"


@pytest.mark.parametrize("layout,exact", [
    ({}, {"lmms_engine.eval", "lmms-eval llava_hf"}),
    ({"mm_spatial_pool_mode": "average", "mm_newline_position": "grid"}, {"lmms_engine.eval"}),
])
def test_export_routes_name_exactly_the_evaluators_that_reproduce_the_checkpoint(tokenizer, tmp_path, capsys,
                                                                                layout, exact):
    """The tiny tower (64 px) is not LLaVA-NeXT's shape, so llava_vid is never exact for it; llava_hf is
    exact only for transformers' own layout; lmms_engine.eval always."""
    from lmms_engine.export.__main__ import main as export_main
    from lmms_engine.export.routes import evaluation_routes

    build_model(layout, tokenizer).save_pretrained(tmp_path / "run")
    assert export_main(["routes", "--checkpoint", str(tmp_path / "run"), "--max-frames", "8"]) == 0
    out = capsys.readouterr().out
    routes = evaluation_routes(tiny_llava_config(tokenizer) if not layout else build_model(layout, tokenizer).config,
                               tmp_path / "run", 8)
    assert {r.name for r in routes if r.exact} == exact
    for route in routes:
        assert (f"- {route.name}: reproduces this checkpoint" in out) == route.exact
    assert "image_size=64, patch_size=8" in out  # why llava_vid is not exact, in its own words
    if "lmms-eval llava_hf" in exact:
        assert f"pretrained={tmp_path / 'run'},device_map=auto,max_frames_num=8" in out and "--force_simple" in out
