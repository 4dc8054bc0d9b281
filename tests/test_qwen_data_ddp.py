"""Qwen-VL image, video, several-media and text-only samples under DDP on 2 CPU ranks (gloo), through the
launcher pipeline, with the whole vision encoder training (``freeze_vision_tower: false``, a copied target
encoder) and ``ddp_find_unused_parameters: false``: ``train_sampling_strategy: sequential`` with 1 sample
per device pairs an image-only rank with a video rank, then a text-only rank with a rank holding two videos
and an image. A parameter one rank's backward skipped would stall or break the gradient reduction."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from qwen_support import QWEN_AR, tiny_checkpoint
from test_qwen_data_media import media_records
from train_support import free_port

SCRIPT = """\
import json, os, sys
import torch
from lmms_engine.launch.cli import finish_distributed
from lmms_engine.launch.config import load_pipeline_config
from lmms_engine.launch.pipeline import prepare_trainer

config, out = sys.argv[1:3]
run = prepare_trainer(load_pipeline_config(config, [f"output_dir={out}"]).of_type("trainer")[0])
rank = int(os.environ.get("RANK", "0"))
seen = []
real_step = run.trainer.training_step

def training_step(model, inputs, *args, **kwargs):
    grids = inputs.get("image_grid_thw")
    seen.append([inputs["video_num_frames"].tolist(), 0 if grids is None else len(grids)])
    return real_step(model, inputs, *args, **kwargs)

run.trainer.training_step = training_step
run.trainer.train()
torch.save(run.trainer.model.state_dict(), os.path.join(out, f"weights_rank{rank}.pt"))
with open(os.path.join(out, f"batches_rank{rank}.json"), "w") as handle:
    json.dump(seen, handle)
if rank == 0:
    with open(os.path.join(out, "history.json"), "w") as handle:
        json.dump(run.trainer.state.log_history, handle)
finish_distributed()
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_qwen_image_video_and_text_batches_train_together_under_ddp(tmp_path_factory, tmp_path):
    checkpoint = tiny_checkpoint(tmp_path_factory, "qwen2_5_vl")
    records = json.loads(media_records(tmp_path / "data").read_text())
    # media_records: 0 image, 4 one video, 5 text-only, 3 two videos and an image; paths made absolute
    order = [records[k] for k in (0, 4, 5, 3)]
    data = tmp_path / "data" / "mixed.json"
    data.write_text(json.dumps(order * 2))
    config = tmp_path / "ddp.json"
    config.write_text(json.dumps([{"type": "trainer", "config": {
        "trainer_type": "autoregressive_trainer",
        "model_config": {"model_name_or_path": str(checkpoint), "enable_autoregressive": True,
                         "freeze_vision_tower": False,
                         "autoregressive_config": {**QWEN_AR, "target_encoder": "copy"}},
        "dataset_config": {"data_path": str(data), "max_frames": 8, "video_min_pixels": 3136,
                           "video_max_pixels": 6272},
        "per_device_train_batch_size": 1, "max_steps": 4, "learning_rate": 1e-3, "logging_steps": 1,
        "save_strategy": "no", "report_to": "none", "disable_tqdm": True, "seed": 0,
        "train_sampling_strategy": "sequential", "ddp_find_unused_parameters": False,
    }}]))
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               str(script), str(config), str(out)]
    ran = subprocess.run(command, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert (out / "weights_rank1.pt").is_file() and (out / "history.json").is_file(), ran.stderr[-3000:]
    batches = [json.loads((out / f"batches_rank{r}.json").read_text()) for r in (0, 1)]
    assert batches[0][:2] == [[[0], 1], [[0], 0]]  # an image, then text-only
    assert batches[1][:2] == [[[3], 0], [[3, 2], 1]]  # a video (3 groups), then two videos and an image
    losses = [e["loss"] for e in json.loads((out / "history.json").read_text()) if "loss" in e]
    assert len(losses) == 4 and all(np.isfinite(losses))
    weights = [torch.load(out / f"weights_rank{r}.pt") for r in (0, 1)]
    from safetensors.torch import load_file

    initial = load_file(checkpoint / "model.safetensors")  # transformers' original key names: "visual.*"
    tower = [n for n in initial if n.startswith("visual.blocks.")]
    assert tower and all(not torch.equal(initial[n], weights[0][f"model.{n}"]) for n in tower)  # the encoder trained
    for name, value in weights[0].items():  # DDP kept the ranks identical
        torch.testing.assert_close(value, weights[1][name], rtol=0, atol=0, msg=name)
