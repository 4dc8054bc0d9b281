"""Shared helpers of the model tests: synthetic batches that follow the collator's contract."""

from __future__ import annotations

import torch

#: A small autoregressive module for the tiny model (every test uses this one).
AR_SMALL: dict = {"num_hist": 2, "num_heads": 4, "num_layers": 1}


def video_batch(model, num_frames: list[int], max_frames: int, seed: int = 0) -> dict:  # noqa: ANN001
    """A batch of random token ids whose ``<video>`` runs match ``model``'s layout for ``num_frames``
    (0 = no video), with random pixels ``[B, max_frames, 3, S, S]``."""
    gen = torch.Generator().manual_seed(seed)
    runs = [model.video_layout.video_token_count(n, model.patch_side) if n else 0 for n in num_frames]
    ids = torch.randint(5, 400, (len(num_frames), max(runs) + 8), generator=gen)
    for b, run in enumerate(runs):
        ids[b, 2:2 + run] = model.config.video_token_id
    size = model.config.vision_config.image_size
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": ids.clone(),
        "pixel_values_videos": torch.randn(len(num_frames), max_frames, 3, size, size, generator=gen),
        "video_num_frames": torch.tensor(num_frames),
    }
