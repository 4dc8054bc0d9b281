"""Batching samples of :class:`~lmms_engine.data.dataset.VideoSFTDataset` into model inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import torch

from lmms_engine.data.chat import IGNORE_INDEX


@dataclass
class VideoSFTCollator:
    """Pad token sequences (left or right) and stack frames, or pack several samples per row.

    Input: samples with ``input_ids`` and ``labels`` (long ``[L_i]``), ``video_num_frames`` and, for
    samples with videos, ``pixel_values_videos``: one video as float ``[T_i, 3, H, W]`` and an int, several
    as a list of those and a list of ints; for samples with images, ``pixel_values`` (a list of float
    ``[tiles_k, 3, S, S]``) and ``image_sizes`` (a list of ``(height, width)``); other keys are ignored.

    Output without packing (``packing_length`` None), one row per sample:

    - ``input_ids`` long ``[B, L]`` (padded with ``pad_token_id``), ``attention_mask`` long ``[B, L]``
      (1 = real token), ``labels`` long ``[B, L]`` (-100 on padding);
    - when every sample has at most one video: ``pixel_values_videos`` float ``[B, T_max, 3, H, W]``,
      zeros past a sample's frames and for samples without video (omitted when no sample has a video),
      ``video_num_frames`` long ``[B]`` (0 = no video);
    - when a sample has several videos: one entry per video, in sample order then tag order:
      ``pixel_values_videos`` ``[V, T_max, 3, H, W]``, ``video_num_frames`` ``[V]`` and ``video_row``
      ``[V]`` (the row of each video), as for packed rows;
    - with images: ``pixel_values`` float ``[N, tiles_max, 3, S, S]`` (one entry per image in sample
      order then tag order, zero tiles past each image's own), ``image_sizes`` long ``[N, 2]`` and
      ``batch_num_images`` long ``[B]`` (images per sample: transformers tiles the image of a sample
      with exactly one).

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
      ``video_row`` long ``[V]``, the row each video sits in;
    - images as without packing, in the same order as the videos (rows, then samples in a row);
      ``batch_num_images`` has one entry per sample in that order.
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
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        order = list(range(batch))
        if any(len(_videos(s)) > 1 for s in samples):
            out.update(self._flat_videos(samples, order, order))
        else:
            num_frames = torch.tensor([_num_frames(s) for s in samples], dtype=torch.long)
            out["video_num_frames"] = num_frames
            pixels = _stack_videos([s.get("pixel_values_videos") for s in samples], num_frames.tolist(),
                                   list(range(batch)))
            if pixels is not None:
                out["pixel_values_videos"] = pixels
        out.update(_stack_images(samples, order))
        return out

    @staticmethod
    def _flat_videos(samples: Sequence[Mapping[str, Any]], order: Sequence[int],
                     rows: Sequence[int]) -> dict[str, torch.Tensor]:
        """One entry per video of ``samples[order[k]]`` (in row ``rows[k]``), in that order."""
        videos, frames, owner, ids = [], [], [], []
        for i, row in zip(order, rows):
            for video, n in _videos(samples[i]):
                videos.append(video)
                frames.append(n)
                owner.append(row)
                ids.append(i)
        out = {"video_num_frames": torch.tensor(frames, dtype=torch.long),
               "video_row": torch.tensor(owner, dtype=torch.long)}
        pixels = _stack_videos(videos, frames, ids)
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
        placed: list[int] = []  # samples in row order then in-row order
        placed_rows: list[int] = []
        for r, row in enumerate(rows):
            col = 0
            for i in row:
                n = lengths[i]
                input_ids[r, col:col + n] = torch.as_tensor(samples[i]["input_ids"], dtype=torch.long)
                labels[r, col:col + n] = torch.as_tensor(samples[i]["labels"], dtype=torch.long)
                labels[r, col] = IGNORE_INDEX
                position_ids[r, col:col + n] = torch.arange(n)
                col += n
                placed.append(i)
                placed_rows.append(r)
            # The padding restarts at 0 too: a sequence of its own, never attended by a sample.
            position_ids[r, col:] = torch.arange(length - col)
        out = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        out.update(self._flat_videos(samples, placed, placed_rows))
        out.update(_stack_images(samples, placed))
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
    frames = sample.get("video_num_frames", 0)
    return int(frames) if not isinstance(frames, (list, tuple)) else sum(int(n) for n in frames)


def _videos(sample: Mapping[str, Any]) -> list[tuple[torch.Tensor | None, int]]:
    """``(pixels [T, 3, H, W], T)`` of each video of a sample (one entry with None pixels when a sample
    claims frames but holds none: ``_stack_videos`` reports it)."""
    pixels, frames = sample.get("pixel_values_videos"), sample.get("video_num_frames", 0)
    if isinstance(pixels, (list, tuple)) or isinstance(frames, (list, tuple)):
        pixels = list(pixels or [])
        frames = list(frames) if isinstance(frames, (list, tuple)) else [int(frames)]
        if len(pixels) != len(frames):
            raise ValueError(f"a sample has {len(pixels)} videos but video_num_frames lists {len(frames)}")
        return [(p, int(n)) for p, n in zip(pixels, frames)]
    if pixels is None and not int(frames):
        return []
    return [(pixels, int(frames))]


def _stack_images(samples: Sequence[Mapping[str, Any]], order: Sequence[int]) -> dict[str, torch.Tensor]:
    """``pixel_values [N, tiles_max, 3, S, S]``, ``image_sizes [N, 2]`` and ``batch_num_images`` over
    ``samples`` in ``order``; empty when no sample has an image."""
    counts = [len(samples[i].get("pixel_values") or []) for i in order]
    if not any(counts):
        return {}
    images = [p for i in order for p in samples[i].get("pixel_values") or []]
    sizes = [tuple(s) for i in order for s in samples[i].get("image_sizes") or []]
    if len(sizes) != len(images):
        raise ValueError(f"{len(images)} images but {len(sizes)} image_sizes in the batch")
    shapes = {tuple(p.shape[1:]) for p in images}
    if len(shapes) > 1:
        raise ValueError(f"image tiles of one batch must share [3, S, S]; got {sorted(shapes)}")
    pixels = images[0].new_zeros((len(images), max(p.shape[0] for p in images), *shapes.pop()))
    for k, tiles in enumerate(images):
        pixels[k, :tiles.shape[0]] = tiles
    return {"pixel_values": pixels, "image_sizes": torch.tensor(sizes, dtype=torch.long),
            "batch_num_images": torch.tensor(counts, dtype=torch.long)}


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
