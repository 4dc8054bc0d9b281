"""Token lengths of samples, estimated from container metadata without decoding any frame.

A sample's length is its text tokens plus its video tokens; the video tokens depend only on how many
frames the sampling rule returns, which depends only on the video's frame timestamps. So:

1. Probe each video once (``lmms_engine.video.decode.probe_video``): frame count, rate and duration
   from the container (the stored frame count, else duration x rate; a demux pass over the packets only
   when neither is stored), giving the frames' timestamps.
2. Apply the dataset's sampling rule to those timestamps (``lmms_engine.video.sampling.sample_indices``,
   the rule the decoder applies), at most each video's frame cap (``max_frames`` lowered to fit
   ``max_visual_tokens``: ``VideoSFTDataset.frame_caps``) -> the number of frames ``T`` and their times.
   Images: their sizes from the file headers (after ``max_image_pixels``) give their token counts.
3. Tokenize the record exactly as the dataset does (``VideoSFTDataset.estimate_encoding``: ``encode_record``
   with ``video_token_count(T)`` tokens per video (Qwen-VL: the grid of ``T`` frames at the coded size), the
   images' tokens and, with ``add_time_instruction``, the same instruction text). The capped lengths are
   what length-grouped sampling sorts by.

For constant-rate videos the estimate equals the loaded sample's length. It can differ for
variable-rate videos, for files whose frames fail to decode, and when a video cannot be probed: then
``max_frames`` frames are assumed and the estimate is marked ``exact=False`` (loading will tell).

Used for length-grouped batching (``VideoSFTDataset.estimated_lengths()``) and for dropping over-long
records before any video is decoded (``dataset_config.drop_long_before_loading``).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Literal, Sequence

from lmms_engine.video.sampling import sample_indices

if TYPE_CHECKING:
    from lmms_engine.data.dataset import VideoSFTDataset
    from lmms_engine.video.decode import VideoProbe

logger = logging.getLogger(__name__)

#: Datasets with at least this many records show progress bars while estimating.
PROGRESS_MIN_RECORDS = 1000


def kept_length(length: int, turn_ends: Sequence[int], max_length: int | None,
                truncation: Literal["turns", "drop"]) -> int | None:
    """Tokens a sample of ``length`` tokens keeps under ``max_length``, or None when it is dropped.

    ``turn_ends[k]``: token count at the end of the k-th (user, assistant) exchange. ``truncation:
    turns`` keeps the longest prefix of whole exchanges that fits; ``drop`` drops any over-long sample;
    a sample whose first exchange does not fit is dropped under both.
    """
    if max_length is None or length <= max_length:
        return length
    keep = max((end for end in turn_ends if end <= max_length), default=0)
    if truncation == "drop" or keep == 0:
        return None
    return keep


@dataclass(frozen=True)
class LengthEstimate:
    """Estimated tokens of one record's sample.

    Attributes:
        length: tokens of the whole conversation, video tokens included, before truncation.
        turn_ends: token count at the end of each (user, assistant) exchange; ``turn_ends[0]`` is the
            least a turn-wise truncation can keep.
        num_frames: frames the sampling rule returns (0 for a text-only record).
        num_frames: frames of all its videos together.
        video_tokens: tokens its videos and images expand to.
        exact: False when a video could not be probed (or its time range holds no frame): its frame cap
            was assumed, an upper bound; or when the record is invalid (loading will tell).
        visual_end: tokens up to the end of the last video / image run (a truncation must keep them all).
    """

    length: int
    turn_ends: tuple[int, ...]
    num_frames: int
    video_tokens: int
    exact: bool = True
    visual_end: int = 0

    def served_length(self, max_length: int | None, truncation: Literal["turns", "drop"]) -> int | None:
        """Tokens the served sample keeps (see :func:`kept_length`); None = it is dropped as too long
        (including a truncation that would cut visual tokens)."""
        keep = kept_length(self.length, self.turn_ends, max_length, truncation)
        return None if keep is None or keep < self.visual_end else keep


@dataclass(frozen=True)
class SampledVideo:
    """One video of a record as the length estimate sees it: its sampling ``spec`` (frame cap included),
    its ``probe`` and the frame ``indices`` the sampling rule picks; both None when it could not be probed."""

    spec: Any
    probe: VideoProbe | None
    indices: list[int] | None


def probe_videos(paths: Iterable[str], *, timeout: float | None = None, max_workers: int | None = None,
                 progress: bool = False) -> dict[str, VideoProbe | Exception]:
    """Probe each distinct path once, in a thread pool (probing mostly waits on I/O).

    Returns ``{path: VideoProbe}``, or the exception for a path that could not be probed (unreadable,
    or past ``timeout`` seconds: ``DecodeTimeout``). Each probe has its own deadline thread, so a
    blocked file never holds a pool thread past ``timeout``.
    """
    from tqdm.auto import tqdm

    from lmms_engine.video.decode import probe_video

    unique = list(dict.fromkeys(paths))
    workers = max_workers or min(16, 4 * (os.cpu_count() or 1))

    def probe(path: str) -> VideoProbe | Exception:
        try:
            return probe_video(path, timeout=timeout)
        except Exception as err:  # noqa: BLE001 - one unreadable file must not stop the others
            logger.debug("cannot probe %s: %s", path, err)
            return err

    if not unique:
        return {}
    with ThreadPoolExecutor(max_workers=min(workers, len(unique)), thread_name_prefix="lmms-video-probe") as pool:
        results = list(tqdm(pool.map(probe, unique), total=len(unique), desc="probing videos",
                            disable=not progress, unit="video"))
    return dict(zip(unique, results))


def estimate_lengths(dataset: VideoSFTDataset, *, progress: bool | None = None,
                     max_workers: int | None = None) -> list[LengthEstimate]:
    """One :class:`LengthEstimate` per record of ``dataset`` (module docstring), in record order.

    Videos are probed with the dataset's ``decode_timeout``. ``progress``: show progress bars (None =
    for datasets of at least :data:`PROGRESS_MIN_RECORDS` records).
    """
    from tqdm.auto import tqdm

    from lmms_engine.data.records import BadRecordError

    show = len(dataset.records) >= PROGRESS_MIN_RECORDS if progress is None else progress
    records: list[Any] = []
    for j in tqdm(range(len(dataset.records)), desc="reading records", disable=not show, unit="record"):
        try:
            records.append(dataset.records[j])
        except BadRecordError:
            records.append(None)  # loading reports it and serves another record
    probes = probe_videos((v.path for r in records if r is not None for v in r.videos),
                          timeout=dataset.config.decode_timeout, max_workers=max_workers, progress=show)
    estimates = []
    for record in tqdm(records, desc="estimating token lengths", disable=not show, unit="record"):
        try:
            if record is None:
                raise ValueError("invalid record")
            sizes = dataset.image_sizes(record)
            caps = dataset.frame_caps(record, sizes)
        except Exception:  # noqa: BLE001 - invalid, unreadable image or over budget: loading reports it
            estimates.append(LengthEstimate(0, (0,), 0, 0, exact=False))
            continue
        sampled, exact = [], True
        for video, cap in zip(record.videos, caps):
            spec = dataset.sampling_spec(record, video, cap)
            probe = probes[video.path]
            try:
                if isinstance(probe, Exception):
                    raise probe
                sampled.append(SampledVideo(spec, probe, sample_indices(probe.timestamps, spec)))
            except Exception:  # noqa: BLE001 - unreadable video or empty time range: loading will fail or tell
                sampled.append(SampledVideo(spec, None, None))
                exact = False
        encoded = dataset.estimate_encoding(record, sampled, sizes)
        frames = [len(v.indices) if v.indices is not None else v.spec.max_frames for v in sampled]
        visual = sum(end - start for start, end in encoded.media_spans)
        visual_end = max((end for _, end in encoded.media_spans), default=0)
        estimates.append(LengthEstimate(len(encoded.input_ids), tuple(encoded.turn_ends), sum(frames), visual,
                                        exact, visual_end))
    return estimates


__all__ = ["PROGRESS_MIN_RECORDS", "LengthEstimate", "SampledVideo", "estimate_lengths", "kept_length", "probe_videos"]
