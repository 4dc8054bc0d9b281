"""Evaluator-ready exports: processor files in checkpoints (AutoProcessor / lmms-eval llava_hf) and the
LLaVA-NeXT-format export (lmms-eval llava_vid) whose tensors map back bit-identical."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer

from model_support import AR_SMALL, video_batch

from lmms_engine.data.preprocess import ProcessorInfo, frames_to_pixel_values
from lmms_engine.data.tokenizer import build_tiny_tokenizer
from lmms_engine.export.__main__ import main as export_main
from lmms_engine.export.llava_next import (
    SO400M,
    export_llava_next,
    from_llava_next_name,
    llava_next_incompatibilities,
    llava_vid_model_name,
    llava_vid_name_problems,
    read_llava_next_state_dict,
    to_llava_next_name,
    to_llava_next_state_dict,
    used_tower_layers,
)
from lmms_engine.export.processor import (
    PROCESSOR_FILES,
    CheckpointProcessor,
    build_processing_class,
    resolve_processor_files,
)
from lmms_engine.models.builder import build_model
from lmms_engine.models.tiny import tiny_llava_config


NUM_FRAMES = 8
#: The tiny tower at LLaVA-NeXT's geometry (384 px, 14 px patches: 27x27 = 729 patches), 64 wide.
TOWER_384 = {"vision_config": {"image_size": 384, "patch_size": 14}}
CONVERSATION = [{"role": "user", "content": "<video>\nWhich way does it move?"},
                {"role": "assistant", "content": "left"}]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def tiny_config(tokenizer):
    return tiny_llava_config(tokenizer)


def saved_processor(tokenizer, config, folder: Path, source: str | None = None) -> Path:
    build_processing_class(tokenizer, config, source).save_pretrained(folder)
    return folder


def with_layout(config, **layout):
    config = type(config).from_dict(config.to_dict())
    config.video_layout = {**(getattr(config, "video_layout", None) or {}), **layout}
    return config


# ------------------------------------------------------------------------------------------ processor files
def test_saved_parts_load_with_transformers_and_match_the_model(tokenizer, tiny_config, tmp_path):
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    folder = saved_processor(tokenizer, tiny_config, tmp_path)
    info = ProcessorInfo.from_model_config(tiny_config)
    assert {p.name for p in folder.iterdir()} >= set(PROCESSOR_FILES) | {"tokenizer.json", "tokenizer_config.json"}

    loaded = AutoTokenizer.from_pretrained(folder)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.convert_tokens_to_ids("<video>") == tiny_config.video_token_id
    assert loaded.convert_tokens_to_ids("<image>") == tiny_config.image_token_id
    assert (loaded.eos_token, loaded.pad_token) == (tokenizer.eos_token, tokenizer.pad_token)
    for prompt in (True, False):
        messages = CONVERSATION[:1] if prompt else CONVERSATION
        text = loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        assert text == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]

    image = LlavaOnevisionImageProcessorPil.from_pretrained(folder)
    assert type(AutoImageProcessor.from_pretrained(folder)).__name__.startswith("LlavaOnevisionImageProcessor")
    assert image.size == {"height": 64, "width": 64}
    assert tuple(image.image_mean) == info.image_mean and tuple(image.image_std) == info.image_std
    assert image.image_grid_pinpoints == tiny_config.image_grid_pinpoints
    # A frame already at the tower's size: the image processor's base patch is exactly our normalisation.
    frame = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    pixels = image(Image.fromarray(frame), return_tensors="pt")["pixel_values"][0][0]
    ours = frames_to_pixel_values(torch.from_numpy(frame).permute(2, 0, 1)[None], 64, info.image_mean, info.image_std)
    torch.testing.assert_close(pixels, ours[0], rtol=0, atol=1e-6)

    video = LlavaOnevisionVideoProcessor.from_pretrained(folder)
    assert video.size == {"height": 64, "width": 64}
    assert tuple(video.image_mean) == info.image_mean and tuple(video.image_std) == info.image_std

    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["processor_class"] == "LlavaOnevisionProcessor"
    assert processor_config["num_image_tokens"] == 8 * 8  # 64 px / 8 px patches
    assert processor_config["vision_feature_select_strategy"] == tiny_config.vision_feature_select_strategy
    assert processor_config["video_token"] == "<video>"


def test_hf_processor_arithmetic_on_saved_config_gives_the_models_video_token_count(tokenizer, tiny_config, tmp_path):
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

    folder = saved_processor(tokenizer, tiny_config, tmp_path)
    saved = json.loads((folder / "processor_config.json").read_text())
    # HF's own replace_video_token on the saved values (building the processor itself needs torchvision).
    holder = SimpleNamespace(num_image_tokens=saved["num_image_tokens"], video_token=saved["video_token"])
    clip = {"pixel_values_videos": [torch.zeros(NUM_FRAMES, 3, 64, 64)]}
    expanded = LlavaOnevisionProcessor.replace_video_token(holder, clip, 0)
    layout = ProcessorInfo.from_model_config(tiny_config)
    assert expanded.count("<video>") == layout.video_token_count(NUM_FRAMES) == NUM_FRAMES * 4 * 4 + 1


def test_processor_chat_template_renders_parts_like_the_training_prompt(tokenizer, tiny_config, tmp_path):
    folder = saved_processor(tokenizer, tiny_config, tmp_path)
    template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
    parts = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Which way does it move?"}]}]
    rendered = tokenizer.apply_chat_template(parts, chat_template=template, tokenize=False, add_generation_prompt=True)
    assert rendered == tokenizer.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True)


def test_portable_tokenizer_config_for_transformers_4(tokenizer, tiny_config, tmp_path):
    folder = saved_processor(tokenizer, tiny_config, tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "extra_special_tokens" not in config
    assert {"<video>", "<image>", "<|im_end|>"} <= set(config["additional_special_tokens"])
    assert config["chat_template"] == tokenizer.chat_template
    assert config["processor_class"] == "LlavaOnevisionProcessor"


def test_source_processor_files_are_copied_and_missing_ones_generated(tokenizer, tiny_config, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    own = {"preprocessor_config.json": b'{"image_processor_type": "LlavaOnevisionImageProcessor", "marker": 1}',
           "processor_config.json": b'{"processor_class": "LlavaOnevisionProcessor", "num_image_tokens": 64}',
           "chat_template.json": b'{"chat_template": "source template"}'}
    for name, content in own.items():
        (source / name).write_bytes(content)
    files = resolve_processor_files(tokenizer, tiny_config, str(source))
    for name, content in own.items():
        assert files.files[name] == content and files.origin[name] == f"source {source}"
    assert files.origin["video_preprocessor_config.json"] == "generated"
    out = saved_processor(tokenizer, tiny_config, tmp_path / "ckpt", str(source))
    assert (out / "preprocessor_config.json").read_bytes() == own["preprocessor_config.json"]


def test_unreachable_hub_source_falls_back_to_generated_files_with_a_warning(tokenizer, tiny_config, monkeypatch,
                                                                           caplog):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail now, not after retries
    with caplog.at_level(logging.WARNING, logger="lmms_engine.export.processor"):
        files = resolve_processor_files(tokenizer, tiny_config, "lmms-video-tests/no-such-checkpoint")
    assert "could not read the processor files of 'lmms-video-tests/no-such-checkpoint'" in caplog.text
    assert set(files.origin.values()) == {"generated"} and set(files.files) == set(PROCESSOR_FILES)


def test_non_hf_layout_is_saved_with_a_warning(tokenizer, tiny_config, caplog):
    config = with_layout(tiny_config, mm_spatial_pool_mode="average", mm_newline_position="grid")
    with caplog.at_level(logging.WARNING, logger="lmms_engine.export.processor"):
        processor = build_processing_class(tokenizer, config)
    assert "lmms_video_llava, which plain transformers (and lmms-eval's llava_hf) refuse" in caplog.text
    assert "lmms-eval llava_hf: does not reproduce this checkpoint" in caplog.text
    assert "- lmms_engine.eval: reproduces this checkpoint" in caplog.text
    assert processor.processor_files.processor_config["num_image_tokens"] == 64


def test_cli_adds_processor_files_to_a_checkpoint_saved_without_them(tokenizer, tiny_config, tmp_path, capsys):
    tiny_config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert export_main(["processor", "--checkpoint", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    expected = build_processing_class(tokenizer, tiny_config).processor_files.files
    for name, content in expected.items():
        assert (tmp_path / name).read_bytes() == content and str(tmp_path / name) in printed
    assert AutoTokenizer.from_pretrained(tmp_path).get_vocab() == tokenizer.get_vocab()
    assert export_main(["processor", "--checkpoint", str(tmp_path / "missing")]) == 2


def test_trainer_checkpoints_and_final_model_hold_the_processor_files(tokenizer, tmp_path):
    from transformers import default_data_collator

    from train_support import training_args

    from lmms_engine.train import AutoregressiveTrainer

    torch.manual_seed(0)
    model = build_model({}, tokenizer)
    batch = video_batch(model, [2, 2], max_frames=2)
    samples = [{key: value[i] for key, value in batch.items()} for i in range(2)]
    processor = build_processing_class(tokenizer, model)
    assert isinstance(processor, CheckpointProcessor) and processor.model_input_names[0] == "input_ids"
    trainer = AutoregressiveTrainer(model=model, args=training_args(tmp_path, max_steps=1, save_strategy="steps",
                                                                    save_steps=1),
                                    train_dataset=samples, data_collator=default_data_collator,
                                    processing_class=processor, enable_autoregressive=False)
    trainer.train()
    trainer.save_model()
    for folder in (tmp_path / "checkpoint-1", tmp_path):
        for name, content in processor.processor_files.files.items():
            assert (folder / name).read_bytes() == content, (folder, name)
        assert AutoTokenizer.from_pretrained(folder).get_vocab() == tokenizer.get_vocab()


def test_autoprocessor_loads_the_checkpoint_and_counts_the_models_video_tokens(tokenizer, tiny_config, tmp_path):
    pytest.importorskip("torchvision")
    from transformers import AutoProcessor, LlavaOnevisionProcessor

    folder = saved_processor(tokenizer, tiny_config, tmp_path)
    processor = AutoProcessor.from_pretrained(folder)
    assert isinstance(processor, LlavaOnevisionProcessor)
    frames = np.random.default_rng(0).integers(0, 256, (NUM_FRAMES, 64, 64, 3), dtype=np.uint8)
    prompt = tokenizer.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True)
    inputs = processor(text=prompt, videos=[frames], return_tensors="pt")
    expected = ProcessorInfo.from_model_config(tiny_config).video_token_count(NUM_FRAMES)
    assert int((inputs["input_ids"] == tiny_config.video_token_id).sum()) == expected
    assert tuple(inputs["pixel_values_videos"].shape) == (1, NUM_FRAMES, 3, 64, 64)


# ------------------------------------------------------------------------------------------ LLaVA-NeXT export
@pytest.fixture(scope="module")
def checkpoint(tokenizer, tmp_path_factory):
    """A tiny model at LLaVA-NeXT's tower geometry with a non-HF layout and the autoregressive module."""
    torch.manual_seed(0)
    model = build_model({"tiny_config": TOWER_384, "mm_spatial_pool_mode": "average", "mm_newline_position": "grid",
                         "enable_autoregressive": True, "autoregressive_config": dict(AR_SMALL)}, tokenizer)
    folder = tmp_path_factory.mktemp("export") / "trained"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    tower = folder.parent / "siglip-tiny"  # the SigLIP config LLaVA-NeXT would build the tower from
    tower.mkdir()
    vision = model.config.vision_config.to_dict()
    (tower / "config.json").write_text(json.dumps({**vision, "num_hidden_layers": vision["num_hidden_layers"] + 1}))
    return SimpleNamespace(folder=folder, tower=str(tower), state=model.state_dict(), config=model.config,
                           layout=model.video_layout)


