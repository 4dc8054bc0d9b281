"""FLOPs of Qwen-VL training steps, counted from the batch's grids, against torch's FLOP counter."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from lmms_engine.train.throughput import QwenModelFlops, ThroughputCallback, model_flops, window_sides
from lmms_engine.utils.flops import flops_by_op

torch.set_num_threads(1)

#: Merged grids (LLM tokens per temporal group, rows x columns) and frames of the two videos of the batch:
#: 3 x 5 cuts into Qwen2.5-VL's 2 x 2 windows as rows [2, 1] x columns [2, 2, 1]; 2 x 4 into [2] x [2, 2].
VIDEOS = ((3, 5, 4), (2, 4, 2))
AR = {"num_hist": 2, "num_heads": 4, "num_layers": 1, "loss_weight": 0.5}
MATMULS = ("aten.mm", "aten.addmm", "aten.bmm", "aten.convolution", "aten.convolution_backward")


def _model_and_batch(tmp_path_factory, family: str, target_encoder: str, freeze_encoder: bool = False,
                     image: bool = False):
    """The tiny ``family`` model with an autoregressive module and one sample: the two ``VIDEOS`` (and,
    ``image``, a 2 x 3 merged-token image first), a question and an answer."""
    import numpy as np

    from lmms_engine.data.qwen_vision import QwenVideoProcessing
    from lmms_engine.models.qwen_vl_common import qwen_model_class
    from qwen_support import tiny_checkpoint

    checkpoint = tiny_checkpoint(tmp_path_factory, family)
    config, tokenizer = AutoConfig.from_pretrained(checkpoint), AutoTokenizer.from_pretrained(checkpoint)
    f = config.vision_config.patch_size * config.vision_config.spatial_merge_size
    processing = QwenVideoProcessing.for_model(config, min_pixels=f * f, max_pixels=64 * f * f, total_pixels=None)
    rng = np.random.default_rng(0)
    videos = [processing.preprocess(torch.from_numpy(rng.integers(0, 256, (n, 3, rows * f, cols * f), dtype=np.uint8)))
              for rows, cols, n in VIDEOS]
    user = "".join(processing.placeholder_text(v.grid_thw, v.group_times) for v in videos) + "What happens?"
    picture = None
    if image:
        picture = processing.preprocess_image(torch.from_numpy(rng.integers(0, 256, (3, 2 * f, 3 * f), dtype=np.uint8)),
                                              (2 * f, 3 * f))
        user = processing.image_placeholder_text(picture.grid_thw) + user
    text = tokenizer.apply_chat_template([{"role": "user", "content": user},
                                          {"role": "assistant", "content": "A square moves left."}], tokenize=False)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids),
             "pixel_values_videos": torch.cat([v.pixel_values for v in videos]),
             "video_grid_thw": torch.tensor([v.grid_thw for v in videos]),
             "second_per_grid_ts": torch.tensor([v.second_per_grid for v in videos])}
    if picture is not None:
        batch.update(pixel_values=picture.pixel_values, image_grid_thw=torch.tensor([picture.grid_thw]))
    torch.manual_seed(0)
    model = qwen_model_class(family).from_pretrained(checkpoint)
    model.set_trainable(vision_tower=not freeze_encoder, projector=True, language_model=True)
    model.attach_autoregressive_module({**AR, "target_encoder": target_encoder})
    return model.train(), batch


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_vision_forward_equals_the_counted_flops_per_grid(tmp_path_factory, family):
    """The encoder's forward on each grid alone and on both together: matmuls (patch embedding, blocks,
    merger and Qwen3-VL's deepstack merger) and attention (full per temporal group, Qwen2.5-VL's windows)
    exactly as torch counts them."""
    model, batch = _model_and_batch(tmp_path_factory, family, "shared")
    flops = QwenModelFlops.from_model(model)
    visual = model.model.visual
    grids = batch["video_grid_thw"]
    sizes = [int(t * h * w) for t, h, w in grids.tolist()]
    pieces = torch.split(batch["pixel_values_videos"], sizes)
    for pixels, grid in [*zip(pieces, grids[:, None]), (batch["pixel_values_videos"], grids)]:
        with torch.no_grad():
            counted = flops_by_op(lambda: visual(pixels, grid_thw=grid))
        parts = [flops.vision_forward(g) for g in grid.tolist()]
        attention = sum(v for k, v in counted.items() if "attention" in k)
        assert attention == sum(p.attention for p in parts)
        assert sum(counted.values()) - attention == sum(p.patch_embed + p.blocks + p.mergers for p in parts)
    # hand count of the first video's attention (t = 2 groups of 6 x 10 patches, width 64):
    full = 2 * 4 * 60 ** 2 * 64
    if family == "qwen2_5_vl":  # block 1 full, block 0 in windows of merge units [2, 1] x [2, 2, 1] (x 4 patches)
        assert window_sides(3, 2) == [2, 1] and window_sides(5, 2) == [2, 2, 1]
        windows = 2 * 4 * 64 * sum((r * c * 4) ** 2 for r in (2, 1) for c in (2, 2, 1))
        assert flops.vision_forward((2, 6, 10)).attention == full + windows
        assert (flops.full_blocks, flops.window, flops.mergers) == (1, 2, 1)
    else:  # two full-attention blocks; Qwen3-VL: one deepstack merger
        assert flops.vision_forward((2, 6, 10)).attention == 2 * full
        assert (flops.full_blocks, flops.window, flops.mergers) == (2, 0, 2 if family == "qwen3_vl" else 1)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_training_step_equals_the_counted_flops(tmp_path_factory, family):
    """A whole training step (vision encoder trainable, so the frozen target encoder is a copy):
    torch's count of forward + backward against the accounting. Matmuls exact but for one known term: the
    patch embedding gets no input gradient (pixels), 1 x its forward where the accounting (the usual
    6N) counts 2 x. Attention: forward exact, the backward as 2 x forward (MFU convention; torch counts
    2.5 x)."""
    model, batch = _model_and_batch(tmp_path_factory, family, "copy", image=True)
    flops = QwenModelFlops.from_model(model)
    assert flops.tower_trainable and flops.projector_trainable and flops.copy_encoder
    # the callback, set up as the trainer does, counts this step through its forward hook
    callback = ThroughputCallback(peak_tflops=1e-3)
    callback.on_train_begin(SimpleNamespace(device=torch.device("cpu")), None, None, model=model)
    assert isinstance(callback.flops, QwenModelFlops)
    counted = flops_by_op(lambda: model(**batch).loss.backward())
    callback.on_train_end(None, None, None)
    attention_ops = {k: v for k, v in counted.items() if "attention" in k}
    assert set(counted) - set(attention_ops) <= set(MATMULS), counted.keys()
    length = batch["input_ids"].shape[1]
    grids = batch["video_grid_thw"].tolist()
    merge = flops.merge
    predictor = [flops.predictor_parts(t, h * w // merge ** 2) for t, h, w in grids]  # videos only
    image = batch["image_grid_thw"][0].tolist()
    assert image == [1, 4, 6]
    vision = [flops.vision_forward(g) for g in grids + [image]]  # the image runs the encoder only
    copied = vision[:-1]  # the frozen copy targets the videos
    # the accounting by part (matmuls, attention), each as forward x factor
    llm_matmuls = 6.0 * flops.llm_params * length
    llm_attention = 12.0 * flops.llm_layers * flops.llm_attention_width * length ** 2
    vision_matmuls = sum(3 * (v.patch_embed + v.blocks + v.mergers) for v in vision) \
        + sum(v.patch_embed + v.blocks + v.mergers for v in copied)
    vision_attention = sum(3 * v.attention for v in vision) + sum(v.attention for v in copied)
    total = flops.batch_flops([length], batch["video_grid_thw"], batch["image_grid_thw"])
    assert total == llm_matmuls + llm_attention + vision_matmuls + vision_attention + sum(map(sum, predictor))
    patch_embed_input_grad = sum(v.patch_embed for v in vision)
    assert sum(counted.values()) - sum(attention_ops.values()) == \
        llm_matmuls + vision_matmuls + sum(m for m, _ in predictor) - patch_embed_input_grad
    forward_attention = sum(v for k, v in attention_ops.items() if "backward" not in k)
    # forward attention: the LLM's, the encoder's twice (trained encoder and its frozen copy), the predictor's
    assert forward_attention == (llm_attention + sum(a for _, a in predictor)) / 3 + sum(v.attention for v in vision) \
        + sum(v.attention for v in copied)
    # logged with the keys of the LLaVA path
    assert callback.window.flops == total and callback.window.tokens == length
    logged = callback.metrics(elapsed=2.0)
    assert set(logged) == {"tokens_per_second_per_device", "samples_per_second", "vision_tokens_per_sample",
                           "model_tflops_per_second_per_device", "mfu"}
    assert logged["model_tflops_per_second_per_device"] == pytest.approx(total / 2.0 / 1e12)
    assert logged["mfu"] == pytest.approx(total / 2.0 / 1e9)
    assert logged["vision_tokens_per_sample"] == 15 * 2 + 8


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_frozen_encoder_step_equals_the_counted_flops(tmp_path_factory, family):
    """The default Qwen training (encoder frozen and shared as the target encoder, mergers and LLM trained):
    the encoder forward only, the mergers forward and backward (their first layer gets an input gradient
    too: the norm before it trains): matmuls exact."""
    model, batch = _model_and_batch(tmp_path_factory, family, "shared", freeze_encoder=True)
    flops = model_flops(model)
    assert isinstance(flops, QwenModelFlops) and not flops.tower_trainable and not flops.copy_encoder
    counted = flops_by_op(lambda: model(**batch).loss.backward())
    matmuls = sum(v for k, v in counted.items() if "attention" not in k)
    length = batch["input_ids"].shape[1]
    grids = batch["video_grid_thw"].tolist()
    vision = [flops.vision_forward(g) for g in grids]
    predictor = [flops.predictor_parts(t, h * w // 4)[0] for t, h, w in grids]
    expected = 6.0 * flops.llm_params * length + sum(v.patch_embed + v.blocks + 3 * v.mergers for v in vision) \
        + sum(predictor)
    assert matmuls == expected
    # mergers by hand: (64 * 4)^2 + 64 * 4 * 64 weights on 3 * 5 * 2 + 2 * 4 = 38 merged tokens
    assert sum(h * w * t // 4 for t, h, w in grids) == 38
    assert sum(v.mergers for v in vision) == 2 * (256 * 256 + 256 * 64) * 38 * flops.mergers
    v = vision[0]
    assert flops.vision_flops(grids[0]) == v.encoder + 3 * v.mergers
