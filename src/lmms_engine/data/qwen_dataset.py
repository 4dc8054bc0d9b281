"""The SFT dataset and collator for Qwen-VL checkpoints (Qwen2.5-VL, Qwen3-VL).

The same records as for LLaVA-OneVision (LLaVA ``conversations`` with ``<video>``, OpenAI-style
``messages`` with ``video_url`` or Qwen/HF ``{"type": "video", "video": path}`` parts) train through
the checkpoint's own chat template: the first user turn is rendered as the content parts
``[{"type": "video"}, {"type": "text", "text": question}]``, which Qwen's templates turn into
``<|vision_start|><|video_pad|><|vision_end|>question``; that text is then expanded as transformers'
Qwen processors do (:meth:`~lmms_engine.data.qwen_vision.QwenVideoProcessing.placeholder_text`).
:func:`build_qwen_dataset` checks once that the template renders the video part that way.

Frames: PyAV at the video's native size, sampled at ``dataset_config.fps`` (Qwen's default 2 when
null) capped at ``max_frames`` (``force_sample: true`` = exactly ``max_frames`` by count), then
:class:`~lmms_engine.data.qwen_vision.QwenVideoProcessing` (resize within ``min_pixels`` /
``max_pixels`` / ``total_pixels``, normalise, patches).

Each sample::

    input_ids, labels        long [L]
    pixel_values_videos      float [t*h*w, 3*2*p*p]   (records with a video)
    video_grid_thw           long [1, 3]
    second_per_grid_ts       float [1]                (seconds per temporal group)
    video_num_frames         int                      (temporal groups t, the autoregressive loss's frames; 0 = none)
    index                    int

Token lengths are estimated from container metadata as for LLaVA-OneVision (length-grouped samplers,
``drop_long_before_loading``), with the stream's coded size for the frame grid. Not supported for these
families (a config error): ``add_time_instruction`` (Qwen encodes time itself).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import torch

from lmms_engine.data.chat import EncodedConversation, encode_conversation
from lmms_engine.data.collator import VideoSFTCollator, first_fit_decreasing
from lmms_engine.data.dataset import DatasetConfig, VideoSFTDataset, _SampleFailure, open_records
from lmms_engine.data.lengths import LengthEstimate, kept_length
from lmms_engine.data.qwen_vision import (
    DEFAULT_FPS,
    TEMPLATE_VIDEO_TEXT,
    QwenVideoInputs,
    QwenVideoProcessing,
    group_timestamps,
)
from lmms_engine.data.records import ConversationRecord, Turn
from lmms_engine.utils.config import ConfigError, from_mapping
from lmms_engine.video.sampling import SamplingSpec

#: The placeholder of the records (LLaVA's), independent of the checkpoint's tokens.
RECORD_VIDEO_TOKEN = "<video>"
_VISUAL_KEYS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


@dataclass(frozen=True)
class QwenProcessorInfo:
    """What :class:`QwenVideoSFTDataset` needs from the model: its video processing and pad token."""

    processing: QwenVideoProcessing
    video_token: str = "<|video_pad|>"


class QwenVideoSFTDataset(VideoSFTDataset):
    """:class:`~lmms_engine.data.dataset.VideoSFTDataset` for Qwen-VL (module docstring); build it with
    :func:`build_qwen_dataset`."""

    processor_info: QwenProcessorInfo

    @property
    def processing(self) -> QwenVideoProcessing:
        return self.processor_info.processing

    def sampling_spec(self, record: ConversationRecord, video: Any = None, max_frames: int | None = None) -> SamplingSpec:
        """fps sampling at ``dataset_config.fps`` or Qwen's 2, capped at ``max_frames`` (default
        ``dataset_config.max_frames``); one video per record."""
        return SamplingSpec(max_frames=max_frames or self.config.max_frames, fps=self.config.fps or DEFAULT_FPS,
                            force_sample=self.config.force_sample, start_time=record.video_start,
                            end_time=record.video_end)

    def length_estimates(self) -> list[LengthEstimate]:
        """Each record's :class:`~lmms_engine.data.lengths.LengthEstimate` from container metadata, no frame
        decoded: the sampling rule on the probed timestamps gives the frames, the stream's coded size and
        the frame count give the grid (:meth:`QwenVideoProcessing.grid`), and the record is tokenized with
        that expansion. A video that cannot be probed is assumed ``max_frames`` frames of a square at
        ``max_pixels`` (an upper bound, ``exact=False``). Computed once, then cached."""
        if self._length_estimates is None:
            self._length_estimates = self._estimate_lengths()
        return self._length_estimates

    def _estimate_lengths(self) -> list[LengthEstimate]:
        from lmms_engine.data.lengths import probe_videos
        from lmms_engine.video.sampling import sample_indices

        records = [self.record(j) for j in range(len(self))]
        timeout = self.config.decode_timeout
        probes = probe_videos((r.video for r in records if r.video is not None), timeout=timeout)
        sizes: dict[str, tuple[int, int] | None] = {}
        processing = self.processing
        estimates = []
        for record in records:
            video, exact = None, True
            if record.video is not None:
                if record.video not in sizes:
                    sizes[record.video] = _coded_size(record.video, timeout)
                probe, size = probes[record.video], sizes[record.video]
                try:
                    if isinstance(probe, Exception) or size is None:
                        raise ValueError("not probed")
                    indices = sample_indices(probe.timestamps, self.sampling_spec(record))
                    stamps = [probe.timestamps[i] for i in indices]
                except ValueError:
                    exact = False
                    stamps = [i / DEFAULT_FPS for i in range(self.config.max_frames)]
                    side = int(processing.max_pixels ** 0.5)
                    size = (side, side)
                grid = processing.grid(len(stamps), *size)
                video = QwenVideoInputs(pixel_values=torch.empty(0), grid_thw=grid,
                                        group_times=group_timestamps(stamps, processing.temporal_patch_size),
                                        second_per_grid=0.0, frame_size=size)
            encoded = self.encode_record(record, video=video)
            estimates.append(LengthEstimate(len(encoded.input_ids), tuple(encoded.turn_ends),
                                            0 if video is None else len(stamps),
                                            0 if video is None else processing.video_token_count(video.grid_thw),
                                            exact))
        return estimates

    def encode_record(self, record: ConversationRecord, *, num_frames: int = 0, duration: float = 0.0,
                      timestamps: Sequence[float] = (), generation: bool = False,
                      video: QwenVideoInputs | None = None) -> EncodedConversation:
        """Tokenize ``record``; ``video`` (its processed video) sets the expansion of the video part."""
        turns = list(record.turns[:-1] if generation else record.turns)
        if record.video is not None:
            if video is None:
                raise ValueError(f"{record.where}: a record with a video needs its processed video to be encoded")
            text = self.processing.placeholder_text(video.grid_thw, video.group_times)
            turns = [Turn(t.role, _expand(t.text, text)) for t in turns]
        return encode_conversation(turns, self.tokenizer, add_generation_prompt=generation)

    def _load(self, j: int, generation: bool = False) -> dict[str, Any]:
        record = self.record(j)
        if record.images or len(record.videos) > 1:
            raise _SampleFailure("unsupported_media", f"{len(record.images)} image(s) and {len(record.videos)} "
                                                      "video(s): the Qwen-VL path takes at most one video per record")
        video = None
        if record.video is not None:
            decoded = self._decode(record)
            frames = decoded.frames
            span = _sampled_span(record, decoded)
            sampled_fps = len(decoded.frame_indices) / span * decoded.video_fps if span else None
            video = self.processing.preprocess(frames, timestamps=decoded.timestamps, sampled_fps=sampled_fps)
        encoded = self.encode_record(record, generation=generation, video=video)
        input_ids, labels = encoded.input_ids, encoded.labels
        if not generation:
            keep = kept_length(len(input_ids), encoded.turn_ends, self.config.max_length, self.config.truncation)
            if keep is None:
                count = 0 if video is None else self.processing.video_token_count(video.grid_thw)
                raise _SampleFailure("too_long", f"{len(input_ids)} tokens > max_length={self.config.max_length} "
                                                 f"(truncation={self.config.truncation!r}, video tokens: {count})")
            input_ids, labels = input_ids[:keep], labels[:keep]
        sample: dict[str, Any] = {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "video_num_frames": 0 if video is None else int(video.grid_thw[0]),
            "index": j,
        }
        if video is not None:
            sample["pixel_values_videos"] = video.pixel_values
            sample["video_grid_thw"] = torch.tensor([video.grid_thw], dtype=torch.long)
            sample["second_per_grid_ts"] = torch.tensor([video.second_per_grid], dtype=torch.float32)
        if generation:
            sample["reference"] = record.turns[-1].text
            sample["metadata"] = dict(record.metadata)
        return sample

    def _decode_size(self) -> None:
        """Native size: the frame size Qwen resizes to depends on it and on the frame count."""
        return None


def _coded_size(path: str, timeout: float | None) -> tuple[int, int] | None:
    """``(height, width)`` of the video stream as the decoder outputs it, from the container (no frame
    decoded); None when the file cannot be opened."""
    from lmms_engine.video.decode import open_video

    try:
        container, stream = open_video(path, num_threads=1, timeout=timeout)
    except Exception:  # noqa: BLE001 - an unreadable file is reported when it is loaded
        return None
    try:
        return int(stream.codec_context.height), int(stream.codec_context.width)
    finally:
        container.close()


def _expand(text: str, video_text: str) -> str:
    """The canonical ``<video>\\nquestion`` -> the template's video part text, expanded, then the question."""
    if RECORD_VIDEO_TOKEN not in text:
        return text
    rest = text.replace(RECORD_VIDEO_TOKEN, "", 1)
    return video_text + (rest[1:] if rest.startswith("\n") else rest)