@pytest.fixture(scope="module")
def exported(checkpoint):
    out = checkpoint.folder.parent / "tiny-llava-qwen"
    return export_llava_next(checkpoint.folder, out, vision_tower=checkpoint.tower)


def test_exported_tensors_map_back_bit_identical_without_the_autoregressive_head(checkpoint, exported):
    theirs = read_llava_next_state_dict(exported.output_dir)
    ours = checkpoint.state
    for name, tensor in theirs.items():
        mine = ours[from_llava_next_name(name)]
        assert tensor.dtype == mine.dtype and torch.equal(tensor, mine), name
    expected = {name for name in ours if not name.startswith("autoregressive_module.")}
    assert {from_llava_next_name(name) for name in theirs} == expected
    assert sorted(exported.dropped) == sorted(set(ours) - expected) and exported.dropped
    assert {"model.image_newline", "model.mm_projector.0.weight", "model.mm_projector.2.bias", "lm_head.weight",
            "model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.bias",
            "model.vision_tower.vision_tower.vision_model.encoder.layers.1.mlp.fc2.weight"} <= set(theirs)


def test_exported_config_holds_the_layout_and_the_llava_qwen_fields(checkpoint, exported):
    config = json.loads((exported.output_dir / "config.json").read_text())
    layout, text = checkpoint.layout, checkpoint.config.text_config
    assert config["architectures"] == ["LlavaQwenForCausalLM"] and config["model_type"] == "llava_qwen"
    for key in ("mm_spatial_pool_stride", "mm_spatial_pool_mode", "mm_newline_position", "add_faster_video",
                "faster_token_stride"):
        assert config[key] == getattr(layout, key), key
    assert (config["mm_spatial_pool_mode"], config["mm_newline_position"]) == ("average", "grid")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps"):
        assert config[key] == getattr(text, key), key
    assert config["rope_theta"] == text.rope_parameters["rope_theta"] and config["rope_scaling"] is None
    assert config["mm_hidden_size"] == checkpoint.config.vision_config.hidden_size
    assert config["mm_vision_tower"] == checkpoint.tower and config["mm_projector_type"] == "mlp2x_gelu"
    assert config["mm_patch_merge_type"] == "spatial_unpad" and config["tie_word_embeddings"] is False
    assert "autoregressive_config" not in config
    for arg in ("mm_spatial_pool_mode=average", "mm_newline_position=grid", "mm_spatial_pool_stride=2",
                "conv_template=qwen_1_5", "add_faster_video=False"):
        assert arg in exported.model_args
    tokenizer = AutoTokenizer.from_pretrained(exported.output_dir)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == AutoTokenizer.from_pretrained(
        checkpoint.folder).convert_tokens_to_ids("<|im_end|>")


