"""Pieces of the mixed-batch and resume tests: records files mixing text-only and video samples, and
a spy on the dataset's sample loader that records what each load decoded (it calls the real loader)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

TEXT_ONLY = {"from": "human", "value": "Which colour is a clear daytime sky? Answer with one word."}


def text_record(answer: str = "blue") -> dict[str, Any]:
    """A valid LLaVA record without a video."""
    return {"conversations": [dict(TEXT_ONLY), {"from": "gpt", "value": answer}]}


def mixed_records(data_dir: Path, pattern: str, out_path: Path) -> Path:
    """A records file following ``pattern`` ("T" = text-only record, "V" = the next demo video record,
    absolute video paths), e.g. ``"TVVT"``."""
    demo = json.loads((data_dir / "train.json").read_text())
    videos: Iterator[dict[str, Any]] = iter(demo)
    records = []
    for kind in pattern:
        if kind == "T":
            records.append(text_record())
        elif kind == "V":
            record = dict(next(videos))
            record["video"] = str(data_dir / record["video"])
            records.append(record)
        else:
            raise ValueError(f"pattern letters are T or V, got {kind!r}")
    out_path.write_text(json.dumps(records))
    return out_path


class LoadSpy:
    """Wraps ``VideoSFTDataset._load`` on the class: every call goes to the real method, and the record
    index and its video path (None for a text-only record) are appended to ``calls``."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str | None]] = []
        self._original: Any = None

    def __enter__(self) -> "LoadSpy":
        from lmms_engine.data.dataset import VideoSFTDataset

        original = VideoSFTDataset._load
        calls = self.calls

        def recording_load(dataset: Any, j: int, generation: bool = False) -> dict[str, Any]:
            video = dataset.records[j].video
            calls.append((j, None if video is None else str(video)))
            return original(dataset, j, generation)

        self._original = original
        VideoSFTDataset._load = recording_load
        return self

    def __exit__(self, *exc: Any) -> None:
        from lmms_engine.data.dataset import VideoSFTDataset

        VideoSFTDataset._load = self._original

    def videos(self) -> list[str]:
        return [v for _, v in self.calls if v is not None]
