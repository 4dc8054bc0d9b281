"""Reading and validating conversation records: LLaVA ``conversations`` and OpenAI-style ``messages``.

Two record forms are accepted, in a JSON list (``[...]``) or JSONL (one object per line):

LLaVA::

    {"conversations": [{"from": "human", "value": "<video>\\nWhat happens?"},
                       {"from": "gpt", "value": "A red square moves left."}],
     "video": "clips/a.mp4"}

OpenAI-style::

    {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "clips/a.mp4"}},
                                               {"type": "text", "text": "What happens?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "A red square moves left."}]}]}

(the Qwen / transformers chat-template part ``{"type": "video", "video": "clips/a.mp4"}`` is accepted
in place of ``video_url``.)

Rules (every violation is a :class:`BadRecordError` naming the file, the record index and the reason):

- Roles: an optional ``system`` turn, then ``user``/``assistant`` alternating, starting with ``user`` and
  ending with ``assistant``. LLaVA's ``from`` may be ``human``/``user``, ``gpt``/``assistant``, ``system``.
- At most one video per record. Video paths are relative to the video folder (absolute paths are kept,
  and ``..`` may lead out of it unless ``videos_inside_folder`` is set) and must exist (a file, or a
  pipe or device read like one; not a directory). ``video_start``/``video_end``
  (seconds) are optional, at the top level or, in the OpenAI form, beside ``video_url`` in the content part.
- The ``<video>`` placeholder: a record with a video and no placeholder gets one at the start of its
  first user turn (as LLaVA does); a placeholder without a video is an error; wherever it appears, it
  is moved to the start of the first user turn (``"<video>\\n" + question``) so that the video tokens
  come before any text about the video.
- Top-level keys other than the conversation, ``video``, ``video_start``, ``video_end`` and the
  metadata keys :data:`METADATA_KEYS` are errors (a misspelled ``vidoe`` must not train a text-only
  sample silently). Images are not supported.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from lmms_engine.utils.config import suggest

#: Top-level keys kept as metadata (evaluation and bookkeeping); they never reach the model.
METADATA_KEYS: tuple[str, ...] = ("id", "question_type", "answer", "options", "source", "data_source")

#: Reason codes of bad records, with what each means.
BAD_RECORD_REASONS: dict[str, str] = {
    "invalid_json": "the line is not valid JSON",
    "invalid_text": "the line is not valid UTF-8, or a string holds a lone surrogate (\\ud800-\\udfff)",
    "not_an_object": "the record is not a JSON object",
    "unknown_field": "the record has a key that is neither a conversation, video nor metadata key",
    "no_conversation": "the record has no 'conversations' or 'messages', or has both",
    "empty_conversation": "the conversation has no turns",
    "bad_turn": "a turn is malformed (keys, role, content type or empty text)",
    "wrong_role_order": "roles do not follow [system] user assistant (user assistant)*",
    "bad_field": "a known field has a wrong type or value",
    "image_unsupported": "the record holds an image; only videos are supported",
    "placeholder_without_video": "a <video> placeholder but no video",
    "multiple_videos": "more than one video or <video> placeholder",
    "missing_video": "the video file does not exist (or is a directory)",
    "video_outside_folder": "the video path leads outside the video folder (absolute, or through '..'), "
                            "and dataset_config.videos_inside_folder is true",
    "broken_video": "the video file cannot be decoded",
    "decode_timeout": "reading the video took longer than decode_timeout seconds (a blocked or too slow read)",
    "too_long": "longer than max_length even after truncation",
}

IMAGE_PLACEHOLDER = "<image>"
_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_OPENAI_ROLES = ("system", "user", "assistant")
_VIDEO_KEYS = ("video", "video_start", "video_end")


_MESSAGE = re.compile(r"^(?P<where>.*?: record \d+(?: \(line \d+\))?): (?P<detail>.*) \[(?P<reason>\w+)\]$", re.S)


class BadRecordError(ValueError):
    """A record that cannot be used. ``reason`` is a key of :data:`BAD_RECORD_REASONS`.

    ``BadRecordError(message)`` (one argument) rebuilds the error from its message or from a text ending
    with it, as torch's DataLoader does for an error raised in a worker process (it passes the worker's
    formatted traceback): the reason and the record's location are read back from the last line.
    """

    def __init__(self, reason: str, where: str | None = None, detail: str | None = None) -> None:
        if where is None or detail is None:
            lines = [line for line in reason.strip().splitlines() if line.strip()]
            last = lines[-1] if lines else reason
            last = last.split("BadRecordError: ", 1)[-1]
            match = _MESSAGE.match(last)
            reason, where, detail = (match["reason"], match["where"], match["detail"]) if match \
                and match["reason"] in BAD_RECORD_REASONS else ("broken_video", "", last)
        super().__init__(f"{where}: {detail} [{reason}]" if where else f"{detail} [{reason}]")
        self.reason = reason
        self.where = where
        self.detail = detail

    def __reduce__(self) -> tuple:
        return type(self), (self.reason, self.where, self.detail)


@dataclass(frozen=True)
class Turn:
    """One conversation turn; ``role`` is ``system``, ``user`` or ``assistant``."""

    role: str
    text: str


@dataclass(frozen=True)
class ConversationRecord:
    """A validated record.

    ``turns`` are in canonical form: when ``video`` is set, the first user turn starts with exactly one
    video placeholder followed by a newline, and no other turn holds one. ``video`` is an absolute path.
    ``where`` names the record in messages (``file: record i (line n)``).
    """

    turns: tuple[Turn, ...]
    video: str | None
    video_start: float | None
    video_end: float | None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    index: int = 0
    where: str = ""


def record_location(path: str | Path, index: int, line: int | None = None) -> str:
    """``"<file>: record <index>"`` plus the line number for JSONL."""
    return f"{path}: record {index}" + (f" (line {line})" if line is not None else "")


class DataFileError(ValueError):
    """A data file that cannot be used as a whole (not UTF-8, not JSON, not a list or JSONL, no records,
    no usable record); the message names the file and what would be valid."""


_EXPECTED = "expected a JSON list of records ([{...}, {...}]) or JSONL (one record per line)"


def _utf8_error(err: UnicodeDecodeError, data: bytes, offset: int = 0) -> str:
    """``"byte 0x.. at line L, column C is not valid UTF-8"`` for a decoding error in ``data``."""
    position = offset + err.start
    line = data.count(b"\n", 0, position) + 1
    column = position - (data.rfind(b"\n", 0, position) + 1) + 1
    return f"byte 0x{data[position]:02x} at line {line}, column {column} is not valid UTF-8"


def no_usable_records(path: str | Path, total: int, failures: list[BadRecordError]) -> str:
    """The message for a file none of whose ``total`` records can be used (the first reasons shown)."""
    shown = "; ".join(str(err) for err in failures[:3])
    return f"{path}: no usable records ({total} read, {len(failures)} bad" + (f", e.g. {shown})" if shown else ")")


def _bad(reason: str, where: str, detail: str) -> BadRecordError:
    return BadRecordError(reason, where, detail)


def _check_text(obj: Any, where: str, key: str = "") -> None:
    """Every string in ``obj`` must be encodable as UTF-8: JSON's ``"\\ud800"`` escape parses to a lone
    surrogate, which no tokenizer (and no UTF-8 file) can take."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError as err:
            raise _bad("invalid_text", where, f"{key or 'a string'} holds a lone surrogate "
                                              f"{obj[err.start]!r} at character {err.start}") from None
    elif isinstance(obj, Mapping):
        for name, value in obj.items():
            _check_text(name, where, key)
            _check_text(value, where, f"{key}.{name}" if key else str(name))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            _check_text(value, where, f"{key}[{i}]")