def test_include_autoregressive_writes_the_head_bit_identical_in_shards(checkpoint, tmp_path):
    out = tmp_path / "ar-llava-qwen"
    result = export_llava_next(checkpoint.folder, out, include_autoregressive=True, vision_tower=checkpoint.tower,
                               max_shard_size="400KB")
    theirs = read_llava_next_state_dict(out)
    head = {name for name in checkpoint.state if name.startswith("autoregressive_module.")}
    assert head and head <= set(theirs) and not result.dropped
    assert {from_llava_next_name(name) for name in theirs} == set(checkpoint.state)
    for name, tensor in theirs.items():
        assert torch.equal(tensor, checkpoint.state[from_llava_next_name(name)]), name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"]) == set(theirs)
    assert set(index["weight_map"].values()) == set(shards)
    assert json.loads((out / "config.json").read_text())["autoregressive_config"] == \
        checkpoint.config.autoregressive_config


def test_faster_token_and_every_name_round_trip_through_the_mapping(tokenizer):
    model = build_model({"add_faster_video": True, "mm_newline_position": "grid"}, tokenizer)
    state = model.state_dict()
    theirs, dropped = to_llava_next_state_dict(state, used_tower_layers(model.config))
    assert "model.faster_token" in theirs and not dropped
    back = {from_llava_next_name(name): tensor for name, tensor in theirs.items()}
    assert back.keys() == state.keys() and all(back[n] is state[n] for n in state)
    for ours in ("model.vision_tower.post_layernorm.weight", "model.vision_tower.vision_model.post_layernorm.weight"):
        assert to_llava_next_name(ours) == "model.vision_tower.vision_tower.vision_model.post_layernorm.weight"


