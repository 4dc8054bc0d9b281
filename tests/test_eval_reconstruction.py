"""The next-frame reconstruction metric: hand-computed sums, and agreement with the training loss."""

from __future__ import annotations

import pytest
import torch

from lmms_engine.eval.reconstruction import (
    OffsetSums,
    ReconstructionAccumulator,
    batch_reconstruction_errors,
    next_frame_errors,
    reconstruction_markdown,
)
from lmms_engine.models.builder import build_model


def plus_one(x: torch.Tensor) -> torch.Tensor:
    """A stand-in predictor: every position predicts its own value + 1."""
    return x + 1


def test_hand_computed_offsets():
    # one video, 3 frames of one 1-dim token: values 1, 2, 4 (inputs and targets alike)
    frames = torch.tensor([1.0, 2.0, 4.0]).view(1, 3, 1, 1)
    out = next_frame_errors(plus_one, frames, frames, torch.ones(1, 3, dtype=torch.bool), max_offset=3)
    # offset 1: windows (0->1): pred 2, target 2, copy 1 ; (1->2): pred 3, target 4, copy 2
    assert (out[1].sq_error, out[1].copy_last_sq_error, out[1].elements, out[1].windows) == (1.0, 5.0, 2, 2)
    # offset 2: window (0,1 -> 2): last position predicts 2 + 1 = 3, target 4, copy 2
    assert (out[2].sq_error, out[2].copy_last_sq_error, out[2].elements, out[2].windows) == (1.0, 4.0, 1, 1)
    assert out[3].elements == 0 and out[3].to_dict()["mse"] is None  # no 4-frame window
    # best constant: offset 1's targets are 2 and 4 -> mean 3, variance 1; offset 2 has one target
    assert out[1].to_dict() == {"mse": 0.5, "copy_last_mse": 2.5, "ratio": 0.2, "mean_target_mse": 1.0,
                                "windows": 2, "elements": 2}
    assert out[2].mean_target_mse() == 0.0 and out[3].mean_target_mse() is None


def test_absent_frames_break_windows_and_tokens_average():
    # two videos, 2 tokens of 2 dims; the second video's frame 2 is absent
    frames = torch.zeros(2, 3, 2, 2)
    frames[:, 1] = 1.0
    frames[:, 2] = 3.0
    valid = torch.tensor([[True, True, True], [True, True, False]])
    out = next_frame_errors(plus_one, frames, frames, valid, max_offset=2)
    # offset 1: video 0 windows 0->1 (pred 1, err 0; copy err 1) and 1->2 (pred 2 vs 3: err 1; copy 4),
    # video 1 only 0->1 (err 0; copy 1); each window has 2 tokens x 2 dims = 4 elements
    assert (out[1].sq_error, out[1].copy_last_sq_error, out[1].elements, out[1].windows) == (4.0, 24.0, 12, 3)
    assert (out[2].sq_error, out[2].copy_last_sq_error, out[2].elements, out[2].windows) == (4.0, 16.0, 4, 1)
    # offset 1's three target frames hold 1, 3, 1 at every position: mean 5/3, variance 8/9
    assert out[1].mean_target_mse() == pytest.approx(8 / 9)


def test_accumulator_pools_batches_and_streams():
    class Cfg:
        num_hist, use_frame_causal_mask, loss_weight, use_fast_slow_frames = 2, True, 0.1, True

    class Module:
        config = Cfg()
        target_encoder_mode = "shared"

    acc = ReconstructionAccumulator(Module())
    acc.add_batch({"fast": {1: OffsetSums(2.0, 4.0, 4, 2), 2: OffsetSums(1.0, 1.0, 2, 1)},
                   "slow": {1: OffsetSums(6.0, 4.0, 4, 2), 2: OffsetSums()}}, num_videos=2)
    acc.add_batch({"fast": {1: OffsetSums(0.0, 4.0, 4, 2), 2: OffsetSums()}, "slow": {}}, num_videos=1)
    summary = acc.summary()
    assert summary["num_videos"] == 3
    assert summary["by_offset"][0] == {"offset": 1, "mse": 8.0 / 12, "copy_last_mse": 1.0, "ratio": 8.0 / 12,
                                       "mean_target_mse": None, "windows": 6, "elements": 12}
    assert summary["full_history"]["mse"] == 0.5 and summary["full_history"]["windows"] == 1
    assert summary["all_offsets"]["mse"] == pytest.approx(9.0 / 14)
    assert summary["by_stream"]["fast"][0]["mse"] == pytest.approx(2.0 / 8)
    table = reconstruction_markdown(summary).splitlines()
    assert table[-1].startswith("| **all** | 0.64286 | 0.92857 | 0.692 | n/a | 7 |")


def video_batch(model, num_frames: list[int], seed: int = 0) -> dict:
    """Random frames behind a short text prefix; ``num_frames`` per sample (0-padded frames after)."""
    gen = torch.Generator().manual_seed(seed)
    runs = [model.video_layout.video_token_count(n, model.patch_side) for n in num_frames]
    ids = torch.randint(5, 400, (len(num_frames), max(runs) + 6), generator=gen)
    for b, run in enumerate(runs):
        ids[b, 2:2 + run] = model.config.video_token_id
    size = model.config.vision_config.image_size
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
            "pixel_values_videos": torch.randn(len(num_frames), max(num_frames), 3, size, size, generator=gen),
            "video_num_frames": torch.tensor(num_frames)}


@pytest.mark.parametrize("causal", [True, False])
def test_offsets_agree_with_the_training_loss(causal):
    """With num_hist + 1 = 4 frames the training loss has one window per video (start 0): its MSE is
    the pooled MSE of offsets 1-3 from start 0 with the causal mask (every position supervised), and
    offset 3's alone without it (only the last position). The offsets from start 0 are measured on
    the video cut after frame k: the LLM is causal, so the earlier frames' hidden states are the same."""
    torch.manual_seed(0)
    model = build_model({"enable_autoregressive": True, "autoregressive_config": {
        "num_hist": 3, "num_heads": 4, "num_layers": 1, "use_frame_causal_mask": causal,
        "window": "sliding" if causal else "all"}}).eval()
    batch = video_batch(model, [4, 4, 4])
    with torch.no_grad():
        parts = model(**batch).loss_components
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    every_start = batch_reconstruction_errors(model, inputs)["all"]
    assert [every_start[k].windows for k in (1, 2, 3)] == [9, 6, 3]  # 3 videos x (4 - k) starts
    start0 = {}
    for k in (1, 2, 3):
        run = model.video_layout.video_token_count(k + 1, model.patch_side)
        ids = inputs["input_ids"][:, : 2 + run + 4].clone()
        ids[:, 2 + run:] = 7  # text after the (shorter) video
        cut = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
               "pixel_values_videos": inputs["pixel_values_videos"][:, : k + 1],
               "video_num_frames": torch.full((3,), k + 1)}
        start0[k] = batch_reconstruction_errors(model, cut)["all"][k]
        assert start0[k].windows == 3
    offsets = (1, 2, 3) if causal else (3,)
    elements = sum(start0[k].elements for k in offsets)
    mse = sum(start0[k].sq_error for k in offsets) / elements
    base = sum(start0[k].copy_last_sq_error for k in offsets) / elements
    assert mse == pytest.approx(float(parts["ar_mse"]), rel=1e-4)
    assert base == pytest.approx(float(parts["ar_copy_last_mse"]), rel=1e-4)
    if causal:  # the last offset from start 0 is also what the full video gives at offset 3
        assert every_start[3].sq_error == pytest.approx(start0[3].sq_error, rel=1e-4)
