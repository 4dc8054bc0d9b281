"""FLOPs arithmetic on the tiny config, and the throughput callback's rates and counts."""

from __future__ import annotations

import pytest
import torch


from lmms_engine.models.tiny import tiny_llava_config  # noqa: E402
from lmms_engine.train.throughput import ModelFlops, ThroughputCallback, peak_flops  # noqa: E402


def test_flops_of_tiny_config_equal_hand_computation() -> None:
    flops = ModelFlops.from_config(tiny_llava_config())
    # Qwen2 h=64, 4 heads (head_dim 16), 2 kv heads, inter 128, 2 layers, vocab 512:
    # per layer q 64*64 + k,v 2*64*32 + o 64*64 + mlp 3*64*128 = 36864; lm_head 64*512.
    assert flops.llm_params == 2 * 36864 + 64 * 512 == 106496
    # seq 100: 6 * 106496 + 12 * 2 layers * 64 * 100
    assert flops.llm_per_token(100) == 638976 + 153600
    # SigLIP d=64, inter 128, 2 layers, patch 8 on 64 px: 64 patches; weights 2*(4*64^2 + 2*64*128) +
    # patch embedding 3*8*8*64 = 77824; frozen tower: forward only, 2*77824*64 + attention 4*2*64*64^2;
    # trainable projector (64*64 + 64*64) x 6 x 64 patches.
    assert flops.tower_params == 77824 and flops.patches == 64
    assert flops.vision_per_frame() == 9961472 + 2097152 + 3145728
    trainable = ModelFlops.from_config(tiny_llava_config(), tower_trainable=True)
    assert trainable.vision_per_frame() == 3 * (9961472 + 2097152) + 3145728
    # AR predictor dim 64, 1 layer, mlp 4: input_proj 64*64 + block 4*64^2 + 2*64*256 = 53248;
    # input_proj on 8 frames x 16 pooled tokens; window "all": 5 windows of 3 x 16 tokens, full attention
    # 4 * 48^2 * 64 forward per window (x3 with backward).
    ar = ModelFlops.from_config(tiny_llava_config(), autoregressive={"embedding_dim": 64, "num_layers": 1,
                                                                      "num_hist": 3, "window": "all"})
    assert ar.predictor_params == 4096 + 16384 + 32768
    assert ar.predictor_per_video(8) == 6 * (4096 * 128 + 49152 * 48 * 5) + 3 * 5 * 4 * 48 ** 2 * 64
    # "sliding": one pass over 7 frames of 16 tokens, chunked attention on CPU: query frames 0-2 against
    # key frames 0-2, 3-5 against 1-5, 6 against 4-6 = 27 frame pairs of 16 x 16 tokens.
    sliding = ModelFlops.from_config(tiny_llava_config(), autoregressive={"embedding_dim": 64, "num_layers": 1,
                                                                           "num_hist": 3, "window": "sliding"})
    assert sliding.predictor_per_video(8) == 6 * (4096 * 128 + 49152 * 112) + 3 * 4 * (27 * 16 ** 2) * 64
    mask = torch.tensor([[1] * 100, [1] * 60 + [0] * 40])
    expected = 100 * flops.llm_per_token(100) + 60 * flops.llm_per_token(60) + 8 * flops.vision_per_frame()
    assert flops.batch_flops(mask.sum(-1).tolist(), torch.tensor([8, 0])) == expected


def test_sample_lengths_of_padded_and_packed_batches_from_the_collator() -> None:
    from lmms_engine.data.collator import VideoSFTCollator
    from lmms_engine.train.throughput import sample_lengths

    pad = 0
    samples = [{"input_ids": torch.arange(1, n + 1), "labels": torch.arange(1, n + 1), "video_num_frames": 0}
               for n in (5, 3, 4, 2)]
    padded = VideoSFTCollator(pad_token_id=pad)(samples)
    assert sample_lengths(padded, pad) == [5, 3, 4, 2]
    packed = VideoSFTCollator(pad_token_id=pad, packing_length=8)(samples)
    assert "attention_mask" not in packed and packed["input_ids"].shape == (2, 8)
    # first-fit decreasing: [5, 3] and [4, 2] + 2 padding tokens, which are not a sample
    assert sample_lengths(packed, pad) == [5, 3, 4, 2]
    assert sample_lengths({"input_ids": packed["input_ids"]}) == [8, 8]