def test_tower_layers_the_llm_does_not_read_and_tied_lm_head_are_left_out():
    embed = torch.zeros(4, 2)
    state = {"model.language_model.embed_tokens.weight": embed, "lm_head.weight": embed,
             **{f"model.vision_tower.encoder.layers.{i}.mlp.fc1.weight": torch.ones(1) for i in range(3)},
             "model.vision_tower.head.probe": torch.ones(1)}
    theirs, dropped = to_llava_next_state_dict(state, used_tower_layers=2)
    assert sorted(dropped) == ["lm_head.weight", "model.vision_tower.encoder.layers.2.mlp.fc1.weight",
                               "model.vision_tower.head.probe"]
    assert set(theirs) == {"model.embed_tokens.weight",
                           "model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
                           "model.vision_tower.vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight"}
    config = tiny_llava_config()
    config.vision_feature_layer = -2  # 2 tower layers: the LLM reads the output of layer 0 (hidden_states[1])
    assert used_tower_layers(config) == 1


def test_layouts_llava_next_cannot_reproduce_are_refused_with_the_reason(tokenizer, tmp_path):
    base = tiny_llava_config(tokenizer, TOWER_384)
    assert llava_next_incompatibilities(base) == []
    for pool in ("average", "max", "bilinear"):
        for newline in ("grid", "frame", "one_token", "no_token"):
            config = with_layout(base, mm_spatial_pool_mode=pool, mm_newline_position=newline)
            assert llava_next_incompatibilities(config) == []
    assert "stride 2" in " ".join(llava_next_incompatibilities(with_layout(base, mm_spatial_pool_stride=3)))
    assert "729 patches" in " ".join(llava_next_incompatibilities(tiny_llava_config(tokenizer)))
    faster = with_layout(base, add_faster_video=True, mm_newline_position="grid")
    faster.save_pretrained(tmp_path / "faster")
    with pytest.raises(ValueError, match="add_faster_video=True: lmms-eval's llava_vid forces"):
        export_llava_next(tmp_path / "faster", tmp_path / "faster-llava-qwen", vision_tower="x/siglip")


