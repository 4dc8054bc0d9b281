"""Image, video, several-video and text-only samples under DDP on 2 CPU ranks (gloo), through the real
launcher pipeline: ``train_sampling_strategy: sequential`` with 1 sample per device hands batch ``i`` to
rank ``i % 2``, so the steps pair an image rank with a video rank, then a text-only rank with a rank
holding two videos and an image. ``ddp_find_unused_parameters: false``: a parameter one rank's backward
skipped would stall or break the gradient reduction. Judged by the files the run writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from train_support import AR_SMALL, demo_data_dir, run_two_rank_training


@pytest.mark.slow
@pytest.mark.distributed
def test_image_video_and_text_batches_train_together_under_ddp(tmp_path_factory, tmp_path):
    data_dir = demo_data_dir(tmp_path_factory)
    demo = json.loads((data_dir / "train.json").read_text())
    video = lambda k: str(data_dir / demo[k]["video"])  # noqa: E731
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (48, 80), "b.png": (90, 40)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / name)
    qa = lambda q: [{"from": "human", "value": q}, {"from": "gpt", "value": "A shape."}]  # noqa: E731
    records = [
        {"image": str(tmp_path / "a.png"), "conversations": qa("<image>\nWhat is shown?")},       # rank 0, step 1
        {"video": video(0), "conversations": qa("<video>\nWhat moves?")},                        # rank 1, step 1
        {"conversations": qa("Which colour is the sky?")},                                       # rank 0, step 2
        {"video": [video(1), video(2)], "image": str(tmp_path / "b.png"),                        # rank 1, step 2
         "conversations": qa("Compare <video> and <video> with <image>.")},
    ]
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps(records * 2))
    run = run_two_rank_training(tmp_path, {
        "trainer_type": "autoregressive_trainer",
        "model_config": {"enable_autoregressive": True, "autoregressive_config": AR_SMALL},
        "dataset_config": {"data_path": str(data), "max_frames": 4},
        "per_device_train_batch_size": 1, "max_steps": 4, "learning_rate": 1e-3, "logging_steps": 1,
        "save_strategy": "no", "report_to": "none", "disable_tqdm": True, "seed": 0,
        "train_sampling_strategy": "sequential", "ddp_find_unused_parameters": False,
    }, image_key="batch_num_images")
    batches = run["batches"]
    assert batches[0][:2] == [[[0], [1]], [[0], []]]  # image, then text-only
    assert batches[1][:2] == [[[4], []], [[4, 4], [1]]]  # a video, then two videos and an image
    assert len(run["losses"]) == 4 and all(np.isfinite(run["losses"]))
    weights = run["weights"]
    for name, value in weights[0].items():  # DDP kept the ranks identical
        torch.testing.assert_close(value, weights[1][name], rtol=0, atol=0, msg=name)
