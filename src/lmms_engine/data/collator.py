"""Batching samples of :class:`~lmms_engine.data.dataset.VideoSFTDataset` into model inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import torch

from lmms_engine.data.chat import IGNORE_INDEX


@dataclass
class VideoSFTCollator:
    """Pad token sequences (left or right) and stack frames.

    Input: samples with ``input_ids`` and ``labels`` (long ``[L_i]``), ``video_num_frames`` (int) and,
    for samples with a video, ``pixel_values_videos`` (float ``[T_i, 3, H, W]``); other keys are ignored.
    Output (the model's forward kwargs):

    - ``input_ids`` long ``[B, L]`` (padded with ``pad_token_id``), ``attention_mask`` long ``[B, L]``
      (1 = real token), ``labels`` long ``[B, L]`` (-100 on padding);
    - ``pixel_values_videos`` float ``[B, T_max, 3, H, W]``, zeros past a sample's frames and for samples
      without video; omitted when no sample of the batch has a video;
    - ``video_num_frames`` long ``[B]`` (0 = no video).
    """

    pad_token_id: int
    padding_side: Literal["right", "left"] = "right"

    def __post_init__(self) -> None:
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")
        if self.pad_token_id is None:
            raise ValueError("pad_token_id is None: the tokenizer needs a pad token")

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        length = max(len(s["input_ids"]) for s in samples)
        batch = len(samples)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        for i, sample in enumerate(samples):
            n = len(sample["input_ids"])
            cols = slice(0, n) if self.padding_side == "right" else slice(length - n, length)
            input_ids[i, cols] = torch.as_tensor(sample["input_ids"], dtype=torch.long)
            labels[i, cols] = torch.as_tensor(sample["labels"], dtype=torch.long)
            attention_mask[i, cols] = 1
        num_frames = torch.tensor([int(s.get("video_num_frames", 0)) for s in samples], dtype=torch.long)
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
               "video_num_frames": num_frames}
        videos = [s.get("pixel_values_videos") for s in samples]
        shapes = {tuple(v.shape[1:]) for v in videos if v is not None}
        if shapes:
            if len(shapes) > 1:
                raise ValueError(f"videos of one batch must share [3, H, W]; got {sorted(shapes)}")
            frame_shape = shapes.pop()
            reference = next(v for v in videos if v is not None)
            pixels = torch.zeros((batch, int(num_frames.max()), *frame_shape), dtype=reference.dtype)
            for i, video in enumerate(videos):
                if video is not None:
                    if video.shape[0] != num_frames[i]:
                        raise ValueError(f"sample {i}: video_num_frames={int(num_frames[i])} but "
                                         f"pixel_values_videos has {video.shape[0]} frames")
                    pixels[i, : video.shape[0]] = video
            out["pixel_values_videos"] = pixels
        return out


def build_collator(dataset_config: Any, tokenizer: Any) -> VideoSFTCollator:
    """The collator for a ``DatasetConfig`` (its ``padding_side``) and the tokenizer's pad token."""
    return VideoSFTCollator(pad_token_id=tokenizer.pad_token_id, padding_side=dataset_config.padding_side)


__all__ = ["VideoSFTCollator", "build_collator"]