def _optional_seconds(value: Any, key: str, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise _bad("bad_field", where, f"{key} must be a number of seconds >= 0, got {value!r}")
    return float(value)


def _llava_turns(conversations: Any, where: str) -> list[Turn]:
    if not isinstance(conversations, list):
        raise _bad("bad_field", where, f"'conversations' must be a list of turns, got {type(conversations).__name__}")
    turns = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, Mapping):
            raise _bad("bad_turn", where, f"turn {i} is not an object: {turn!r}")
        for key in turn:
            if key not in ("from", "value"):
                hint = suggest(str(key), ("from", "value"))
                raise _bad("bad_turn", where, f"turn {i} has unknown key {key!r}{hint}; a LLaVA turn has 'from' and 'value'")
        role, value = turn.get("from"), turn.get("value")
        if role not in _LLAVA_ROLES:
            raise _bad("bad_turn", where, f"turn {i} has 'from' {role!r}; valid: {', '.join(_LLAVA_ROLES)}")
        if not isinstance(value, str):
            raise _bad("bad_turn", where, f"turn {i} 'value' must be a string, got {type(value).__name__}")
        turns.append(Turn(_LLAVA_ROLES[role], value))
    return turns


def _openai_turns(messages: Any, where: str, video_token: str) -> tuple[list[Turn], list[dict]]:
    """Turns with a placeholder where each video part was, and the video parts found."""
    if not isinstance(messages, list):
        raise _bad("bad_field", where, f"'messages' must be a list, got {type(messages).__name__}")
    turns: list[Turn] = []
    videos: list[dict] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise _bad("bad_turn", where, f"message {i} is not an object: {message!r}")
        for key in message:
            if key not in ("role", "content"):
                raise _bad("bad_turn", where, f"message {i} has unknown key {key!r}"
                                              f"{suggest(str(key), ('role', 'content'))}; valid: role, content")
        role, content = message.get("role"), message.get("content")
        if role not in _OPENAI_ROLES:
            raise _bad("bad_turn", where, f"message {i} has role {role!r}; valid: {', '.join(_OPENAI_ROLES)}")
        if isinstance(content, str):
            turns.append(Turn(role, content))
            continue
        if not isinstance(content, list):
            raise _bad("bad_turn", where, f"message {i} content must be a string or a list of parts")
        pieces = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "text" and isinstance(part.get("text"), str) and set(part) <= {"type", "text"}:
                pieces.append(part["text"])
            elif kind in ("video_url", "video") and set(part) <= {"type", kind, "video_start", "video_end"}:
                # OpenAI's {"video_url": {"url": p}}, or Qwen / transformers' chat-template {"video": p}
                url = part.get(kind)
                if kind == "video_url":
                    url = url.get("url") if isinstance(url, Mapping) and set(url) <= {"url"} else None
                if not isinstance(url, str) or not url:
                    shape = "{'url': '<path>'}" if kind == "video_url" else "'<path>'"
                    raise _bad("bad_turn", where, f"message {i} part {j}: {kind} must be {shape}")
                if role != "user":
                    raise _bad("bad_turn", where, f"message {i} part {j}: videos belong in user messages, not {role}")
                videos.append({"video": url.removeprefix("file://"), "video_start": part.get("video_start"),
                               "video_end": part.get("video_end")})
                pieces.append(video_token)
            elif kind in ("image_url", "image"):
                raise _bad("image_unsupported", where, f"message {i} part {j} is an image; only videos are supported")
            else:
                raise _bad("bad_turn", where, f"message {i} part {j} is not a text, video_url or video part: {part!r}")
        turns.append(Turn(role, "\n".join(pieces)))
    return turns, videos