def test_llm_and_tower_parameter_counts_match_the_built_model() -> None:
    from lmms_engine.models.llava_video import LlavaVideoForConditionalGeneration

    config = tiny_llava_config()
    model = LlavaVideoForConditionalGeneration(config)
    flops = ModelFlops.from_model(model)
    # Matmul weights only: every 2-D weight of the decoder layers plus lm_head.
    llm = sum(p.numel() for n, p in model.model.language_model.layers.named_parameters() if p.dim() == 2)
    assert flops.llm_params == llm + model.lm_head.weight.numel()
    tower = model.model.vision_tower
    weights = sum(p.numel() for p in tower.encoder.parameters() if p.dim() == 2)
    assert flops.tower_params == weights + tower.embeddings.patch_embedding.weight.numel()
    assert flops.tower_trainable and flops.projector_trainable  # built directly: nothing frozen
    tower.requires_grad_(False)
    assert not ModelFlops.from_model(model).tower_trainable


def test_rates_on_a_synthetic_window() -> None:
    callback = ThroughputCallback(flops=ModelFlops.from_config(tiny_llava_config()), peak_tflops=1e-3)
    callback.video_token_id = 511
    ids = torch.zeros(2, 50, dtype=torch.long)
    ids[0, 5:15] = 511
    ids[1, 5:35] = 511
    mask = torch.ones(2, 50, dtype=torch.long)
    mask[1, 40:] = 0
    for _ in range(3):
        callback.count({"input_ids": ids, "attention_mask": mask, "video_num_frames": torch.tensor([2, 4])})
    # read as the window summed over 4 ranks: per-device values are means, samples/s the total
    out = callback.metrics(elapsed=2.0, ranks=4)
    assert out["tokens_per_second_per_device"] == 3 * 90 / 4 / 2.0
    assert out["samples_per_second"] == 3 * 2 / 2.0
    assert out["vision_tokens_per_sample"] == (10 + 30) / 2
    f = callback.flops
    flops = 3 * (50 * f.llm_per_token(50) + 40 * f.llm_per_token(40) + 6 * f.vision_per_frame())
    assert out["mfu"] == pytest.approx(flops / 4 / 2.0 / 1e9)


def test_peak_flops() -> None:
    assert peak_flops("cpu") is None
    assert peak_flops("cpu", 989) == 989e12
    with pytest.raises(ValueError, match="peak_tflops"):
        peak_flops("cpu", 0)


def test_callback_logs_every_logging_step_of_a_trainer(tmp_path) -> None:
    from transformers import Trainer, TrainingArguments

    from lmms_engine.models.llava_video import LlavaVideoForConditionalGeneration
    from lmms_engine.train.throughput import add_throughput_logging

    torch.manual_seed(0)
    config = tiny_llava_config()
    model = LlavaVideoForConditionalGeneration(config)
    frames, side = 2, 8
    video_tokens = model.video_layout.video_token_count(frames, side)
    length = video_tokens + 12
    ids = torch.randint(1, 500, (length,))
    ids[2:2 + video_tokens] = config.video_token_id
    sample = {"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long), "labels": ids.clone(),
              "pixel_values_videos": torch.randn(frames, 3, 64, 64), "video_num_frames": torch.tensor(frames)}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=4, logging_steps=2,
                             report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=[sample] * 8)
    add_throughput_logging(trainer, peak_tflops=1.0)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == [2, 4]
    for entry in logged:
        assert entry["vision_tokens_per_sample"] == video_tokens
        assert entry["tokens_per_second_per_device"] > 0 and 0 < entry["mfu"] < 1
        # 2 steps x 2 samples per window: the FLOPs / tokens ratio is fixed by the batch shape.
        per_token = entry["model_tflops_per_second_per_device"] * 1e12 / entry["tokens_per_second_per_device"]
        flops = ModelFlops.from_model(model)
        assert per_token == pytest.approx(flops.llm_per_token(length) + frames * flops.vision_per_frame() / length)


