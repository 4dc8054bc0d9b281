"""Video SFT dataset: LLaVA / OpenAI-style records -> token ids, labels and normalised frames.

``build_dataset(dataset_config, tokenizer, processor_info)`` reads and validates every record up front
(structure, roles, placeholders, that each video file exists); videos are decoded lazily in
``__getitem__``. Each sample is a dict::

    input_ids            long [L]
    labels               long [L]            (-100 except assistant contents and their end token)
    pixel_values_videos  float [T, 3, S, S]  (only for records with a video)
    video_num_frames     int                 (T, or 0)
    index                int                 (the record actually served, see below)

Bad records (see ``records.BAD_RECORD_REASONS``): with ``on_bad_record: raise`` the first one raises a
:class:`~lmms_engine.data.records.BadRecordError` naming the file, the record index and the reason; with
``skip`` it is counted (``bad_record_report()``) and logged. Records found bad while reading the file are
left out of the dataset. A record that fails in ``__getitem__`` (a video that does not decode, a sample
too long for ``max_length``) is replaced by the next good record in file order (``i+1, i+2, ...``,
wrapping): the replacement depends only on which records are bad, so it is deterministic, and a
DataLoader worker never dies on one bad file. Failures found in worker processes are recorded in a
shared-memory table, so the report of the main process counts them too.

Over-long samples never lose part of their video. ``truncation: turns`` keeps the longest prefix of whole
(user, assistant) exchanges that fits in ``max_length``; ``truncation: drop`` drops any sample longer than
``max_length``. A sample that cannot fit even with one exchange is dropped. Dropped samples are replaced
as above and counted under ``too_long`` whatever ``on_bad_record`` says: over-length is a policy, not
a broken record.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
from torch.utils.data import Dataset

from lmms_engine.data.chat import encode_conversation, video_token_id
from lmms_engine.data.preprocess import ProcessorInfo, frames_to_pixel_values
from lmms_engine.data.records import (
    BAD_RECORD_REASONS,
    BadRecordError,
    ConversationRecord,
    Turn,
    iter_raw_records,
    parse_record,
    record_location,
)
from lmms_engine.utils.config import ConfigError, from_mapping

logger = logging.getLogger(__name__)

_REASONS: tuple[str, ...] = tuple(BAD_RECORD_REASONS)
_MAX_EXAMPLES = 3


@dataclass
class DatasetConfig:
    """The ``dataset_config`` block.

    Attributes:
        data_path: training records, a JSON list or JSONL of LLaVA or OpenAI-style records.
        eval_data_path: held-out records in the same format (``build_dataset(..., split="eval")``).
        video_folder: folder that relative video paths start from; default: each data file's folder.
        max_frames: frames sampled per video (uniformly, or the cap when ``fps`` is set).
        fps: sample at this many frames per second (capped at ``max_frames``); None = uniform.
        force_sample: with ``fps``: always exactly ``max_frames`` frames, spread uniformly (LLaVA-NeXT).
        add_time_instruction: insert LLaVA-Video's "The video lasts for X seconds, and N frames are
            uniformly sampled from it. These frames are located at ..." after the video placeholder.
        max_length: longest token sequence (video tokens included); None = no limit.
        truncation: ``turns`` (keep whole leading exchanges that fit) or ``drop`` (drop over-long samples).
        padding_side: ``right`` or ``left``, used by the collator.
        on_bad_record: ``raise`` on the first bad record, or ``skip`` it and count it.
        decode_threads: FFmpeg threads per video decode; 0 = one per core. With several DataLoader
            workers, 1 or 2 avoids oversubscribing the cores.
        packing: pack several samples into each row of a batch (position ids restart per sample, no
            attention across samples; the loss equals the unpacked batch's).
        packing_length: longest packed row in tokens; None = ``max_length`` (required when that is None).
    """

    data_path: str
    eval_data_path: str | None = None
    video_folder: str | None = None
    max_frames: int = 8
    fps: float | None = None
    force_sample: bool = False
    add_time_instruction: bool = False
    max_length: int | None = 2048
    truncation: Literal["turns", "drop"] = "turns"
    padding_side: Literal["right", "left"] = "right"
    on_bad_record: Literal["raise", "skip"] = "raise"
    decode_threads: int = 0
    packing: bool = False
    packing_length: int | None = None

    def __post_init__(self) -> None:
        if not self.data_path:
            raise ValueError("data_path must name a JSON or JSONL file of records")
        if self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {self.max_frames}")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"fps must be > 0 or null, got {self.fps}")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be >= 1 or null, got {self.max_length}")
        if self.decode_threads < 0:
            raise ValueError(f"decode_threads must be >= 0 (0 = one per core), got {self.decode_threads}")
        if self.packing_length is not None and self.packing_length < 1:
            raise ValueError(f"packing_length must be >= 1 or null, got {self.packing_length}")
        if self.packing and self.packing_length is None and self.max_length is None:
            raise ValueError("packing needs a row length: set packing_length or max_length")


@dataclass
class BadRecordReport:
    """Bad records of one dataset: ``counts[reason]`` and up to three example messages per reason."""

    source: str
    num_records: int
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def num_bad(self) -> int:
        return sum(self.counts.values())

    def __str__(self) -> str:
        if not self.num_bad:
            return f"{self.source}: no bad records among {self.num_records}"
        lines = [f"{self.source}: {self.num_bad} bad record(s) among {self.num_records}, skipped:"]
        for reason, count in sorted(self.counts.items()):
            lines.append(f"  {reason}: {count} ({BAD_RECORD_REASONS[reason]})")
            lines.extend(f"    e.g. {example}" for example in self.examples.get(reason, []))
        return "\n".join(lines)


class _SampleFailure(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def time_instruction(duration: float, timestamps: list[float]) -> str:
    """LLaVA-Video's time instruction for a clip of ``duration`` seconds sampled at ``timestamps``."""
    located = ",".join(f"{t:.2f}s" for t in timestamps)
    return (f"The video lasts for {duration:.2f} seconds, and {len(timestamps)} frames are uniformly sampled "
            f"from it. These frames are located at {located}. Please answer the following questions related "
            "to this video.")


class VideoSFTDataset(Dataset):
    """Samples for supervised fine-tuning (module docstring). Build it with :func:`build_dataset`."""

    def __init__(
        self,
        records: list[ConversationRecord],
        config: DatasetConfig,
        tokenizer: Any,
        processor_info: ProcessorInfo,
        *,
        source: str,
        num_raw_records: int,
        parse_failures: list[tuple[str, str]] | None = None,
    ) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. '<|endoftext|>')")
        self.records = records
        self.config = config
        self.tokenizer = tokenizer
        self.processor_info = processor_info
        self.source = source
        self.num_raw_records = num_raw_records
        self.video_token_id = video_token_id(tokenizer, processor_info.video_token)
        self._parse_failures = list(parse_failures or [])
        # One byte per record: 0 = not known bad, k = failed with reason _REASONS[k-1]. Shared memory, so
        # DataLoader workers' findings reach the main process and later epochs skip known-bad records fast.
        self._failed = torch.zeros(len(records), dtype=torch.uint8).share_memory_()
        self._failure_messages: dict[int, str] = {}
        self._loader: Any = None

    def __len__(self) -> int:
        return len(self.records)

    @property
    def loader(self) -> Any:
        """The frame loader (created on first use, once per process)."""
        if self._loader is None:
            from lmms_engine.models.video_frame_utils import MultiScaleVideoFrameLoader

            self._loader = MultiScaleVideoFrameLoader(num_threads=self.config.decode_threads)
        return self._loader

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
                message = f"{self.records[j].where}: {failure}"
                if self.config.on_bad_record == "raise" and failure.reason != "too_long":
                    raise BadRecordError(failure.reason, self.records[j].where, str(failure)) from failure
                self._failed[j] = _REASONS.index(failure.reason) + 1
                self._failure_messages[j] = message
                logger.warning("skipping %s [%s]", message, failure.reason)
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
            raise BadRecordError(failure.reason, self.records[index].where, str(failure)) from failure

    def _load(self, j: int, generation: bool = False) -> dict[str, Any]:
        record = self.records[j]
        info = self.processor_info
        turns = list(record.turns[:-1] if generation else record.turns)
        pixel_values = None
        count = 0
        if record.video is not None:
            video = self._decode(record)
            frames = video.frames
            pixel_values = frames_to_pixel_values(frames, info.image_size, info.image_mean, info.image_std)
            count = info.video_token_count(frames.shape[0])
            if self.config.add_time_instruction:
                turns = self._with_time_instruction(turns, record, video)
        encoded = encode_conversation(turns, self.tokenizer, video_token=info.video_token, video_token_count=count,
                                      add_generation_prompt=generation)
        input_ids, labels = encoded.input_ids, encoded.labels
        limit = self.config.max_length
        if limit is not None and len(input_ids) > limit and not generation:
            keep = max((e for e in encoded.turn_ends if e <= limit), default=0)
            if self.config.truncation == "drop" or keep == 0:
                raise _SampleFailure("too_long", f"{len(input_ids)} tokens > max_length={limit} "
                                                 f"(truncation={self.config.truncation!r}, video tokens: {count})")
            input_ids, labels = input_ids[:keep], labels[:keep]
        sample: dict[str, Any] = {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "video_num_frames": 0 if pixel_values is None else int(pixel_values.shape[0]),
            "index": j,
        }
        if pixel_values is not None:
            sample["pixel_values_videos"] = pixel_values
        if generation:
            sample["reference"] = record.turns[-1].text
            sample["metadata"] = dict(record.metadata)
        return sample

    def _decode(self, record: ConversationRecord) -> Any:
        from lmms_engine.video.decode import VideoReadError

        size = self.processor_info.image_size
        try:
            return self.loader.load_video(
                record.video, max_frames=self.config.max_frames, fps=self.config.fps,
                force_sample=self.config.force_sample, start_time=record.video_start, end_time=record.video_end,
                target_size=(size, size))
        except VideoReadError as err:
            raise _SampleFailure("broken_video", str(err)) from err
        except Exception as err:  # noqa: BLE001 - any decoder failure on one file must not kill a worker
            raise _SampleFailure("broken_video", f"{record.video}: {type(err).__name__}: {err}") from err

    def _with_time_instruction(self, turns: list[Turn], record: ConversationRecord, video: Any) -> list[Turn]:
        start = record.video_start or 0.0
        end = record.video_end if record.video_end is not None else float(video.duration)
        stamps = [float(t) - start for t in video.timestamps]
        token = self.processor_info.video_token
        first_user = next(i for i, t in enumerate(turns) if t.role == "user")
        rest = turns[first_user].text[len(token):].lstrip("\n")
        text = f"{token}\n{time_instruction(max(end - start, 0.0), stamps)}" + (f"\n{rest}" if rest else "")
        return turns[:first_user] + [Turn("user", text)] + turns[first_user + 1:]

    def bad_record_report(self) -> BadRecordReport:
        """Counts by reason (records left out while reading plus records that failed when loaded, in this
        process or in DataLoader workers) and example messages."""
        report = BadRecordReport(self.source, self.num_raw_records)
        counts: Counter[str] = Counter()
        examples: dict[str, list[str]] = {}
        for reason, message in self._parse_failures:
            counts[reason] += 1
            examples.setdefault(reason, [])
            if len(examples[reason]) < _MAX_EXAMPLES:
                examples[reason].append(message)
        for j in torch.nonzero(self._failed).flatten().tolist():
            reason = _REASONS[int(self._failed[j]) - 1]
            counts[reason] += 1
            examples.setdefault(reason, [])
            if len(examples[reason]) < _MAX_EXAMPLES:
                default = f"{self.records[j].where}: {BAD_RECORD_REASONS[reason]} (details in the worker's log)"
                examples[reason].append(self._failure_messages.get(j, default))
        report.counts, report.examples = dict(counts), examples
        return report


