"""Batching samples of :class:`~lmms_engine.data.dataset.VideoSFTDataset` into model inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import torch

from lmms_engine.data.chat import IGNORE_INDEX


@dataclass
class VideoSFTCollator:
    """Pad token sequences (left or right) and stack frames, or pack several samples per row.

    Input: samples with ``input_ids`` and ``labels`` (long ``[L_i]``), ``video_num_frames`` (int) and,
    for samples with a video, ``pixel_values_videos`` (float ``[T_i, 3, H, W]``); other keys are ignored.

    Output without packing (``packing_length`` None), one row per sample:

    - ``input_ids`` long ``[B, L]`` (padded with ``pad_token_id``), ``attention_mask`` long ``[B, L]``
      (1 = real token), ``labels`` long ``[B, L]`` (-100 on padding);
    - ``pixel_values_videos`` float ``[B, T_max, 3, H, W]``, zeros past a sample's frames and for samples
      without video; omitted when no sample of the batch has a video;
    - ``video_num_frames`` long ``[B]`` (0 = no video).

    Output with packing: the samples go into ``R`` rows of at most ``packing_length`` tokens (first-fit
    decreasing by length, ties in batch order; in a row, samples in the order they were placed), padded
    on the right to the longest row ``L``:

    - ``input_ids`` long ``[R, L]``; ``labels`` long ``[R, L]``, -100 on padding and on the first token of
      every sample (never predicted from the previous sample's last token);
    - ``position_ids`` long ``[R, L]``, ``0..n-1`` for each sample and again ``0, 1, ...`` over the
      padding, so every sample (and the padding) is its own sequence; no ``attention_mask`` key: without
      one, transformers derives a block-diagonal causal mask from where the position ids restart;
    - ``pixel_values_videos`` float ``[V, T_max, 3, H, W]``, one entry per video of the batch in row order,
      then in-row order (omitted when ``V == 0``); ``video_num_frames`` long ``[V]`` (each >= 1);
      ``video_row`` long ``[V]``, the row each video sits in.
    """

    pad_token_id: int
    padding_side: Literal["right", "left"] = "right"
    packing_length: int | None = None

    def __post_init__(self) -> None:
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")
        if self.pad_token_id is None:
            raise ValueError("pad_token_id is None: the tokenizer needs a pad token")
        if self.packing_length is not None:
            if isinstance(self.packing_length, bool) or not isinstance(self.packing_length, int) \
                    or self.packing_length < 1:
                raise ValueError(f"packing_length must be an integer >= 1 or None, got {self.packing_length!r}")
            if self.padding_side != "right":
                raise ValueError(f"packing needs padding_side='right' (samples fill each row from the left and "
                                 f"the padding follows them), got padding_side={self.padding_side!r}")

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        return self._pad(samples) if self.packing_length is None else self._pack(samples)

    def _pad(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
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
        num_frames = torch.tensor([_num_frames(s) for s in samples], dtype=torch.long)
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
               "video_num_frames": num_frames}
        pixels = _stack_videos([s.get("pixel_values_videos") for s in samples], num_frames.tolist(),
                               list(range(batch)))
        if pixels is not None:
            out["pixel_values_videos"] = pixels
        return out

    def _pack(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        capacity = self.packing_length
        lengths = [len(s["input_ids"]) for s in samples]
        for i, n in enumerate(lengths):
            if n > capacity:
                raise ValueError(
                    f"sample {i} of the batch has {n} tokens, more than packing_length={capacity}; raise "
                    f"dataset_config.packing_length (default: max_length) or lower max_length so that "
                    f"samples are truncated to fit"
                )
        rows = first_fit_decreasing(lengths, capacity)
        length = max(sum(lengths[i] for i in row) for row in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.empty((len(rows), length), dtype=torch.long)
        order: list[int] = []  # samples holding a video, in row order then in-row order
        video_row: list[int] = []
        for r, row in enumerate(rows):
            col = 0
            for i in row:
                n = lengths[i]
                input_ids[r, col:col + n] = torch.as_tensor(samples[i]["input_ids"], dtype=torch.long)
                labels[r, col:col + n] = torch.as_tensor(samples[i]["labels"], dtype=torch.long)
                labels[r, col] = IGNORE_INDEX
                position_ids[r, col:col + n] = torch.arange(n)
                col += n
                if _num_frames(samples[i]) or samples[i].get("pixel_values_videos") is not None:
                    order.append(i)
                    video_row.append(r)
            # The padding restarts at 0 too: a sequence of its own, never attended by a sample.
            position_ids[r, col:] = torch.arange(length - col)
        num_frames = [_num_frames(samples[i]) for i in order]
        out = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
               "video_num_frames": torch.tensor(num_frames, dtype=torch.long),
               "video_row": torch.tensor(video_row, dtype=torch.long)}
        pixels = _stack_videos([samples[i].get("pixel_values_videos") for i in order], num_frames, order)
        if pixels is not None:
            out["pixel_values_videos"] = pixels
        return out


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of at most ``capacity`` total length: indices sorted by length (longest first, ties in index
    order), each put into the first bin where it fits, else a new one. Deterministic.

    Returns the bins in creation order, each the list of its indices in placement order.
    """
    bins: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        if lengths[i] > capacity:
            raise ValueError(f"item {i} of length {lengths[i]} does not fit in capacity {capacity}")
        for b, room in enumerate(free):
            if lengths[i] <= room:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(capacity - lengths[i])
    return bins


def _num_frames(sample: Mapping[str, Any]) -> int:
    return int(sample.get("video_num_frames", 0))


def _stack_videos(videos: list[torch.Tensor | None], num_frames: list[int],
                  sample_ids: list[int]) -> torch.Tensor | None:
    """``[N, T_max, 3, H, W]`` from ``[T_i, 3, H, W]`` entries (None = no video: zeros); None when no
    entry has a video. ``sample_ids`` name the batch samples in error messages."""
    shapes = {tuple(v.shape[1:]) for v in videos if v is not None}
    if not shapes:
        for n, i in zip(num_frames, sample_ids):
            if n:
                raise ValueError(f"sample {i}: video_num_frames={n} but it has no pixel_values_videos")
        return None
    if len(shapes) > 1:
        raise ValueError(f"videos of one batch must share [3, H, W]; got {sorted(shapes)}")
    frame_shape = shapes.pop()
    reference = next(v for v in videos if v is not None)
    pixels = torch.zeros((len(videos), max(num_frames), *frame_shape), dtype=reference.dtype)
    for k, (video, n, i) in enumerate(zip(videos, num_frames, sample_ids)):
        frames = 0 if video is None else video.shape[0]
        if frames != n and (video is not None or n):
            raise ValueError(f"sample {i}: video_num_frames={n} but pixel_values_videos has {frames} frames")
        if video is not None:
            pixels[k, :frames] = video
    return pixels


def build_collator(dataset_config: Any, tokenizer: Any) -> VideoSFTCollator:
    """The collator for a ``DatasetConfig``: its ``padding_side``, and with ``packing`` its
    ``packing_length`` (None = ``max_length``); the tokenizer's pad token."""
    packing_length = None
    if getattr(dataset_config, "packing", False):
        packing_length = dataset_config.packing_length or dataset_config.max_length
        if packing_length is None:
            raise ValueError("dataset_config.packing needs a row length: set packing_length or max_length")
    return VideoSFTCollator(pad_token_id=tokenizer.pad_token_id, padding_side=dataset_config.padding_side,
                            packing_length=packing_length)


__all__ = ["VideoSFTCollator", "build_collator", "first_fit_decreasing"]
