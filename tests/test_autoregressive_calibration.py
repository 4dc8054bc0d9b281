"""The predictor's output affine: calibrated to the target features' per-channel statistics before
training, so it learns the targets' variation instead of spending the run on their constant offset."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from train_support import make_trainer

from lmms_engine.models.autoregressive_config import AutoregressiveConfig
from lmms_engine.models.autoregressive_reconstruction import FramePredictor


def _fit(calibrate: bool, steps: int = 150) -> tuple[float, float]:
    """(predictor MSE, best constant MSE) on held-out windows of offset-dominated targets, like the tiny
    SigLIP's: per-channel means in -3..3, variation 0.3, a function of the inputs."""
    gen = torch.Generator().manual_seed(0)
    dim, patches = 16, 4
    offset = torch.rand(dim, generator=gen) * 6 - 3
    mixing = torch.randn(dim, dim, generator=gen) / math.sqrt(dim)

    def data(n):
        x = torch.randn(n, 3, patches, dim, generator=gen)
        return x, offset + 0.3 * torch.tanh(x @ mixing)

    torch.manual_seed(0)
    predictor = FramePredictor(dim, AutoregressiveConfig(embedding_dim=dim, num_hist=3, num_heads=2, num_layers=1), 2)
    if calibrate:
        predictor.calibrate(data(16)[1])
    optimiser = torch.optim.AdamW(predictor.parameters(), lr=2e-3, weight_decay=0.0)
    for _ in range(steps):
        x, y = data(8)
        loss = (predictor(predictor.input_proj(x)) - y).pow(2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    x, y = data(64)
    with torch.no_grad():
        mse = (predictor(predictor.input_proj(x)) - y).pow(2).mean().item()
    return mse, (y - y.mean((0, 1, 2))).pow(2).mean().item()


def test_calibrated_predictor_beats_the_best_constant_where_the_uncalibrated_one_cannot():
    calibrated, constant = _fit(True)
    uncalibrated, _ = _fit(False)
    assert calibrated < 0.5 * constant  # learns the variation
    assert uncalibrated > 2 * constant  # worse than a constant: still chasing the offset (its bias moves ~lr a step)


def test_calibrate_sets_the_affine_and_starts_at_the_targets_scale():
    predictor = FramePredictor(8, AutoregressiveConfig(embedding_dim=8, num_hist=2, num_heads=2, num_layers=1), 2)
    assert not bool(predictor.calibrated) and torch.equal(predictor.target_std, torch.ones(8))
    targets = torch.randn(40, 8) * torch.arange(1, 9) + 5
    predictor.calibrate(targets)
    assert bool(predictor.calibrated)
    torch.testing.assert_close(predictor.target_mean, targets.mean(0))
    torch.testing.assert_close(predictor.target_std, targets.std(0))
    with pytest.raises(ValueError, match="at least 2"):
        predictor.calibrate(torch.zeros(1, 8))


def test_trainer_calibrates_once_from_the_first_samples_whatever_the_batch_split(data_dir, tmp_path):
    one = make_trainer(data_dir, tmp_path / "one", per_device_train_batch_size=1)
    two = make_trainer(data_dir, tmp_path / "two", per_device_train_batch_size=2, max_steps=1)
    for trainer in (one, two):
        assert trainer.calibrate_autoregressive_targets(num_samples=4) == 4 * 8  # 4 videos x 8 frames
    p1, p2 = one.model.autoregressive_module.predictor, two.model.autoregressive_module.predictor
    assert bool(p1.calibrated) and torch.equal(p1.target_mean, p2.target_mean) and torch.equal(p1.target_std, p2.target_std)
    # The statistics are the targets': the shared tower's features of the first videos, pooled 2x2.
    assert p1.target_std.min() > 0.01 and p1.target_mean.abs().max() > 3 * p1.target_std.max()
    before = p1.target_mean.clone()
    assert one.calibrate_autoregressive_targets() == 0  # already calibrated: a no-op
    two.train()  # trains from the calibrated state and saves it with the weights
    two.save_model(str(tmp_path / "saved"))
    weights = load_file(str(tmp_path / "saved" / "model.safetensors"))
    assert torch.equal(weights["autoregressive_module.predictor.target_mean"], p2.target_mean)
    assert torch.equal(p1.target_mean, before)


def test_a_checkpoint_written_before_calibration_existed_loads_with_the_identity(data_dir, tmp_path):
    from lmms_engine.models.llava_video import LlavaVideoForConditionalGeneration

    trainer = make_trainer(data_dir, tmp_path / "run")
    trainer.calibrate_autoregressive_targets(num_samples=2)
    trainer.save_model(str(tmp_path / "old"))
    path = tmp_path / "old" / "model.safetensors"
    weights = load_file(str(path))
    save_file({k: v for k, v in weights.items() if not k.startswith("autoregressive_module.predictor.target_")
               and not k.endswith("predictor.calibrated")}, str(path), metadata={"format": "pt"})
    predictor = LlavaVideoForConditionalGeneration.from_pretrained(tmp_path / "old").autoregressive_module.predictor
    assert torch.equal(predictor.target_mean, torch.zeros(64)) and torch.equal(predictor.target_std, torch.ones(64))
    assert not bool(predictor.calibrated)


def test_calibration_reads_every_real_frame_of_one_or_several_videos_per_sample():
    from lmms_engine.models.builder import build_model
    from lmms_engine.train.autoregressive_trainer import calibrate_autoregressive_targets

    model = build_model({"enable_autoregressive": True, "autoregressive_config": {"embedding_dim": 64, "num_hist": 2,
                                                                                  "num_heads": 4, "num_layers": 1}})
    gen = torch.Generator().manual_seed(0)
    clip = lambda t: torch.randn(t, 3, 64, 64, generator=gen)  # noqa: E731
    samples = [{"pixel_values_videos": clip(4), "video_num_frames": 3},  # one padding frame
               {"pixel_values_videos": [clip(2), clip(5)], "video_num_frames": [2, 5]},  # two videos
               {"input_ids": torch.ones(3)}]  # text only
    assert calibrate_autoregressive_targets(model, samples) == 3 + 2 + 5
    assert calibrate_autoregressive_targets(model, samples[2:]) == 0