def _check_roles(turns: list[Turn], where: str) -> None:
    if not turns:
        raise _bad("empty_conversation", where, "the conversation is empty")
    roles = [t.role for t in turns]
    body = roles[1:] if roles[0] == "system" else roles
    ok = len(body) >= 2 and len(body) % 2 == 0 and all(
        r == ("user" if k % 2 == 0 else "assistant") for k, r in enumerate(body))
    if not ok:
        raise _bad("wrong_role_order", where, f"roles {roles} do not follow [system] user assistant "
                                              "(user assistant)*, ending with assistant")


def _place_video_token(turns: list[Turn], has_video: bool, video_token: str, where: str) -> list[Turn]:
    """Canonical placeholder: one, at the start of the first user turn, or none without a video."""
    count = sum(t.text.count(video_token) for t in turns)
    if any(IMAGE_PLACEHOLDER in t.text for t in turns):
        raise _bad("image_unsupported", where, f"a turn holds {IMAGE_PLACEHOLDER!r}; only videos are supported")
    if not has_video:
        if count:
            raise _bad("placeholder_without_video", where,
                       f"{video_token!r} appears {count} time(s) but the record names no video")
        return turns
    if count > 1:
        raise _bad("multiple_videos", where, f"{video_token!r} appears {count} times; at most one video per record")
    out = []
    first_user = next(i for i, t in enumerate(turns) if t.role == "user")
    for i, turn in enumerate(turns):
        text = turn.text
        if video_token in text:
            text = text.replace(video_token, "", 1).strip()
        if i == first_user:
            text = video_token + ("\n" + text if text else "")
        out.append(Turn(turn.role, text))
    return out