def _sampled_span(record: ConversationRecord, decoded: Any) -> float:
    """Frames of the sampled range, for Qwen2.5-VL's sampled fps (``T / frames in range * video fps``)."""
    start = record.video_start or 0.0
    end = record.video_end if record.video_end is not None else decoded.duration
    return max(end - start, 0.0) * decoded.video_fps


def check_video_template(tokenizer: Any, where: str = "the checkpoint's chat template") -> None:
    """The chat template must render a ``{"type": "video"}`` content part as Qwen's templates do
    (``<|vision_start|><|video_pad|><|vision_end|>``, then the text parts), the text the dataset expands."""
    if tokenizer.chat_template is None:
        raise ConfigError(f"{where}: the tokenizer has no chat_template")
    parts = [{"role": "user", "content": [{"type": "video", "video": "clip.mp4"}, {"type": "text", "text": "Q?"}]}]
    plain = [{"role": "user", "content": TEMPLATE_VIDEO_TEXT + "Q?"}]
    rendered = tokenizer.apply_chat_template(parts, tokenize=False, add_generation_prompt=True)
    if rendered != tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True):
        raise ConfigError(f"{where} does not render a video content part as {TEMPLATE_VIDEO_TEXT!r} followed by the "
                          f"text (it rendered {rendered!r}); use the checkpoint's own Qwen-VL tokenizer")


