"""Shared pieces of the trainer and launcher tests: one demo dataset per test session, the tiny
tokenizer, and a builder of a small real training run (tiny model, demo clips)."""

from __future__ import annotations

import socket
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from model_support import AR_SMALL

torch.set_num_threads(1)

MAX_FRAMES = 8
_DEMO: dict[str, Path] = {}


def demo_data_dir(tmp_path_factory: Any) -> Path:
    """The demo dataset with the ``demo_data`` block's default settings (64 + 16 clips), generated once
    per session, so example configs pointed at it find it complete and reuse it."""
    if "dir" not in _DEMO:
        from lmms_engine.data.demo import DemoDataConfig, ensure_demo_data

        out = tmp_path_factory.mktemp("demo") / "data"
        ensure_demo_data(DemoDataConfig(output_dir=str(out)))
        _DEMO["dir"] = out
    return _DEMO["dir"]


@lru_cache(maxsize=1)
def tiny_tokenizer() -> Any:
    from lmms_engine.data.tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer()


def subset(data_dir: Path, count: int, out_dir: Path) -> Path:
    """A records file with the first ``count`` training records (videos stay in ``data_dir``)."""
    import json

    path = out_dir / f"train_{count}.json"
    records = json.loads((data_dir / "train.json").read_text())[:count]
    for record in records:
        record["video"] = str(data_dir / record["video"])
    path.write_text(json.dumps(records))
    return path


def build_parts(data_dir: Path, *, autoregressive: bool = True, seed: int = 0,
                data_path: Path | None = None) -> tuple[Any, Any, Any]:
    """(model, train dataset, collator) of the tiny model on the demo clips (or ``data_path``), seeded,
    built by :func:`lmms_engine.parts.build_parts`."""
    from transformers import set_seed

    from lmms_engine.data import DatasetConfig
    from lmms_engine.parts import build_parts as build_run_parts

    set_seed(seed)
    model_config = {"enable_autoregressive": True, "autoregressive_config": dict(AR_SMALL)} if autoregressive else {}
    dataset_config = DatasetConfig(data_path=str(data_path or data_dir / "train.json"), max_frames=MAX_FRAMES)
    parts = build_run_parts(model_config, dataset_config, tokenizer=tiny_tokenizer())
    return parts.model, parts.train_dataset, parts.collator


def training_args(output_dir: Path, **overrides: Any) -> Any:
    from lmms_engine.train import TrainingArguments

    values: dict[str, Any] = dict(output_dir=str(output_dir), per_device_train_batch_size=2, max_steps=4,
                                  learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none",
                                  disable_tqdm=True, seed=0)
    values.update(overrides)
    return TrainingArguments(**values)


def make_trainer(data_dir: Path, output_dir: Path, *, autoregressive: bool = True, callbacks: list | None = None,
                 **args: Any) -> Any:
    """An AutoregressiveTrainer on a freshly built (seeded) tiny model."""
    from lmms_engine.train import AutoregressiveTrainer

    model, dataset, collator = build_parts(data_dir, autoregressive=autoregressive)
    return AutoregressiveTrainer(model=model, args=training_args(output_dir, **args), train_dataset=dataset,
                                 data_collator=collator, processing_class=tiny_tokenizer(),
                                 enable_autoregressive=autoregressive, callbacks=callbacks)


def train_logs(trainer: Any) -> list[dict]:
    """The training log entries (those with HF's ``loss``)."""
    return [e for e in trainer.state.log_history if "loss" in e]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: A launcher-pipeline training whose ranks record, per step, the batch's ``video_num_frames`` and its image
#: entries (``inputs[image_key]``, e.g. LLaVA's ``batch_num_images``, Qwen-VL's ``image_grid_thw``).
_MIXED_DDP_SCRIPT = """\
import json, os, sys
import torch
from lmms_engine.launch.cli import finish_distributed
from lmms_engine.launch.config import load_pipeline_config
from lmms_engine.launch.pipeline import prepare_trainer

config, out, image_key = sys.argv[1:4]
run = prepare_trainer(load_pipeline_config(config, [f"output_dir={out}"]).of_type("trainer")[0])
rank = int(os.environ.get("RANK", "0"))
seen = []
real_step = run.trainer.training_step

def training_step(model, inputs, *args, **kwargs):
    images = inputs.get(image_key)
    seen.append([inputs["video_num_frames"].tolist(), [] if images is None else images.tolist()])
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


def run_two_rank_training(tmp_path: Path, trainer_block: dict, image_key: str) -> dict[str, Any]:
    """Train ``trainer_block`` on 2 gloo ranks with torchrun through the launcher pipeline (sequential
    sampling, so batch ``i`` goes to rank ``i % 2``). Returns ``batches`` (per rank, per step:
    ``[video_num_frames, image entries]``), ``losses`` (rank 0's logged losses) and ``weights`` (each
    rank's final state dict)."""
    import json
    import os
    import subprocess
    import sys

    config = tmp_path / "ddp.json"
    config.write_text(json.dumps([{"type": "trainer", "config": trainer_block}]))
    script = tmp_path / "train.py"
    script.write_text(_MIXED_DDP_SCRIPT)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               str(script), str(config), str(out), image_key]
    ran = subprocess.run(command, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert (out / "weights_rank1.pt").is_file() and (out / "history.json").is_file(), ran.stderr[-3000:]
    return {"batches": [json.loads((out / f"batches_rank{r}.json").read_text()) for r in (0, 1)],
            "losses": [e["loss"] for e in json.loads((out / "history.json").read_text()) if "loss" in e],
            "weights": [torch.load(out / f"weights_rank{r}.pt") for r in (0, 1)]}


def straight_and_resumed(make_trainer: Any, root: Path) -> tuple[Any, Any]:
    """``(straight, resumed)`` trainers: two steps straight in ``root/straight``; one step saved in
    ``root/resumed`` then resumed from its ``checkpoint-1`` to two. ``make_trainer(output_dir)`` builds a
    trainer with ``max_steps=2`` and a save every step."""
    from transformers import TrainerCallback

    class StopAtFirstSave(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            control.should_training_stop = True

    straight = make_trainer(root / "straight")
    straight.train()
    first = make_trainer(root / "resumed")
    first.add_callback(StopAtFirstSave())
    first.train()
    resumed = make_trainer(root / "resumed")
    resumed.train(resume_from_checkpoint=str(root / "resumed" / "checkpoint-1"))
    return straight, resumed