def parse_record(
    obj: Any,
    where: str,
    *,
    video_folder: str | Path,
    video_token: str = "<video>",
    check_video_exists: bool = True,
    index: int = 0,
    videos_inside_folder: bool = False,
) -> ConversationRecord:
    """Validate one raw record (either form) and return it in canonical form (module docstring rules).

    ``videos_inside_folder``: a video path that leads outside ``video_folder`` (an absolute path
    elsewhere, or ``..`` parts climbing out; judged on the path as written, symlinks are not followed)
    is a bad record (``video_outside_folder``). By default such paths are read where they point.

    Raises :class:`BadRecordError` naming ``where`` and the reason.
    """
    if isinstance(obj, BadRecordError):
        raise obj
    if not isinstance(obj, Mapping):
        raise _bad("not_an_object", where, f"expected a JSON object, got {type(obj).__name__}")
    _check_text(obj, where)
    if "image" in obj or "images" in obj:
        raise _bad("image_unsupported", where, "the record has an 'image' field; only videos are supported")
    has_llava, has_openai = "conversations" in obj, "messages" in obj
    if has_llava == has_openai:
        raise _bad("no_conversation", where, "a record needs exactly one of 'conversations' (LLaVA) or 'messages' "
                                             f"(OpenAI-style); keys found: {sorted(obj)}")
    valid = ("conversations" if has_llava else "messages",) + _VIDEO_KEYS + METADATA_KEYS
    if has_openai:
        valid = tuple(k for k in valid if k != "video")
    for key in obj:
        if key not in valid:
            raise _bad("unknown_field", where, f"unknown key {key!r}{suggest(str(key), valid)}; valid keys: "
                                               f"{', '.join(valid)}")
    start = _optional_seconds(obj.get("video_start"), "video_start", where)
    end = _optional_seconds(obj.get("video_end"), "video_end", where)
    if has_llava:
        turns = _llava_turns(obj["conversations"], where)
        video = obj.get("video")
        if video is not None and (not isinstance(video, str) or not video):
            raise _bad("bad_field", where, f"'video' must be a non-empty path string, got {video!r}")
    else:
        turns, parts = _openai_turns(obj["messages"], where, video_token)
        if len(parts) > 1:
            raise _bad("multiple_videos", where, f"{len(parts)} video_url parts; at most one video per record")
        video = parts[0]["video"] if parts else None
        if parts:
            part_start = _optional_seconds(parts[0]["video_start"], "video_start", where)
            part_end = _optional_seconds(parts[0]["video_end"], "video_end", where)
            if (part_start is not None and start is not None) or (part_end is not None and end is not None):
                raise _bad("bad_field", where, "video_start/video_end given both in the record and in the video part")
            start = start if part_start is None else part_start
            end = end if part_end is None else part_end
    if video is None and (start is not None or end is not None):
        raise _bad("bad_field", where, "video_start/video_end given without a video")
    if start is not None and end is not None and end <= start:
        raise _bad("bad_field", where, f"video_end ({end}) must be greater than video_start ({start})")
    _check_roles(turns, where)
    turns = _place_video_token(turns, video is not None, video_token, where)
    for i, turn in enumerate(turns):
        if not turn.text.strip():
            raise _bad("bad_turn", where, f"turn {i} ({turn.role}) is empty")
    video_path = None
    if video is not None:
        path = Path(video).expanduser()
        path = path if path.is_absolute() else Path(video_folder) / path
        if videos_inside_folder:
            base = os.path.normpath(os.path.abspath(video_folder))
            if os.path.commonpath([base, os.path.normpath(os.path.abspath(path))]) != base:
                raise _bad("video_outside_folder", where, f"video {video!r} leads outside the video folder "
                                                          f"{str(video_folder)!r} (videos_inside_folder: true)")
        # exists() rather than is_file(): a named pipe or a device is read like a file (and a read that
        # blocks on one is the decoder's deadline to handle, not a missing file).
        if check_video_exists and (not path.exists() or path.is_dir()):
            what = "is a directory, not a video file" if path.is_dir() else "does not exist"
            raise _bad("missing_video", where, f"video file {str(path)!r} {what} "
                                               f"(video folder {str(video_folder)!r})")
        video_path = str(path)
    metadata = {k: obj[k] for k in METADATA_KEYS if k in obj}
    return ConversationRecord(tuple(turns), video_path, start, end, metadata, index, where)


__all__ = [
    "BAD_RECORD_REASONS",
    "METADATA_KEYS",
    "BadRecordError",
    "ConversationRecord",
    "DataFileError",
    "Turn",
    "no_usable_records",
    "parse_record",
    "record_location",
]