def build_qwen_dataset(
    dataset_config: DatasetConfig | Mapping[str, Any],
    tokenizer: Any,
    processing: QwenVideoProcessing,
    split: Literal["train", "eval"] = "train",
) -> QwenVideoSFTDataset:
    """:func:`~lmms_engine.data.dataset.build_dataset` for a Qwen-VL checkpoint (module docstring)."""
    config = dataset_config if isinstance(dataset_config, DatasetConfig) else \
        from_mapping(DatasetConfig, dataset_config, "dataset_config")
    if config.add_time_instruction:
        raise ConfigError(f"dataset_config.add_time_instruction: not available for Qwen-VL checkpoints "
                          f"({processing.family}), which encode time themselves; set it to false")
    check_video_template(tokenizer)
    records, name = open_records(config, split, video_token=RECORD_VIDEO_TOKEN)
    return QwenVideoSFTDataset(records, config, tokenizer, QwenProcessorInfo(processing), source=name)


@dataclass
class QwenVideoCollator(VideoSFTCollator):
    """:class:`~lmms_engine.data.collator.VideoSFTCollator` for Qwen-VL samples.

    Tokens are padded or packed as there; the videos of the batch, in the order their tokens appear
    (rows, then columns), become ``pixel_values_videos`` ``[sum of t*h*w, 3*2*p*p]`` (their patch
    rows concatenated, as transformers' processors return them), ``video_grid_thw`` long ``[V, 3]`` and
    ``second_per_grid_ts`` float ``[V]``. ``video_num_frames``: ``[B]`` temporal groups per sample
    (padding; 0 = no video), or ``[V]`` per video with ``video_row`` ``[V]`` (packing).
    """

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        text_only = [{k: v for k, v in s.items() if k not in _VISUAL_KEYS} | {"video_num_frames": 0} for s in samples]
        out = super().__call__(text_only)
        if self.packing_length is None:
            order = list(range(len(samples)))
            rows = order
        else:
            bins = first_fit_decreasing([len(s["input_ids"]) for s in samples], self.packing_length)
            order = [i for row in bins for i in row]
            rows = [r for r, row in enumerate(bins) for _ in row]
        with_video = [(i, r) for i, r in zip(order, rows) if "pixel_values_videos" in samples[i]]
        if self.packing_length is None:
            out["video_num_frames"] = torch.tensor([int(s.get("video_num_frames", 0)) for s in samples],
                                                   dtype=torch.long)
        else:
            out["video_num_frames"] = torch.tensor([int(samples[i]["video_num_frames"]) for i, _ in with_video],
                                                   dtype=torch.long)
            out["video_row"] = torch.tensor([r for _, r in with_video], dtype=torch.long)
        if with_video:
            out["pixel_values_videos"] = torch.cat([samples[i]["pixel_values_videos"] for i, _ in with_video])
            out["video_grid_thw"] = torch.cat([samples[i]["video_grid_thw"] for i, _ in with_video])
            out["second_per_grid_ts"] = torch.cat([samples[i]["second_per_grid_ts"] for i, _ in with_video])
        return out


