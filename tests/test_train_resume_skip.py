"""Resuming skips the samples of the trained steps in the sampler: the resumed run loads (and decodes the
videos of) exactly the samples of steps N+1.. of the uninterrupted run, in the same order, and not one
sample of steps 1..N.

How: transformers' Trainer resumes with accelerate's ``skip_first_batches``, which for a map-style
dataset wraps the batch sampler in ``SkipBatchSampler``: the first batches are drawn as index lists
and thrown away without touching the dataset. Whole epochs before the resumed one are not iterated at
all (the sampler's epoch seed comes from ``set_epoch``). The spy below records every sample the
dataset loads (it calls the real loader), with ``dataloader_num_workers=0`` so all loads happen in this
process, in order. The resumed run starts from the uninterrupted run's own ``checkpoint-N`` (what an
interrupted run leaves behind; test_train_checkpoints covers the interruption itself).
"""

from __future__ import annotations

import pytest
import torch

from mixed_support import LoadSpy
from train_support import build_parts, subset, tiny_tokenizer, train_logs, training_args

from lmms_engine.train import AutoregressiveTrainer

pytestmark = pytest.mark.slow

BATCH, ACCUMULATION = 2, 2
PER_STEP = BATCH * ACCUMULATION


def _trainer(data_dir, out, data_path, **args):
    """A fresh (seeded) trainer on ``data_path``, as a new process would build it."""
    model, dataset, collator = build_parts(data_dir, data_path=data_path)
    trainer = AutoregressiveTrainer(
        model=model, train_dataset=dataset, data_collator=collator, processing_class=tiny_tokenizer(),
        args=training_args(out, per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUMULATION,
                           dataloader_num_workers=0, save_strategy="steps", **args))
    # Before the spy: the predictor's calibration reads the first samples once, before any step (a
    # fresh run's train() would do it; a resumed run restores it from the checkpoint instead).
    trainer.calibrate_autoregressive_targets()
    return trainer


def _train(trainer, **kwargs) -> list[tuple[int, str | None]]:
    with LoadSpy() as spy:
        trainer.train(**kwargs)
    return spy.calls


def _check_resume(data_dir, tmp_path, *, max_steps: int, save_steps: int, resume_at: int,
                  records: int | None = None) -> tuple[list, list]:
    """Train ``max_steps`` uninterrupted (checkpoints every ``save_steps``), then resume a fresh trainer
    from ``checkpoint-<resume_at>``; return both runs' loads ``[(record index, video)]`` after checking
    the resumed run's."""
    data_path = None if records is None else subset(data_dir, records, tmp_path)
    full = _trainer(data_dir, tmp_path / "full", data_path, max_steps=max_steps, save_steps=save_steps)
    full_loads = _train(full)
    # Each step loads its PER_STEP samples (accelerate may read one batch ahead at the very end).
    assert len(full_loads) >= max_steps * PER_STEP
    assert all(video is not None for _, video in full_loads)

    resumed = _trainer(data_dir, tmp_path / "resumed", data_path, max_steps=max_steps, save_steps=save_steps)
    resumed_loads = _train(resumed, resume_from_checkpoint=str(tmp_path / "full" / f"checkpoint-{resume_at}"))
    assert resumed.state.global_step == max_steps
    # Exactly the uninterrupted run's loads from step resume_at + 1 on: none of the skipped steps'.
    assert resumed_loads == full_loads[resume_at * PER_STEP:]
    # Same samples in the same order: the same losses and, bit for bit, the same final weights.
    def later(trainer):  # the resumed state's history also holds the checkpoint's entries
        return [(e["step"], e["loss"]) for e in train_logs(trainer) if e["step"] > resume_at]

    assert later(resumed) == later(full) and len(later(full)) == max_steps - resume_at
    expected = full.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[name]), name
    return full_loads, resumed_loads


def test_resume_within_an_epoch_decodes_no_video_of_the_skipped_steps(data_dir, tmp_path):
    full, resumed = _check_resume(data_dir, tmp_path, max_steps=5, save_steps=3, resume_at=3)
    skipped_videos = {video for _, video in full[:3 * PER_STEP]}
    assert len(skipped_videos) == 3 * PER_STEP  # one epoch is 64 distinct clips: no repeats so far
    assert not skipped_videos & {video for _, video in resumed}


def test_resume_in_a_later_epoch_does_not_iterate_the_finished_epochs(data_dir, tmp_path):
    # 8 records, 4 samples per step: 2 steps per epoch. Resuming at step 5 starts 1 step into epoch 2.
    full, resumed = _check_resume(data_dir, tmp_path, max_steps=7, save_steps=5, resume_at=5, records=8)
    assert len(resumed) <= (7 - 5 + 1) * PER_STEP  # steps 6 and 7 (and at most one batch read ahead)
    # Each epoch serves every record once, in a new order.
    epochs = [sorted(j for j, _ in full[e * 8:(e + 1) * 8]) for e in range(3)]
    assert epochs == [list(range(8))] * 3
    assert [j for j, _ in full[:8]] != [j for j, _ in full[8:16]]