def test_output_name_and_vision_tower_are_checked(checkpoint, tmp_path, capsys):
    assert llava_vid_model_name("/runs/exp-llava-qwen/checkpoint-50") == "exp-llava-qwen_checkpoint-50"
    assert llava_vid_name_problems("/runs/exp-llava-qwen/checkpoint-50") == []
    assert any("'llama'" in p for p in llava_vid_name_problems("/runs/llama-llava-qwen"))
    with pytest.raises(ValueError, match="lacks 'llava'"):
        export_llava_next(checkpoint.folder, tmp_path / "export", vision_tower=checkpoint.tower)
    (tmp_path / "used-llava-qwen").mkdir()
    (tmp_path / "used-llava-qwen" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="exists and is not empty"):
        export_llava_next(checkpoint.folder, tmp_path / "used-llava-qwen", vision_tower=checkpoint.tower)
    with pytest.raises(ValueError, match="is not SigLIP-so400m: pass --vision-tower"):
        export_llava_next(checkpoint.folder, tmp_path / "a-llava-qwen")
    with pytest.raises(ValueError, match="num_hidden_layers: 27 there, 3 needed"):
        export_llava_next(checkpoint.folder, tmp_path / "b-llava-qwen", vision_tower=SO400M)
    assert export_main(["llava-next", "--checkpoint", str(checkpoint.folder), "--output",
                        str(tmp_path / "c-llava-qwen"), "--vision-tower", "google/clip-vit"]) == 2
    assert "names containing 'siglip'" in capsys.readouterr().err


def test_cli_exports_and_prints_the_llava_vid_command(checkpoint, tmp_path, capsys):
    out = tmp_path / "cli-llava-qwen"
    code = export_main(["llava-next", "--checkpoint", str(checkpoint.folder), "--output", str(out),
                        "--vision-tower", checkpoint.tower, "--max-frames", "16"])
    printed = capsys.readouterr().out
    assert code == 0 and "--model llava_vid" in printed and "max_frames_num=16" in printed
    info = json.loads((out / "export_info.json").read_text())
    assert info["video_layout"] == checkpoint.layout.to_dict() and info["lmms_eval"]["model"] == "llava_vid"