def qwen_processing(model_config: Any, dataset_config: DatasetConfig) -> QwenVideoProcessing:
    """The family's video processing with ``dataset_config``'s ``video_*_pixels`` overrides."""
    return QwenVideoProcessing.for_model(model_config, min_pixels=dataset_config.video_min_pixels,
                                         max_pixels=dataset_config.video_max_pixels,
                                         total_pixels=dataset_config.video_total_pixels)


def build_qwen_data(model_config: Any, dataset_config: DatasetConfig, tokenizer: Any, with_eval: bool,
                    with_train: bool = True
                    ) -> tuple[QwenVideoSFTDataset | None, QwenVideoSFTDataset | None, QwenVideoCollator]:
    """The train dataset (``with_train``), the eval dataset (``with_eval``) and the collator for a Qwen-VL
    model config."""
    from lmms_engine.data.collator import build_collator

    processing = qwen_processing(model_config, dataset_config)
    train = build_qwen_dataset(dataset_config, tokenizer, processing, split="train") if with_train else None
    evaluation = build_qwen_dataset(dataset_config, tokenizer, processing, split="eval") if with_eval else None
    return train, evaluation, QwenVideoCollator(**dataclasses.asdict(build_collator(dataset_config, tokenizer)))


__all__ = ["QwenProcessorInfo", "build_qwen_data", "qwen_processing", "QwenVideoCollator", "QwenVideoSFTDataset", "build_qwen_dataset",
           "check_video_template"]