def test_image_batch_equals_the_counted_flops() -> None:
    """An image batch (anyres tiles of a sample's only image, one tile for each of several), a training
    step through the built model: torch's count of the matmuls against the accounting, exact but for the
    patch embedding's missing input gradient (pixels; 1 x its forward where the 6N convention counts 2 x);
    attention forward exact (the LLM's and the tower's on every tile that runs, not on padding tiles)."""
    from lmms_engine.data.images import image_token_count
    from lmms_engine.models.llava_video import LlavaVideoForConditionalGeneration
    from lmms_engine.utils.flops import flops_by_op

    torch.manual_seed(0)
    config = tiny_llava_config()
    side = config.vision_config.image_size
    config.image_grid_pinpoints = [[side, side], [side, 2 * side], [2 * side, side]]
    model = LlavaVideoForConditionalGeneration(config).train()
    flops = ModelFlops.from_model(model)
    sizes = torch.tensor([[40, 90], [50, 50], [30, 70]])  # sample 0: one wide image; sample 1: two images
    batch_num_images = torch.tensor([1, 2])
    assert flops.image_tiles(sizes, batch_num_images) == [3, 1, 1]  # base + 1 x 2 grid; untiled
    counts = [image_token_count(h, w, tiled=t, image_size=side, patch_size=config.vision_config.patch_size,
                                grid_pinpoints=config.image_grid_pinpoints, vision_aspect_ratio=config.vision_aspect_ratio,
                                select_strategy=config.vision_feature_select_strategy)
              for (h, w), t in zip(sizes.tolist(), (True, False, False))]
    image = config.image_token_id
    rows = [[7] * 4 + [image] * counts[0] + [9] * 6, [7] * 3 + [image] * counts[1] + [8] * 2 + [image] * counts[2] + [9] * 4]
    length = max(map(len, rows))
    rows = [row[:-1] + [9] * (length - len(row)) + row[-1:] for row in rows]  # equal lengths: no padding
    ids = torch.tensor(rows)
    pixels = torch.zeros(3, 3, 3, side, side)
    pixels[0] = torch.randn(3, 3, side, side)
    pixels[1:, :1] = torch.randn(2, 1, 3, side, side)
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids), "pixel_values": pixels,
             "image_sizes": sizes, "batch_num_images": batch_num_images}
    counted = flops_by_op(lambda: model(**batch).loss.backward())
    attention_ops = {k: v for k, v in counted.items() if "attention" in k}
    assert set(counted) - set(attention_ops) <= {"aten.mm", "aten.addmm", "aten.bmm", "aten.convolution",
                                                 "aten.convolution_backward"}, counted.keys()
    tiles = 5
    p = flops.patches
    tower_matmuls = 2.0 * flops.tower_params * p * tiles
    patch_embed = 2.0 * 3 * config.vision_config.patch_size ** 2 * flops.tower_width * p * tiles
    projector = 6.0 * flops.projector_params * p * tiles
    tower_attention = 4.0 * flops.tower_layers * flops.tower_width * p ** 2 * tiles
    llm_matmuls = 6.0 * flops.llm_params * 2 * length
    llm_attention = 12.0 * flops.llm_layers * flops.llm_attention_width * length ** 2 * 2
    assert flops.tower_trainable and flops.projector_trainable
    # torch also counts one blank frame through the tower and projector (a batch without videos keeps every
    # rank's backward on the same parameters): no work, so not in the accounting
    blank = 1 + 1 / tiles
    assert sum(counted.values()) - sum(attention_ops.values()) == \
        llm_matmuls + blank * (3 * tower_matmuls + projector - patch_embed)
    assert sum(v for k, v in attention_ops.items() if "backward" not in k) == llm_attention / 3 + blank * tower_attention
    total = flops.inputs_flops([length, length], batch)
    assert total == llm_matmuls + llm_attention + 3 * (tower_matmuls + tower_attention) + projector
    assert total == flops.batch_flops([length, length]) + tiles * flops.vision_per_frame()
