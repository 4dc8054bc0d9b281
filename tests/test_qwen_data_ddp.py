"""Qwen-VL image, video, several-media and text-only samples under DDP on 2 CPU ranks (gloo), through the
launcher pipeline, with the whole vision encoder training (``freeze_vision_tower: false``, a copied target
encoder) and ``ddp_find_unused_parameters: false``: ``train_sampling_strategy: sequential`` with 1 sample
per device pairs an image-only rank with a video rank, then a text-only rank with a rank holding two videos
and an image. A parameter one rank's backward skipped would stall or break the gradient reduction."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from qwen_support import QWEN_AR, tiny_checkpoint
from test_qwen_data_media import media_records
from train_support import run_two_rank_training


@pytest.mark.slow
@pytest.mark.distributed
def test_qwen_image_video_and_text_batches_train_together_under_ddp(tmp_path_factory, tmp_path):
    checkpoint = tiny_checkpoint(tmp_path_factory, "qwen2_5_vl")
    records = json.loads(media_records(tmp_path / "data").read_text())
    # media_records: 0 an image, 4 one video, 5 text-only, 3 two videos and an image (paths relative to the folder)
    order = [records[k] for k in (0, 4, 5, 3)]
    data = tmp_path / "data" / "mixed.json"
    data.write_text(json.dumps(order * 2))
    run = run_two_rank_training(tmp_path, {
        "trainer_type": "autoregressive_trainer",
        "model_config": {"model_name_or_path": str(checkpoint), "enable_autoregressive": True,
                         "freeze_vision_tower": False,
                         "autoregressive_config": {**QWEN_AR, "target_encoder": "copy"}},
        "dataset_config": {"data_path": str(data), "max_frames": 8, "video_min_pixels": 3136,
                           "video_max_pixels": 6272},
        "per_device_train_batch_size": 1, "max_steps": 4, "learning_rate": 1e-3, "logging_steps": 1,
        "save_strategy": "no", "report_to": "none", "disable_tqdm": True, "seed": 0,
        "train_sampling_strategy": "sequential", "ddp_find_unused_parameters": False,
    }, image_key="image_grid_thw")
    batches, weights = run["batches"], run["weights"]
    assert batches[0][:2] == [[[0], [[1, 4, 6]]], [[0], []]]  # an image (grid 1 x 4 x 6), then text-only
    assert batches[1][:2] == [[[3], []], [[3, 2], [[1, 8, 4]]]]  # a video (3 groups), then two videos and an image
    assert len(run["losses"]) == 4 and all(np.isfinite(run["losses"]))
    from safetensors.torch import load_file

    initial = load_file(checkpoint / "model.safetensors")  # transformers' original key names: "visual.*"
    tower = [n for n in initial if n.startswith("visual.blocks.")]
    assert tower and all(not torch.equal(initial[n], weights[0][f"model.{n}"]) for n in tower)  # the encoder trained
    for name, value in weights[0].items():  # DDP kept the ranks identical
        torch.testing.assert_close(value, weights[1][name], rtol=0, atol=0, msg=name)