def load_records(
    path: str | Path,
    *,
    video_folder: str | Path | None = None,
    video_token: str = "<video>",
    on_bad_record: Literal["raise", "skip"] = "raise",
) -> tuple[list[ConversationRecord], int, list[tuple[str, str]]]:
    """Read and validate every record of ``path``.

    Returns ``(records, number of raw records, [(reason, message) of each record left out])``; with
    ``on_bad_record="raise"`` the first bad record raises :class:`BadRecordError` instead.
    """
    folder = Path(video_folder) if video_folder is not None else Path(path).resolve().parent
    records, failures, total = [], [], 0
    for index, line, obj in iter_raw_records(path):
        total += 1
        where = record_location(path, index, line)
        try:
            records.append(parse_record(obj, where, video_folder=folder, video_token=video_token, index=index))
        except BadRecordError as err:
            if on_bad_record == "raise":
                raise
            failures.append((err.reason, str(err)))
            logger.warning("skipping %s", err)
    return records, total, failures


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
    if split == "train":
        path = config.data_path
    elif split == "eval":
        if config.eval_data_path is None:
            raise ConfigError("dataset_config.eval_data_path is not set; cannot build the eval split")
        path = config.eval_data_path
    else:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if not Path(path).is_file():
        key = "data_path" if split == "train" else "eval_data_path"
        raise ConfigError(f"dataset_config.{key}: file {path!r} does not exist")
    if config.video_folder is not None and not Path(config.video_folder).is_dir():
        raise ConfigError(f"dataset_config.video_folder: folder {config.video_folder!r} does not exist")
    records, total, failures = load_records(path, video_folder=config.video_folder,
                                            video_token=processor_info.video_token,
                                            on_bad_record=config.on_bad_record)
    if not records:
        raise ValueError(f"{path}: no usable records ({total} read, {len(failures)} bad)")
    return VideoSFTDataset(records, config, tokenizer, processor_info, source=str(path),
                           num_raw_records=total, parse_failures=failures)


__all__ = ["BadRecordReport", "DatasetConfig", "VideoSFTDataset", "build_dataset", "load_records",
           "time_instruction"]
