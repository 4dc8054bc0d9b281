"""The SFT dataset and collator for Qwen-VL checkpoints (Qwen2-VL, Qwen2.5-VL, Qwen3-VL).

The same records as for LLaVA-OneVision (LLaVA ``conversations`` with ``<video>`` / ``<image>`` tags,
OpenAI-style ``messages`` with ``video_url`` / ``image_url`` parts, Qwen/HF ``{"type": "video", "video":
path}`` / ``{"type": "image", "image": path}`` parts; any number of videos and images, matched to their
tags in order: ``record.media``) train through the checkpoint's own chat template. Each tag (and one
newline right after it) becomes the text Qwen's templates render for a content part,
``<|vision_start|><|video_pad|><|vision_end|>`` or ``<|vision_start|><|image_pad|><|vision_end|>``, expanded as
transformers' Qwen processors do (:meth:`~lmms_engine.data.qwen_vision.QwenVideoProcessing.placeholder_text`,
:meth:`~lmms_engine.data.qwen_vision.QwenVideoProcessing.image_placeholder_text`): each video on its own grid.
:func:`build_qwen_dataset` checks once that the template renders both parts that way.

Frames: PyAV at the video's native size, sampled at ``dataset_config.fps`` (Qwen's default 2 when
null) capped at each video's frame cap (``max_frames``, lowered by ``max_visual_tokens``; ``force_sample:
true`` = exactly the cap by count), then :class:`~lmms_engine.data.qwen_vision.QwenVideoProcessing`
(resize within ``min_pixels`` / ``max_pixels`` / ``total_pixels``, normalise, patches). Images: resized
within the checkpoint's image pixel bounds and ``max_image_pixels``, one temporal group each.

Each sample::

    input_ids, labels        long [L]
    pixel_values_videos      float [sum t*h*w, 3*2*p*p]  (records with videos; the videos in tag order)
    video_grid_thw           long [V, 3]
    second_per_grid_ts       float [V]                   (seconds per temporal group)
    video_num_frames         int, or [V] ints            (temporal groups, the autoregressive loss's frames; 0 = none)
    pixel_values             float [sum h*w, 3*2*p*p]    (records with images; no autoregressive loss)
    image_grid_thw           long [I, 3]
    index                    int

Budgets and lengths are those of :class:`~lmms_engine.data.dataset.VideoSFTDataset` (the same rules) with
Qwen's token counts: ``max_visual_tokens`` lowers frame caps by :func:`~lmms_engine.data.dataset.fit_frames`,
a video's tokens at a cap being those of the frames the sampler returns at that cap on the grid of its
coded size; ``max_length`` never cuts a visual run. Token lengths are estimated from container metadata
(length-grouped samplers, ``drop_long_before_loading``), with the stream's coded size for the frame grid
and the image headers. ``add_time_instruction``: LLaVA-Video's sentence after the video part (records
with one video and no image), as for LLaVA-OneVision; Qwen3-VL's per-group timestamps stay.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Mapping, Sequence

import torch

from lmms_engine.data.chat import EncodedConversation, encode_conversation, video_token_id
from lmms_engine.data.collator import VideoSFTCollator, first_fit_decreasing
from lmms_engine.data.dataset import DatasetConfig, VideoSFTDataset, _SampleFailure, open_records
from lmms_engine.data.lengths import SampledVideo
from lmms_engine.data.qwen_vision import (
    DEFAULT_FPS,
    IMAGE_PAD,
    TEMPLATE_IMAGE_TEXT,
    TEMPLATE_VIDEO_TEXT,
    VIDEO_PAD,
    QwenImageInputs,
    QwenVideoInputs,
    QwenVideoProcessing,
    group_timestamps,
)
from lmms_engine.data.records import ConversationRecord, Medium, Turn
from lmms_engine.utils.config import ConfigError, from_mapping
from lmms_engine.video.sampling import SamplingSpec

#: The placeholders of the records (LLaVA's), independent of the checkpoint's tokens.
RECORD_VIDEO_TOKEN = "<video>"
RECORD_IMAGE_TOKEN = "<image>"
_VIDEO_KEYS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
_IMAGE_KEYS = ("pixel_values", "image_grid_thw")
_VISUAL_KEYS = _VIDEO_KEYS + _IMAGE_KEYS
#: Coded frame sizes a dataset remembers (per process).
_SIZE_CACHE = 4096


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

    @property
    def record_video_token(self) -> str:
        return RECORD_VIDEO_TOKEN

    def sampling_spec(self, record: ConversationRecord, video: Medium | None = None,
                      max_frames: int | None = None) -> SamplingSpec:
        """fps sampling at ``dataset_config.fps`` or Qwen's 2, capped at ``max_frames`` (default
        ``dataset_config.max_frames``), within ``video``'s time range (default: the record's first video)."""
        video = video if video is not None else record.videos[0]
        return SamplingSpec(max_frames=max_frames or self.config.max_frames, fps=self.config.fps or DEFAULT_FPS,
                            force_sample=self.config.force_sample, start_time=video.start, end_time=video.end)

    # ------------------------------------------------------------------ budgets (hooks of VideoSFTDataset)
    def _processed_image_size(self, height: int, width: int) -> tuple[int, int]:
        """Qwen's ``smart_resize`` within the checkpoint's image bounds and ``max_image_pixels``."""
        return self.processing.image_size(height, width, self.config.max_image_pixels)

    def _image_tokens(self, image_sizes: Sequence[tuple[int, int]]) -> int:
        processing = self.processing
        return sum(processing.image_token_count(processing.image_grid(h, w)) for h, w in image_sizes)

    def _video_token_counts(self, record: ConversationRecord) -> list[Any]:
        """Per video, ``n -> tokens`` of the frames the sampler returns with a cap of ``n`` (their grid at the
        video's coded size: a Qwen grid depends on the frame count and size); from container metadata."""
        from lmms_engine.video.decode import probe_video
        from lmms_engine.video.sampling import sample_indices

        counts = []
        for video in record.videos:
            size = self._coded_size(video.path)
            try:
                if size is None:
                    raise ValueError("cannot open it")
                probe = probe_video(video.path, timeout=self.config.decode_timeout)
            except Exception as err:  # noqa: BLE001 - any unreadable file is a broken video
                raise _SampleFailure("broken_video", f"{video.path}: cannot read its metadata ({err})") from err

            def tokens(n: int, video: Medium = video, size: tuple[int, int] = size, probe: Any = probe) -> int:
                frames = len(sample_indices(probe.timestamps, self.sampling_spec(record, video, n)))
                return self.processing.video_token_count(self.processing.grid(max(frames, 1), *size))

            counts.append(tokens)
        return counts

    # ------------------------------------------------------------------ lengths
    def estimate_encoding(self, record: ConversationRecord, videos: Sequence[SampledVideo],
                          image_sizes: Sequence[tuple[int, int]]) -> EncodedConversation:
        """Each video's grid from its sampled frames at the stream's coded size (:meth:`QwenVideoProcessing.grid`);
        a video that cannot be probed is assumed its cap of frames as squares at ``max_pixels`` (an upper
        bound)."""
        processing = self.processing
        inputs, duration, stamps = [], 0.0, []
        for k, video in enumerate(videos):
            size = self._coded_size(record.videos[k].path) if video.probe is not None else None
            if video.indices is None or size is None or not video.indices:
                times = [i / DEFAULT_FPS for i in range(video.spec.max_frames)]
                side = int(processing.max_pixels ** 0.5)
                size = (side, side)
            else:
                times = [video.probe.timestamps[i] for i in video.indices]
            if k == 0:
                duration, stamps = (video.probe.duration if video.probe else 0.0), times
            inputs.append(QwenVideoInputs(pixel_values=torch.empty(0), grid_thw=processing.grid(len(times), *size),
                                          group_times=group_timestamps(times, processing.temporal_patch_size),
                                          second_per_grid=0.0, frame_size=size))
        grids = [processing.image_grid(h, w) for h, w in image_sizes]
        return self.encode_record(record, videos=inputs, image_grids=grids, duration=duration, timestamps=stamps)

    # ------------------------------------------------------------------ encoding and loading
    def encode_record(self, record: ConversationRecord, *, generation: bool = False,
                      videos: Sequence[QwenVideoInputs] = (), image_grids: Sequence[Sequence[int]] = (),
                      duration: float = 0.0, timestamps: Sequence[float] = ()) -> EncodedConversation:
        """Tokenize ``record``: each ``<video>`` / ``<image>`` tag (in the order of ``record.media``) becomes
        its expansion (``videos``: the processed videos, ``image_grids``: each image's ``image_grid_thw``).
        ``duration`` and ``timestamps`` (the first video's) matter only with ``add_time_instruction``.
        ``media_spans`` of the result: each video's / image's run of pad tokens (per temporal group for
        Qwen3-VL), so truncation keeps them whole."""
        if len(videos) != len(record.videos) or len(image_grids) != len(record.images):
            raise ValueError(f"{record.where}: {len(record.videos)} video(s) and {len(record.images)} image(s) "
                             f"need their processed inputs to be encoded (got {len(videos)} and {len(image_grids)})")
        turns = list(record.turns[:-1] if generation else record.turns)
        if len(record.videos) == 1 and not record.images and self.config.add_time_instruction:
            turns = self._with_time_instruction(turns, record, duration, timestamps)
        processing = self.processing
        video_texts = iter(processing.placeholder_text(v.grid_thw, v.group_times) for v in videos)
        image_texts = iter(processing.image_placeholder_text(g) for g in image_grids)
        texts = {RECORD_VIDEO_TOKEN: video_texts, RECORD_IMAGE_TOKEN: image_texts}
        turns = [Turn(t.role, _expand(t.text, texts)) for t in turns]
        encoded = encode_conversation(turns, self.tokenizer, add_generation_prompt=generation)
        return dataclasses.replace(encoded, media_spans=_pad_runs(encoded.input_ids, self._pad_ids()))

    def _coded_size(self, path: str) -> tuple[int, int] | None:
        """:func:`_coded_size` of ``path``; the last :data:`_SIZE_CACHE` answers are remembered in this process
        (records often share videos), never sent to DataLoader workers."""
        cache = self.__dict__.setdefault("_coded_sizes", {})
        if path not in cache:
            if len(cache) >= _SIZE_CACHE:
                del cache[next(iter(cache))]
            cache[path] = _coded_size(path, self.config.decode_timeout)
        return cache[path]

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_coded_sizes", None)
        return state

    def _pad_ids(self) -> tuple[int, int]:
        if not hasattr(self, "_pad_id_pair"):
            self._pad_id_pair = (video_token_id(self.tokenizer, VIDEO_PAD), video_token_id(self.tokenizer, IMAGE_PAD))
        return self._pad_id_pair

    def _load_media(self, record: ConversationRecord) -> tuple[dict[str, Any], dict[str, Any]]:
        """Videos decoded at native size within their frame caps, processed on their own grids; images
        resized and patchified (:meth:`QwenVideoProcessing.preprocess_image`)."""
        sizes = self.image_sizes(record)
        caps = self.frame_caps(record, sizes)
        videos: list[QwenVideoInputs] = []
        duration, stamps = 0.0, []
        for medium, cap in zip(record.videos, caps):
            decoded = self._decode(record, medium, cap)
            span = _sampled_span(medium, decoded)
            sampled_fps = len(decoded.frame_indices) / span * decoded.video_fps if span else None
            videos.append(self.processing.preprocess(decoded.frames, timestamps=decoded.timestamps,
                                                     sampled_fps=sampled_fps))
            if len(videos) == 1:
                duration, stamps = float(decoded.duration), decoded.timestamps
        images = self._load_qwen_images(record, sizes)
        visual: dict[str, Any] = {}
        if videos:
            frames = [int(v.grid_thw[0]) for v in videos]
            visual["video_num_frames"] = frames[0] if len(frames) == 1 else frames
            visual["pixel_values_videos"] = torch.cat([v.pixel_values for v in videos])
            visual["video_grid_thw"] = torch.tensor([v.grid_thw for v in videos], dtype=torch.long)
            visual["second_per_grid_ts"] = torch.tensor([v.second_per_grid for v in videos], dtype=torch.float32)
        if images:
            visual["pixel_values"] = torch.cat([i.pixel_values for i in images])
            visual["image_grid_thw"] = torch.tensor([i.grid_thw for i in images], dtype=torch.long)
        encoding = {"videos": videos, "image_grids": [i.grid_thw for i in images], "duration": duration,
                    "timestamps": stamps}
        return visual, encoding

    def _load_qwen_images(self, record: ConversationRecord, sizes: Sequence[tuple[int, int]]) -> list[QwenImageInputs]:
        import numpy as np

        from lmms_engine.data.images import ImageReadError, load_image

        out = []
        for medium, size in zip(record.images, sizes):
            try:
                image = load_image(medium.path)
            except ImageReadError as err:
                raise _SampleFailure("broken_image", str(err)) from err
            pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
            out.append(self.processing.preprocess_image(pixels, size))
        return out

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


_TAGS = re.compile(re.escape(RECORD_VIDEO_TOKEN) + "|" + re.escape(RECORD_IMAGE_TOKEN))


def _expand(text: str, expansions: Mapping[str, Iterator[str]]) -> str:
    """Each ``<video>`` / ``<image>`` tag of ``text`` (and one newline right after it) -> the next expansion
    of its kind: the template's part text, expanded (Qwen's templates put no newline after a part)."""
    out, last = [], 0
    for match in _TAGS.finditer(text):
        out.append(text[last:match.start()])
        out.append(next(expansions[match.group(0)]))
        last = match.end() + (1 if text.startswith("\n", match.end()) else 0)
    out.append(text[last:])
    return "".join(out)


def _pad_runs(input_ids: Sequence[int], pad_ids: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """``(start, end)`` of each run of visual pad tokens."""
    runs: list[tuple[int, int]] = []
    start = None
    for k, token in enumerate(list(input_ids) + [-1]):
        if token in pad_ids:
            start = k if start is None else start
        elif start is not None:
            runs.append((start, k))
            start = None
    return tuple(runs)


def _sampled_span(video: Medium, decoded: Any) -> float:
    """Frames of the sampled range, for Qwen2.5-VL's sampled fps (``T / frames in range * video fps``)."""
    start = video.start or 0.0
    end = video.end if video.end is not None else decoded.duration
    return max(end - start, 0.0) * decoded.video_fps


def check_video_template(tokenizer: Any, where: str = "the checkpoint's chat template") -> None:
    """The chat template must render a ``{"type": "video"}`` / ``{"type": "image"}`` content part as Qwen's
    templates do (``<|vision_start|><|video_pad|><|vision_end|>`` / ``...<|image_pad|>...``, then the text
    parts), the text the dataset expands."""
    if tokenizer.chat_template is None:
        raise ConfigError(f"{where}: the tokenizer has no chat_template")
    for kind, article, text in (("video", "a", TEMPLATE_VIDEO_TEXT), ("image", "an", TEMPLATE_IMAGE_TEXT)):
        parts = [{"role": "user", "content": [{"type": kind, kind: f"file.{kind}"}, {"type": "text", "text": "Q?"}]}]
        plain = [{"role": "user", "content": text + "Q?"}]
        rendered = tokenizer.apply_chat_template(parts, tokenize=False, add_generation_prompt=True)
        if rendered != tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True):
            raise ConfigError(f"{where} does not render {article} {kind} content part as {text!r} followed by the text "
                              f"(it rendered {rendered!r}); use the checkpoint's own Qwen-VL tokenizer")


def build_qwen_dataset(
    dataset_config: DatasetConfig | Mapping[str, Any],
    tokenizer: Any,
    processing: QwenVideoProcessing,
    split: Literal["train", "eval"] = "train",
) -> QwenVideoSFTDataset:
    """:func:`~lmms_engine.data.dataset.build_dataset` for a Qwen-VL checkpoint (module docstring)."""
    config = dataset_config if isinstance(dataset_config, DatasetConfig) else \
        from_mapping(DatasetConfig, dataset_config, "dataset_config")
    check_video_template(tokenizer)
    records, name = open_records(config, split, video_token=RECORD_VIDEO_TOKEN, image_token=RECORD_IMAGE_TOKEN)
    return QwenVideoSFTDataset(records, config, tokenizer, QwenProcessorInfo(processing), source=name)


@dataclass
class QwenVideoCollator(VideoSFTCollator):
    """:class:`~lmms_engine.data.collator.VideoSFTCollator` for Qwen-VL samples.

    Tokens are padded or packed as there; the videos of the batch, in the order their tokens appear
    (rows, then columns; a sample's videos in its order), become ``pixel_values_videos`` ``[sum of t*h*w,
    3*2*p*p]`` (their patch rows concatenated, as transformers' processors return them), ``video_grid_thw``
    long ``[V, 3]`` and ``second_per_grid_ts`` float ``[V]``; the images likewise ``pixel_values``
    ``[sum of h*w, 3*2*p*p]`` and ``image_grid_thw`` ``[I, 3]``. ``video_num_frames``: ``[B]`` temporal
    groups per sample (padding, at most one video per sample; 0 = no video), or ``[V]`` per video with
    ``video_row`` ``[V]`` (packing, or a sample with several videos).
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
        frames = [_video_groups(samples[i]) for i in order]
        if self.packing_length is None and all(len(f) <= 1 for f in frames):
            out["video_num_frames"] = torch.tensor([sum(f) for f in frames], dtype=torch.long)
        else:
            out["video_num_frames"] = torch.tensor([n for f in frames for n in f], dtype=torch.long)
            out["video_row"] = torch.tensor([r for f, r in zip(frames, rows) for _ in f], dtype=torch.long)
        for keys in (_VIDEO_KEYS, _IMAGE_KEYS):
            chosen = [i for i in order if keys[0] in samples[i]]
            if chosen:
                out.update({key: torch.cat([samples[i][key] for i in chosen]) for key in keys})
        return out


def _video_groups(sample: Mapping[str, Any]) -> list[int]:
    """Temporal groups of each video of a sample (``video_num_frames``: 0, one count, or a list)."""
    frames = sample.get("video_num_frames", 0)
    if isinstance(frames, (list, tuple)):
        return [int(n) for n in frames]
    return [int(frames)] if int(frames) else []


def qwen_processing(model_config: Any, dataset_config: DatasetConfig) -> QwenVideoProcessing:
    """The family's video and image processing (image bounds from the checkpoint folder of ``model_config``)
    with ``dataset_config``'s ``video_*_pixels`` overrides."""
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
