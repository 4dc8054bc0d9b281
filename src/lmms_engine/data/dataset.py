"""Video SFT dataset: LLaVA / OpenAI-style records -> token ids, labels and normalised frames.

``build_dataset(dataset_config, tokenizer, processor_info)`` opens the data sources (a file, a list of
files or a mixture: ``lmms_engine.data.sources``) and indexes their records without parsing them; a record
is parsed and validated (structure, roles, placeholders, that each video file exists) and its video
decoded in ``__getitem__``. Each sample is a dict::

    input_ids            long [L]
    labels               long [L]            (-100 except assistant contents and their end token)
    pixel_values_videos  float [T, 3, S, S]  (only for records with a video)
    video_num_frames     int                 (T, or 0)
    index                int                 (the record actually served, see below)

Bad records (see ``records.BAD_RECORD_REASONS``): with ``on_bad_record: raise`` the first one raises a
:class:`~lmms_engine.data.records.BadRecordError` naming the file, the record index and the reason; with
``skip`` it is counted (``bad_record_report()``, per reason and per source) and logged. A record that
fails in ``__getitem__`` (invalid, a video that does not decode, a sample too long for ``max_length``)
is replaced by the next good record in file order (``i+1, i+2, ...``,
wrapping): the replacement depends only on which records are bad, so it is deterministic, and a
DataLoader worker never dies on one bad file. Failures found in worker processes are recorded in a
shared-memory table, so the report of the main process counts them too.

Video reads have a deadline (``decode_timeout``): a read that blocks (a pipe nobody writes, a stalled
mount) or is too slow is abandoned and the record is replaced as above, counted under
``decode_timeout``; a job never hangs on one file. ``max_bad_fraction`` bounds the records known bad
(failed when loaded; over-long ones are not counted): past it the dataset
raises :class:`BadRecordBudgetError`. ``write_report(path)`` writes the report as JSON with every failed
record's location and video file.

Over-long samples never lose part of their video. ``truncation: turns`` keeps the longest prefix of whole
(user, assistant) exchanges that fits in ``max_length``; ``truncation: drop`` drops any sample longer than
``max_length``. A sample that cannot fit even with one exchange is dropped. Dropped samples are replaced
as above and counted under ``too_long`` whatever ``on_bad_record`` says: over-length is a policy, not
a broken record. ``estimated_lengths()`` gives each record's length from container metadata without
decoding (``lmms_engine.data.lengths``); with ``drop_long_before_loading`` the records it says would be
dropped are left out when the dataset is built (counted under ``too_long``) and never decoded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import torch
from torch.utils.data import Dataset

from lmms_engine.data.chat import EncodedConversation, encode_conversation, video_token_id
from lmms_engine.data.lengths import LengthEstimate, estimate_lengths, kept_length
from lmms_engine.data.preprocess import ProcessorInfo, frames_to_pixel_values
from lmms_engine.data.records import BAD_RECORD_REASONS, BadRecordError, ConversationRecord, DataFileError, Medium, Turn
from lmms_engine.data.sources import LazyRecords, SourceConfig, open_sources, resolve_sources
from lmms_engine.utils.config import ConfigError, from_mapping
from lmms_engine.video.sampling import SamplingSpec

logger = logging.getLogger(__name__)

_REASONS: tuple[str, ...] = tuple(BAD_RECORD_REASONS)
_MAX_EXAMPLES = 3


@dataclass
class DatasetConfig:
    """The ``dataset_config`` block.

    Attributes:
        data_path: training records: a record file (JSON list, JSONL, Parquet, Arrow, or a ``datasets``
            folder) of LLaVA or OpenAI-style records, a list of record files, or a LLaVA-NeXT mixture
            file (YAML/JSON ``datasets: [{json_path, sampling_strategy, video_folder, image_folder}]``);
            see ``lmms_engine.data.sources`` and docs/data.md. Records are read lazily.
        eval_data_path: held-out records in the same forms (``build_dataset(..., split="eval")``).
        video_folder: folder that relative video paths start from; default: each data file's folder (a
            mixture entry's own ``video_folder`` wins). Absolute video paths are read where they point,
            and ``..`` parts may lead out of the folder (LLaVA data often does this); set
            ``videos_inside_folder`` to refuse both.
        image_folder: the same for image paths.
        sampling_seed: seed of the mixtures' ``random:`` sampling strategies (source k draws with
            ``sampling_seed + k``): the same seed always selects the same records.
        check_records: ``on_load`` (records are parsed and validated when first loaded: start-up does
            not depend on the data size) or ``at_start`` (every record is parsed and validated when the
            dataset is built, before training: with ``on_bad_record: raise`` the first bad one stops
            the run there; with ``skip`` they are reported at once and never loaded).
        max_frames: frames sampled per video (uniformly, or the cap when ``fps`` is set).
        fps: sample at this many frames per second (capped at ``max_frames``); None = uniform.
        force_sample: with ``fps``: always exactly ``max_frames`` frames, spread uniformly (LLaVA-NeXT).
        add_time_instruction: insert LLaVA-Video's "The video lasts for X seconds, and N frames are
            uniformly sampled from it. These frames are located at ..." after the video placeholder
            (records with one video and no image; Qwen-VL: after the video part).
        max_length: longest token sequence (video and image tokens included); None = no limit. Visual
            tokens are never cut: a sample whose kept turns would not hold all of them is dropped.
        max_visual_tokens: most video + image tokens per sample; None = no limit. Rule: images keep their
            tokens; the videos' frame caps (``max_frames`` each) are lowered one frame at a time, always
            from the video allowed the most frames (the last of equals), until the total fits; a sample
            that does not fit with one frame per video is dropped as ``too_long``. Applied before
            decoding, so only the frames that fit are read; length estimates use the same caps. Qwen-VL:
            a video's tokens at a cap are those of its grid (the frames sampled with that cap, at its coded
            size).
        max_image_pixels: images larger than this many pixels are scaled down (aspect ratio kept, sides
            floored) before tiling, so they get fewer tiles and tokens; None = no limit. (Video frames are
            always resized to the vision tower's square input.) Qwen-VL: the upper bound of the image's
            ``smart_resize`` (with the checkpoint's image bounds).
        truncation: ``turns`` (keep whole leading exchanges that fit) or ``drop`` (drop over-long samples).
        padding_side: ``right`` or ``left``, used by the collator.
        on_bad_record: ``raise`` on the first bad record, or ``skip`` it and count it.
        decode_threads: cores per video read (parallel keyframe intervals, then FFmpeg frame threads);
            0 = auto: the cores divided among the DataLoader workers (1 each when workers >= cores).
        decode_timeout: seconds one video read may take; null = no limit. A read that blocks (a pipe
            nobody writes, a stalled network mount) or runs longer is abandoned and the record replaced
            and counted under ``decode_timeout``, so one file never hangs the job. Also bounds each
            metadata probe of ``drop_long_before_loading``.
        max_bad_fraction: most records known bad, as a fraction of the data file's records, before
            training stops with an error naming the count and the report; null = no limit. Counted:
            records that fail when loaded (invalid records, broken video,
            decode timeout); over-long records (``too_long``) are a length policy and are not counted.
        drop_long_before_loading: with ``max_length`` set, estimate each record's length from its
            video's container metadata (frame count, duration; no decoding) when the dataset is built,
            and leave out the records that would be dropped as too long (``truncation: drop`` and
            longer than ``max_length``, or not even the first exchange fits), counted under
            ``too_long``; they are never decoded. Probing costs a container open per video.
        videos_inside_folder: a record whose video path leads outside its video folder (absolute, or
            climbing out through ``..``; judged on the path as written, symlinks inside are followed) is
            a bad record (``video_outside_folder``), skipped or raised as ``on_bad_record`` says.
        packing: pack several samples into each row of a batch (position ids restart per sample, no
            attention across samples; the loss equals the unpacked batch's).
        packing_length: longest packed row in tokens; None = ``max_length`` (required when that is None).
        video_min_pixels, video_max_pixels, video_total_pixels: Qwen-VL checkpoints only: per-frame area
            bounds and the whole video's area budget in pixels (``smart_resize``,
            :mod:`lmms_engine.data.qwen_vision`); None = qwen-vl-utils' defaults: 128 and 768 LLM tokens'
            worth of pixels per frame (``128 * 28 * 28`` and ``768 * 28 * 28`` for Qwen2.5-VL, factor 32 for
            Qwen3-VL), 0.9 x 128000 tokens' worth in total. For Qwen-VL, ``fps: null`` samples at Qwen's
            2 fps (capped at ``max_frames``).
    """

    data_path: str | list[str]
    eval_data_path: str | list[str] | None = None
    video_folder: str | None = None
    image_folder: str | None = None
    sampling_seed: int = 0
    check_records: Literal["on_load", "at_start"] = "on_load"
    max_visual_tokens: int | None = None
    max_image_pixels: int | None = None
    max_frames: int = 8
    fps: float | None = None
    force_sample: bool = False
    add_time_instruction: bool = False
    max_length: int | None = 2048
    truncation: Literal["turns", "drop"] = "turns"
    padding_side: Literal["right", "left"] = "right"
    on_bad_record: Literal["raise", "skip"] = "raise"
    decode_threads: int = 0
    decode_timeout: float | None = 120.0
    max_bad_fraction: float | None = None
    drop_long_before_loading: bool = False
    packing: bool = False
    packing_length: int | None = None
    video_min_pixels: int | None = None
    video_max_pixels: int | None = None
    video_total_pixels: int | None = None
    videos_inside_folder: bool = False

    def __post_init__(self) -> None:
        if not self.data_path:
            raise ValueError("data_path must name a record file, a list of record files or a mixture file")
        if self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {self.max_frames}")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"fps must be > 0 or null, got {self.fps}")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be >= 1 or null, got {self.max_length}")
        if self.decode_threads < 0:
            raise ValueError(f"decode_threads must be >= 0 (0 = auto), got {self.decode_threads}")
        if self.decode_timeout is not None and not self.decode_timeout > 0:
            raise ValueError(f"decode_timeout must be a number of seconds > 0, or null for no limit, "
                             f"got {self.decode_timeout}")
        if self.max_bad_fraction is not None and not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction must be between 0 and 1 (a fraction of the records), or null "
                             f"for no limit, got {self.max_bad_fraction}")
        for key in ("max_visual_tokens", "max_image_pixels"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{key} must be >= 1 or null (no limit), got {value}")
        if self.packing_length is not None and self.packing_length < 1:
            raise ValueError(f"packing_length must be >= 1 or null, got {self.packing_length}")
        if self.packing and self.packing_length is None and self.max_length is None:
            raise ValueError("packing needs a row length: set packing_length or max_length")
        for name in ("video_min_pixels", "video_max_pixels", "video_total_pixels"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a number of pixels >= 1 or null, got {value}")

    def check_files(self, where: str = "dataset_config", generated: set[Path] | None = None,
                    keys: Sequence[str] = ("data_path", "eval_data_path"),
                    named: Mapping[str, str] | None = None) -> dict[str, list[SourceConfig]]:
        """The one check that the folders and record files of this block exist (the launcher's config
        check and :func:`open_records`); returns the sources of each of ``keys`` that is set (every file
        of a list or mixture checked, mixture entries resolved; no record read).

        ``generated``: paths an earlier pipeline block writes (a ``demo_data`` block), present though not
        yet there; their sources are not returned. ``named``: where a key was given, when not at
        ``where.key`` (the evaluate block's ``data_path`` is its ``eval_data_path``). Raises
        :class:`~lmms_engine.utils.config.ConfigError` naming ``where.key`` and the path.
        """
        made = generated or set()
        for key in ("video_folder", "image_folder"):
            folder = getattr(self, key)
            if folder is not None and Path(folder).resolve() not in made and not Path(folder).is_dir():
                raise ConfigError(f"{where}.{key}: folder {folder!r} does not exist")
        found: dict[str, list[SourceConfig]] = {}
        for key in keys:
            value = getattr(self, key)
            if value is None:
                continue
            at = (named or {}).get(key, f"{where}.{key}")
            values = [value] if isinstance(value, str) else list(value)
            pending = [v for v in values if Path(v).expanduser().resolve() not in made]
            if isinstance(value, str) and pending and not Path(value).expanduser().exists():
                hint = " (a demo_data block earlier in the list would generate one)" \
                    if key == "data_path" and generated is not None else ""
                raise ConfigError(f"{at}: file {value!r} does not exist{hint}")
            found[key] = resolve_sources(value if isinstance(value, str) else pending, video_folder=self.video_folder,
                                         image_folder=self.image_folder, where=at) if pending else []
        return found


@dataclass
class BadRecordReport:
    """Bad records of one dataset: ``counts[reason]``, up to three example messages per reason, and
    ``records``: every failed record as ``{"reason", "where" (file: record i (line n)), "video" (its file,
    or None when unknown), "source" (its source's name), "message"}``, records left out before loading
    first, then by record. ``sources``: per source ``{"name", "path", "data_type", "sampling_strategy",
    "records_in_file", "selected" (records the sampling strategy gave), "skipped" (bad records found so
    far), "skipped_by_reason"}``."""

    source: str
    num_records: int
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    sources: list[dict[str, Any]] = field(default_factory=list)

    @property
    def num_bad(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-ready data (what ``VideoSFTDataset.write_report`` writes)."""
        return {"source": self.source, "num_records": self.num_records, "num_bad": self.num_bad,
                "counts": dict(sorted(self.counts.items())),
                "reasons": {reason: BAD_RECORD_REASONS[reason] for reason in sorted(self.counts)},
                "sources": [dict(entry) for entry in self.sources],
                "records": [dict(entry) for entry in self.records]}

    def __str__(self) -> str:
        if not self.num_bad:
            lines = [f"{self.source}: no bad records among {self.num_records}"]
        else:
            lines = [f"{self.source}: {self.num_bad} bad record(s) among {self.num_records}, skipped:"]
        for reason, count in sorted(self.counts.items()):
            lines.append(f"  {reason}: {count} ({BAD_RECORD_REASONS[reason]})")
            lines.extend(f"    e.g. {example}" for example in self.examples.get(reason, []))
        if len(self.sources) > 1 or any(s["selected"] != s["records_in_file"] for s in self.sources):
            for entry in self.sources:
                lines.append(f"  source {entry['name']}: {entry['selected']} of {entry['records_in_file']} records "
                             f"({entry['sampling_strategy']}), {entry['skipped']} skipped")
        return "\n".join(lines)


class BadRecordBudgetError(RuntimeError):
    """More records are bad than ``dataset_config.max_bad_fraction`` allows."""


class _SampleFailure(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def capped_size(height: int, width: int, max_pixels: int | None) -> tuple[int, int]:
    """``(height, width)`` scaled down, aspect ratio kept, so that ``height * width <= max_pixels``
    (sides floored, at least 1); unchanged without a cap or when already within it."""
    if max_pixels is None or height * width <= max_pixels:
        return height, width
    scale = math.sqrt(max_pixels / (height * width))
    return max(1, math.floor(height * scale)), max(1, math.floor(width * scale))


def fit_frames(caps: Sequence[int], budget: int, tokens_of: Any) -> list[int] | None:
    """Frame caps lowered until the videos' tokens fit ``budget``: while over it, the video allowed the most
    frames (the last of equals) loses one; None when even one frame per video does not fit.
    ``tokens_of(n)``: tokens of a video of ``n`` frames, or a sequence of such functions, one per video
    (Qwen-VL: a video's tokens depend on its own frame size)."""
    caps = list(caps)
    counts = list(tokens_of) if isinstance(tokens_of, (list, tuple)) else [tokens_of] * len(caps)
    while sum(count(n) for count, n in zip(counts, caps)) > budget:
        k = max(range(len(caps)), key=lambda i: (caps[i], i))
        if caps[k] <= 1:
            return None
        caps[k] -= 1
    return caps


def time_instruction(duration: float, timestamps: list[float]) -> str:
    """LLaVA-Video's time instruction for a clip of ``duration`` seconds sampled at ``timestamps``."""
    located = ",".join(f"{t:.2f}s" for t in timestamps)
    return (f"The video lasts for {duration:.2f} seconds, and {len(timestamps)} frames are uniformly sampled "
            f"from it. These frames are located at {located}. Please answer the following questions related "
            "to this video.")


class VideoSFTDataset(Dataset):
    """Samples for supervised fine-tuning (module docstring). Build it with :func:`build_dataset`.

    ``records``: the :class:`~lmms_engine.data.sources.LazyRecords` of the data sources; a record is
    parsed and validated when it is loaded (a bad one is replaced as the module docstring says).
    """

    def __init__(
        self,
        records: LazyRecords,
        config: DatasetConfig,
        tokenizer: Any,
        processor_info: ProcessorInfo,
        *,
        source: str,
    ) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. '<|endoftext|>')")
        self.records = records
        self.config = config
        self.tokenizer = tokenizer
        self.processor_info = processor_info
        self.source = source
        self.num_raw_records = len(records)
        self.video_token_id = video_token_id(tokenizer, processor_info.video_token)
        # Records left out before loading (as too long by estimate): report entries.
        self._left_out: list[dict[str, Any]] = []
        # One byte per record: 0 = not known bad, k = failed with reason _REASONS[k-1]. Shared memory, so
        # DataLoader workers' findings reach the main process and later epochs skip known-bad records fast.
        self._failed = torch.zeros(len(records), dtype=torch.uint8).share_memory_()
        self._failure_messages: dict[int, str] = {}
        self._loader: Any = None
        self._length_estimates: list[LengthEstimate] | None = None
        if config.check_records == "at_start":
            self._check_all_records()
        self._check_bad_budget()
        if config.drop_long_before_loading and config.max_length is not None:
            self._drop_long_records()

    def __len__(self) -> int:
        return len(self.records)

    @property
    def loader(self) -> Any:
        """The frame loader (created on first use, once per process)."""
        if self._loader is None:
            from lmms_engine.models.video_frame_utils import MultiScaleVideoFrameLoader

            self._loader = MultiScaleVideoFrameLoader(num_threads=self.config.decode_threads)
        return self._loader

    @property
    def record_video_token(self) -> str:
        """The video tag of the records (where the time instruction goes)."""
        return self.processor_info.video_token

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_loader"] = None
        return state

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.records)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} records")
        index %= n
        for offset in range(n):
            j = (index + offset) % n
            if self._failed[j]:
                continue
            try:
                return self._load(j)
            except _SampleFailure as failure:
                where = self.records.location(j)
                message = f"{where}: {failure}"
                # Recorded also when it stops the run: the report written then lists it (the table is
                # shared memory, so this holds when a DataLoader worker found it too).
                self._failed[j] = _REASONS.index(failure.reason) + 1
                self._failure_messages[j] = message
                if self.config.on_bad_record == "raise" and failure.reason != "too_long":
                    raise BadRecordError(failure.reason, where, str(failure)) from failure
                logger.warning("skipping %s [%s]", message, failure.reason)
                if failure.reason != "too_long":
                    self._check_bad_budget()
        raise RuntimeError(f"{self.source}: every one of the {n} records failed to load; "
                           f"see bad_record_report():\n{self.bad_record_report()}")

    def generation_sample(self, index: int) -> dict[str, Any]:
        """Record ``index`` as a generation prompt, for evaluation: the conversation without its last
        assistant turn, ending with the assistant header; ``reference`` holds that turn's text and
        ``metadata`` the record's metadata keys. No truncation, no replacement: a failure raises
        :class:`BadRecordError`."""
        try:
            return self._load(index, generation=True)
        except _SampleFailure as failure:
            raise BadRecordError(failure.reason, self.records.location(index), str(failure)) from failure

    def sampling_spec(self, record: ConversationRecord, video: Medium | None = None,
                      max_frames: int | None = None) -> SamplingSpec:
        """The frame sampling of ``video`` (default: the record's first): the config's rule within the
        video's time range, at most ``max_frames`` frames (default ``config.max_frames``)."""
        video = video if video is not None else record.videos[0]
        return SamplingSpec(max_frames=max_frames or self.config.max_frames, fps=self.config.fps,
                            force_sample=self.config.force_sample, start_time=video.start, end_time=video.end)

    def image_sizes(self, record: ConversationRecord) -> list[tuple[int, int]]:
        """``(height, width)`` each image of ``record`` is processed at (from the file headers, after the
        ``max_image_pixels`` cap), without decoding pixels; an unreadable image raises ``_SampleFailure``."""
        from lmms_engine.data.images import ImageReadError, image_size

        sizes = []
        for medium in record.images:
            try:
                sizes.append(self._processed_image_size(*image_size(medium.path)))
            except ImageReadError as err:
                raise _SampleFailure("broken_image", str(err)) from err
        return sizes

    def _processed_image_size(self, height: int, width: int) -> tuple[int, int]:
        """The size an image of ``height x width`` is processed at (before tiling): ``max_image_pixels``'s cap."""
        return capped_size(height, width, self.config.max_image_pixels)

    def _image_tokens(self, image_sizes: Sequence[tuple[int, int]]) -> int:
        """Tokens of a record's images at their processed sizes (one image is tiled, several are not)."""
        info, tiled = self.processor_info, len(image_sizes) == 1
        return sum(info.image_token_count(h, w, tiled) for h, w in image_sizes)

    def _video_token_counts(self, record: ConversationRecord) -> list[Any]:
        """Per video of ``record``, ``n -> tokens`` of that video with a cap of ``n`` frames."""
        return [self.processor_info.video_token_count] * len(record.videos)

    def frame_caps(self, record: ConversationRecord, image_sizes: Sequence[tuple[int, int]]) -> list[int]:
        """Most frames each video of ``record`` may yield: ``max_frames``, lowered to fit
        ``max_visual_tokens`` (:func:`fit_frames`); an over-budget record raises ``_SampleFailure``."""
        caps = [self.config.max_frames] * len(record.videos)
        budget = self.config.max_visual_tokens
        if budget is None:
            return caps
        image_tokens = self._image_tokens(image_sizes)
        fitted = fit_frames(caps, budget - image_tokens, self._video_token_counts(record)) if caps else \
            (caps if image_tokens <= budget else None)
        if fitted is None:
            raise _SampleFailure("too_long", f"its {len(image_sizes)} image(s) ({image_tokens} tokens) and "
                                             f"{len(caps)} video(s) at one frame each do not fit "
                                             f"max_visual_tokens={budget}")
        return fitted

    def estimate_encoding(self, record: ConversationRecord, videos: Sequence[Any],
                          image_sizes: Sequence[tuple[int, int]]) -> EncodedConversation:
        """``record`` tokenized as loading would, from metadata (:func:`~lmms_engine.data.lengths.estimate_lengths`):
        ``videos`` holds per video its :class:`~lmms_engine.data.lengths.SampledVideo` (the probe and the
        sampled frame indices, or None when it could not be probed: its cap is assumed)."""
        frames = [len(v.indices) if v.indices is not None else v.spec.max_frames for v in videos]
        duration, stamps = 0.0, []
        if videos:
            first = videos[0]
            if first.indices is not None:
                duration, stamps = first.probe.duration, [first.probe.timestamps[i] for i in first.indices]
            else:
                stamps = [0.0] * first.spec.max_frames
        return self.encode_record(record, num_frames=frames, duration=duration, timestamps=stamps,
                                  image_sizes=image_sizes)

    def encode_record(self, record: ConversationRecord, *, num_frames: int | Sequence[int] = 0, duration: float = 0.0,
                      timestamps: Sequence[float] = (), generation: bool = False,
                      image_sizes: Sequence[tuple[int, int]] = ()) -> EncodedConversation:
        """Tokenize ``record`` as samples are tokenized, before truncation.

        ``num_frames``: frames each video yields (one number for a single video, else one per video);
        ``image_sizes``: ``(height, width)`` of each image as processed (:meth:`image_sizes`);
        ``timestamps`` (seconds since the video's first frame, one per frame) and ``duration`` (seconds)
        matter only with ``add_time_instruction`` (records with one video). ``generation``: drop the last
        assistant turn and end with the assistant header (evaluation prompts).
        """
        info = self.processor_info
        turns = list(record.turns[:-1] if generation else record.turns)
        frames = [num_frames] if isinstance(num_frames, int) else list(num_frames)
        frames = frames if len(frames) == len(record.videos) else frames[:1] * len(record.videos)
        videos, images = iter(frames), iter(image_sizes)
        tiled = len(record.images) == 1
        media = []
        for medium in record.media:
            if medium.kind == "video":
                media.append((info.video_token, info.video_token_count(next(videos))))
            else:
                height, width = next(images)
                media.append((info.image_token, info.image_token_count(height, width, tiled)))
        if len(record.videos) == 1 and not record.images and self.config.add_time_instruction:
            turns = self._with_time_instruction(turns, record, duration, timestamps)
        return encode_conversation(turns, self.tokenizer, video_token=info.video_token, media=media,
                                   add_generation_prompt=generation)

    def record(self, j: int) -> ConversationRecord:
        """Record ``j``, parsed and validated; a bad one raises :class:`_SampleFailure` (its reason)."""
        try:
            return self.records[j]
        except BadRecordError as err:
            raise _SampleFailure(err.reason, err.detail) from err

    def _load(self, j: int, generation: bool = False) -> dict[str, Any]:
        """Record ``j`` as a sample: its media loaded (:meth:`_load_media`), tokenized, truncated."""
        record = self.record(j)
        visual, encoding = self._load_media(record)
        encoded = self.encode_record(record, generation=generation, **encoding)
        input_ids, labels = encoded.input_ids, encoded.labels
        if not generation:
            keep = kept_length(len(input_ids), encoded.turn_ends, self.config.max_length, self.config.truncation)
            visual_end = max((end for _, end in encoded.media_spans), default=0)
            if keep is None or keep < visual_end:
                count = sum(end - start for start, end in encoded.media_spans)
                raise _SampleFailure("too_long", f"{len(input_ids)} tokens > max_length={self.config.max_length} "
                                                 f"(truncation={self.config.truncation!r}, visual tokens: {count}; "
                                                 "visual tokens are never cut)")
            input_ids, labels = input_ids[:keep], labels[:keep]
        sample: dict[str, Any] = {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "video_num_frames": 0,
            "index": j,
            **visual,
        }
        if generation:
            sample["reference"] = record.turns[-1].text
            sample["metadata"] = dict(record.metadata)
        return sample

    def _load_media(self, record: ConversationRecord) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(sample entries of the record's videos and images, keyword arguments of encode_record)``."""
        info = self.processor_info
        sizes = self.image_sizes(record)
        caps = self.frame_caps(record, sizes)
        videos = []
        duration, stamps = 0.0, []
        for medium, cap in zip(record.videos, caps):
            video = self._decode(record, medium, cap)
            videos.append(frames_to_pixel_values(video.frames, info.image_size, info.image_mean, info.image_std))
            if len(videos) == 1:
                duration, stamps = float(video.duration), video.timestamps
        images = self._load_images(record)
        visual: dict[str, Any] = {}
        if len(videos) == 1:
            visual["pixel_values_videos"] = videos[0]
            visual["video_num_frames"] = int(videos[0].shape[0])
        elif videos:
            visual["pixel_values_videos"] = videos
            visual["video_num_frames"] = [int(v.shape[0]) for v in videos]
        if images:
            visual["pixel_values"] = [pixels for pixels, _ in images]
            visual["image_sizes"] = [size for _, size in images]
        encoding = {"num_frames": [int(v.shape[0]) for v in videos], "duration": duration, "timestamps": stamps,
                    "image_sizes": [s for _, s in images]}
        return visual, encoding

    def _load_images(self, record: ConversationRecord) -> list[tuple[torch.Tensor, tuple[int, int]]]:
        from lmms_engine.data.images import ImageReadError, images_to_pixel_values, load_image

        if not record.images:
            return []
        info = self.processor_info
        try:
            loaded = [load_image(m.path) for m in record.images]
        except ImageReadError as err:
            raise _SampleFailure("broken_image", str(err)) from err
        resized = []
        for image in loaded:
            height, width = self._processed_image_size(image.height, image.width)
            resized.append(image if (height, width) == (image.height, image.width) else
                           image.resize((width, height), resample=3))  # bicubic, as the processor resizes
        return images_to_pixel_values(resized, image_size=info.image_size, mean=info.image_mean, std=info.image_std,
                                      grid_pinpoints=info.image_grid_pinpoints)

    def _decode_size(self) -> tuple[int, int] | None:
        """Frame size the decoder resizes to (the tower's square input); None = native size."""
        size = self.processor_info.image_size
        return size, size

    def _decode(self, record: ConversationRecord, video: Medium | None = None, max_frames: int | None = None) -> Any:
        from lmms_engine.video.decode import DecodeTimeout, VideoReadError

        video = video if video is not None else record.videos[0]
        try:
            return self.loader.load_video(video.path, **dataclasses.asdict(self.sampling_spec(record, video, max_frames)),
                                          target_size=self._decode_size(), timeout=self.config.decode_timeout)
        except DecodeTimeout as err:
            raise _SampleFailure("decode_timeout", f"{err} (dataset_config.decode_timeout="
                                                   f"{self.config.decode_timeout:g})") from err
        except VideoReadError as err:
            raise _SampleFailure("broken_video", str(err)) from err
        except Exception as err:  # noqa: BLE001 - any decoder failure on one file must not kill a worker
            raise _SampleFailure("broken_video", f"{video.path}: {type(err).__name__}: {err}") from err

    def _with_time_instruction(self, turns: list[Turn], record: ConversationRecord, duration: float,
                               timestamps: Sequence[float]) -> list[Turn]:
        start = record.video_start or 0.0
        end = record.video_end if record.video_end is not None else float(duration)
        stamps = [float(t) - start for t in timestamps]
        token = self.record_video_token
        first_user = next(i for i, t in enumerate(turns) if t.role == "user")
        rest = turns[first_user].text[len(token):].lstrip("\n")
        text = f"{token}\n{time_instruction(max(end - start, 0.0), stamps)}" + (f"\n{rest}" if rest else "")
        return turns[:first_user] + [Turn("user", text)] + turns[first_user + 1:]

    def length_estimates(self) -> list[LengthEstimate]:
        """Each record's :class:`~lmms_engine.data.lengths.LengthEstimate` (full length, exchange ends,
        frames, video tokens), from container metadata without decoding; computed once, then cached."""
        if self._length_estimates is None:
            self._length_estimates = estimate_lengths(self)
        return self._length_estimates

    def estimated_lengths(self) -> list[int]:
        """Each record's sample length in tokens as served (after ``truncation: turns``), estimated
        without decoding (``lmms_engine.data.lengths``), for length-grouped batching. A record that
        loading would drop as too long keeps its full length (it is served as another record)."""
        config = self.config
        out = []
        for estimate in self.length_estimates():
            served = estimate.served_length(config.max_length, config.truncation)
            out.append(estimate.length if served is None else served)
        return out

    def _drop_long_records(self) -> None:
        """Leave out the records whose estimate says loading would drop them as too long."""
        config = self.config
        estimates = self.length_estimates()
        keep: list[int] = []
        for j, estimate in enumerate(estimates):
            # An estimate without a probe is only a bound: such records are loaded, and judged then.
            if estimate.exact and estimate.served_length(config.max_length, config.truncation) is None:
                record = self.records[j]
                detail = (f"estimated {estimate.length} tokens > max_length={config.max_length} (truncation="
                          f"{config.truncation!r}, first exchange ends at {estimate.turn_ends[0]} tokens, video "
                          f"tokens: {estimate.video_tokens}); left out before loading")
                self._left_out.append({"reason": "too_long", "where": record.where, "video": record.video,
                                       "source": self._source_name(j), "message": f"{record.where}: {detail}"})
                logger.info("leaving out %s: %s", record.where, detail)
            else:
                keep.append(j)
        dropped = len(self.records) - len(keep)
        if dropped:
            logger.warning("%s: %d record(s) longer than max_length=%d left out before loading (estimated from "
                           "video metadata; see bad_record_report())", self.source, dropped, config.max_length)
        if not keep:
            raise ValueError(f"{self.source}: every record is longer than max_length={config.max_length} "
                             f"(estimated); raise max_length or use truncation: turns")
        self.records = self.records.subset(keep)
        self._length_estimates = [estimates[j] for j in keep]
        self._failed = torch.zeros(len(self.records), dtype=torch.uint8).share_memory_()

    def _check_all_records(self) -> None:
        """Parse and validate every record now; bad ones raise or are marked failed (never loaded)."""
        from tqdm.auto import tqdm

        show = len(self.records) >= 10_000
        for j in tqdm(range(len(self.records)), desc="checking records", disable=not show, unit="record"):
            try:
                self.records[j]
            except BadRecordError as err:
                if self.config.on_bad_record == "raise":
                    raise
                self._failed[j] = _REASONS.index(err.reason) + 1
                self._failure_messages[j] = str(err)
                logger.warning("skipping %s", err)

    def _num_broken(self) -> int:
        """Records known bad, over-long ones excepted (what ``max_bad_fraction`` bounds)."""
        too_long = _REASONS.index("too_long") + 1
        left_out = sum(entry["reason"] != "too_long" for entry in self._left_out)
        return left_out + int(((self._failed != 0) & (self._failed != too_long)).sum())

    def _check_bad_budget(self) -> None:
        limit = self.config.max_bad_fraction
        if limit is None:
            return
        bad = self._num_broken()
        fraction = bad / max(self.num_raw_records, 1)
        if fraction > limit:
            raise BadRecordBudgetError(
                f"{self.source}: {bad} of {self.num_raw_records} records are bad ({fraction:.2%}), more than "
                f"dataset_config.max_bad_fraction={limit:g} allows; fix or remove them, or raise "
                f"max_bad_fraction (null = no limit). Report:\n{self.bad_record_report()}")

    def bad_record_report(self) -> BadRecordReport:
        """Counts by reason (records left out as too long by estimate, plus records that
        failed when loaded, in this process or in DataLoader workers), example messages, and every
        failed record's location and video."""
        entries = list(self._left_out)
        for j in torch.nonzero(self._failed).flatten().tolist():
            reason = _REASONS[int(self._failed[j]) - 1]
            where = self.records.location(j)
            try:
                video = self.records[j].video
            except BadRecordError:
                video = None
            default = f"{where}: {BAD_RECORD_REASONS[reason]} (details in the worker's log)"
            entries.append({"reason": reason, "where": where, "video": video, "source": self._source_name(j),
                            "message": self._failure_messages.get(j, default)})
        counts: Counter[str] = Counter()
        examples: dict[str, list[str]] = {}
        for entry in entries:
            counts[entry["reason"]] += 1
            shown = examples.setdefault(entry["reason"], [])
            if len(shown) < _MAX_EXAMPLES:
                shown.append(entry["message"])
        return BadRecordReport(self.source, self.num_raw_records, dict(counts), examples, entries,
                               self._source_entries(entries))

    def _source_name(self, j: int) -> str:
        return self.records.mixed.sources[self.records.source_of(j)].name

    def _source_entries(self, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for stats in self.records.mixed.stats():
            skipped = Counter(e["reason"] for e in entries if e.get("source") == stats.name)
            out.append({**dataclasses.asdict(stats), "skipped": sum(skipped.values()),
                        "skipped_by_reason": dict(sorted(skipped.items()))})
        return out

    def write_report(self, path: str | Path) -> Path:
        """Write :meth:`bad_record_report` as JSON to ``path`` (folders created); return the path.

        Keys: ``source``, ``num_records``, ``num_bad``, ``counts`` (per reason), ``reasons`` (what each
        reason means) and ``records`` (every failed record: ``reason``, ``where``, ``video``, ``message``).
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.bad_record_report().to_dict(), indent=2) + "\n"
        # Written beside it, then renamed: a failed write (a full disk) never leaves a truncated report.
        staged = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            staged.write_text(text, encoding="utf-8")
            os.replace(staged, path)
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        return path


def load_records(
    path: str | Path,
    *,
    video_folder: str | Path | None = None,
    video_token: str = "<video>",
    on_bad_record: Literal["raise", "skip"] = "raise",
) -> tuple[list[ConversationRecord], int, list[tuple[str, str]]]:
    """Read and validate every record of the file ``path`` (for tools and tests; the dataset reads lazily).

    Returns ``(records, number of raw records, [(reason, message) of each bad record])``; with
    ``on_bad_record="raise"`` the first bad record raises :class:`BadRecordError` instead.
    """
    source = SourceConfig(str(path), video_folder=None if video_folder is None else str(video_folder))
    lazy = LazyRecords(open_sources([source]), video_token=video_token)
    records, failures = [], []
    for j in range(len(lazy)):
        try:
            records.append(lazy[j])
        except BadRecordError as err:
            if on_bad_record == "raise":
                raise
            failures.append((err.reason, str(err)))
            logger.warning("skipping %s", err)
    return records, len(lazy), failures


def open_records(config: DatasetConfig, split: Literal["train", "eval"], *, video_token: str = "<video>",
                 image_token: str = "<image>") -> tuple[LazyRecords, str]:
    """The lazy records of ``split`` (``data_path`` or ``eval_data_path``: a file, a list or a mixture) and
    the name reports use; every file and folder checked, no record parsed."""
    if split == "train":
        path, key = config.data_path, "data_path"
    elif split == "eval":
        if config.eval_data_path is None:
            raise ConfigError("dataset_config.eval_data_path is not set; cannot build the eval split")
        path, key = config.eval_data_path, "eval_data_path"
    else:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    sources = config.check_files(keys=(key,))[key]
    mixed = open_sources(sources, seed=config.sampling_seed)
    records = LazyRecords(mixed, video_token=video_token, image_token=image_token,
                          videos_inside_folder=config.videos_inside_folder)
    name = str(path) if isinstance(path, (str, Path)) else ", ".join(s.path for s in sources)
    if not len(records):
        raise DataFileError(f"{name}: no records (the sources hold {sum(len(t) for t in mixed.tables)}, their "
                            "sampling strategies select none)")
    return records, name


def build_dataset(
    dataset_config: DatasetConfig | Mapping[str, Any],
    tokenizer: Any,
    processor_info: ProcessorInfo,
    split: Literal["train", "eval"] = "train",
) -> VideoSFTDataset:
    """Build the dataset of ``split`` (``data_path`` or ``eval_data_path``).

    Args:
        dataset_config: a :class:`DatasetConfig` or the YAML ``dataset_config`` mapping (checked: unknown
            keys and wrong types raise ConfigError).
        tokenizer: a HF tokenizer with a chat template, a pad token and ``processor_info.video_token``.
        processor_info: image size, patch size, mean/std and video-token layout of the model.
    """
    config = dataset_config if isinstance(dataset_config, DatasetConfig) else \
        from_mapping(DatasetConfig, dataset_config, "dataset_config")
    records, name = open_records(config, split, video_token=processor_info.video_token,
                                 image_token=processor_info.image_token)
    return VideoSFTDataset(records, config, tokenizer, processor_info, source=name)


__all__ = ["BadRecordBudgetError", "BadRecordReport", "DatasetConfig", "VideoSFTDataset", "build_dataset",
           "load_records", "open_records", "time_instruction"]
