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
