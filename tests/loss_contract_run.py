"""One optimisation-step gradient of the real trainer on a fixed mixed data set, however it is split.

``run(batch, accumulation, out, autoregressive=None, logging_steps=1)`` trains the tiny model with the autoregressive loss for two
optimisation steps at learning rate 0 (the weights stay fixed, so every step's gradient is taken at
the same point) on four samples: step 1 = videos of 6 and 3 frames, step 2 = a text-only sample and a
4-frame video. Before each optimiser step it records every parameter's gradient; rank 0 saves them
with the training log to ``out``. Under ``torchrun --nproc_per_node=2`` (gloo) each rank takes one
sample per step (accelerate hands batch ``i`` to rank ``i % 2``). ``autoregressive`` overrides keys of
:data:`AUTOREGRESSIVE`.

Run as a script: ``python -m torch.distributed.run --nproc_per_node=2 loss_contract_run.py OUT``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

#: Frames of each sample's video in data order (0 = text-only); two samples per optimisation step.
FRAMES = [6, 3, 0, 4]
MAX_FRAMES = 6
AUTOREGRESSIVE = {"num_hist": 2, "num_heads": 4, "num_layers": 1, "loss_weight": 1.0}


def samples(model: Any) -> list[dict[str, torch.Tensor]]:
    """Samples padded to one length (so the default collator stacks them) with the model's ``<video>``
    runs; labels on every real token."""
    gen = torch.Generator().manual_seed(7)
    runs = [model.video_layout.video_token_count(n, model.patch_side) if n else 0 for n in FRAMES]
    length = max(runs) + 12
    size = model.config.vision_config.image_size
    out = []
    for i, (frames, run) in enumerate(zip(FRAMES, runs)):
        used = run + 6 + 2 * i  # unequal text lengths too
        ids = torch.randint(5, 400, (length,), generator=gen)
        ids[2:2 + run] = model.config.video_token_id
        mask = (torch.arange(length) < used).long()
        out.append({
            "input_ids": ids * mask,
            "attention_mask": mask,
            "labels": ids.masked_fill(mask == 0, -100),
            "pixel_values_videos": torch.randn(MAX_FRAMES, 3, size, size, generator=gen),
            "video_num_frames": torch.tensor(frames),
        })
    return out


def run(batch: int, accumulation: int, out: Path, autoregressive: dict | None = None, logging_steps: int = 1) -> None:
    from transformers import TrainerCallback, default_data_collator, set_seed

    from lmms_engine.models.builder import build_model
    from lmms_engine.train import AutoregressiveTrainer, TrainingArguments

    torch.set_num_threads(1)
    set_seed(0)
    model = build_model({"enable_autoregressive": True, "autoregressive_config": {**AUTOREGRESSIVE,
                                                                                    **(autoregressive or {})}})
    grads: list[dict[str, torch.Tensor]] = []

    class RecordGradients(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
            grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        max_steps=2, learning_rate=0.0, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=0.0, logging_steps=logging_steps, save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
        train_sampling_strategy="sequential", ddp_find_unused_parameters=False, ddp_timeout=60,
        dataloader_drop_last=False,
    )
    trainer = AutoregressiveTrainer(model=model, args=args, train_dataset=samples(model),
                                    data_collator=default_data_collator, callbacks=[RecordGradients()],
                                    plot_loss=False, log_file=None)
    trainer.train()
    if trainer.args.process_index == 0:
        logs = [e for e in trainer.state.log_history if "loss" in e]
        torch.save({"grads": grads, "logs": logs}, out / "result.pt")


if __name__ == "__main__":
    from lmms_engine.launch.cli import finish_distributed

    target = Path(sys.argv[1])
    target.mkdir(parents=True, exist_ok=True)
    run(batch=1, accumulation=1, out=target)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        finish_distributed()
