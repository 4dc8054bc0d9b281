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
- Media: any number of videos and images. LLaVA form: ``"video"`` and ``"image"``, each a path or a list
  of paths, matched in order to the ``<video>`` / ``<image>`` tags of the turns. OpenAI form: content
  parts ``{"type": "video_url", "video_url": {"url": ...}}`` or ``{"type": "video", "video": ...}``, and
  ``{"type": "image_url", "image_url": {"url": ...}}`` or ``{"type": "image", "image": ...}`` (HF's
  form), in user messages, each becoming a tag where it stands. Paths are relative to the video / image
  folder (absolute paths are kept, and ``..`` may lead out of a video folder unless
  ``videos_inside_folder`` is set) and must exist (a file, or a pipe or device read like one; not a
  directory). ``video_start``/``video_end`` (seconds) are optional: at the top level for a record with
  one video, or, in the OpenAI form, beside the video in its content part.
- Tags: a record whose turns hold no tag of a kind gets one per medium of that kind at the start of its
  first user turn, in order (as LLaVA does); otherwise the number of tags must equal the number of
  media (``placeholder_count``; tags without any medium: ``placeholder_without_video`` /
  ``placeholder_without_image``). Tags stay where they are, with one exception kept from single-video
  LLaVA data: a record with exactly one video and no image has its ``<video>`` moved to the start of
  the first user turn (``"<video>\\n" + question``), so the video tokens come before any text about the
  video (the autoregressive loss reads hidden states that must not have seen a description).
- Top-level keys other than the conversation, ``video``, ``image``, ``video_start``, ``video_end`` and
  the metadata keys :data:`METADATA_KEYS` are errors (a misspelled ``vidoe`` must not train a text-only
  sample silently).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from lmms_engine.utils.config import suggest

#: Top-level keys kept as metadata (evaluation and bookkeeping); they never reach the model.
METADATA_KEYS: tuple[str, ...] = ("id", "question_type", "answer", "options", "source", "data_source")

#: Reason codes of bad records, with what each means.
BAD_RECORD_REASONS: dict[str, str] = {
    "invalid_json": "the line is not valid JSON",
    "invalid_text": "the line is not valid UTF-8, or a string holds a lone surrogate (\\ud800-\\udfff)",
    "not_an_object": "the record is not a JSON object",
    "unknown_field": "the record has a key that is neither a conversation, media nor metadata key",
    "no_conversation": "the record has no 'conversations' or 'messages', or has both",
    "empty_conversation": "the conversation has no turns",
    "bad_turn": "a turn is malformed (keys, role, content type or empty text)",
    "wrong_role_order": "roles do not follow [system] user assistant (user assistant)*",
    "bad_field": "a known field has a wrong type or value",
    "placeholder_without_video": "a <video> placeholder but no video",
    "placeholder_without_image": "an <image> placeholder but no image",
    "placeholder_count": "the number of <video> (<image>) placeholders differs from the number of videos (images)",
    "missing_video": "the video file does not exist (or is a directory)",
    "video_outside_folder": "the video path leads outside the video folder (absolute, or through '..'), "
                            "and dataset_config.videos_inside_folder is true",
    "missing_image": "the image file does not exist (or is a directory)",
    "broken_video": "the video file cannot be decoded",
    "broken_image": "the image file cannot be decoded",
    "unsupported_media": "the model family does not take the record's media (e.g. images, or several videos)",
    "decode_timeout": "reading the video took longer than decode_timeout seconds (a blocked or too slow read)",
    "too_long": "longer than max_length even after truncation",
}

_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_OPENAI_ROLES = ("system", "user", "assistant")
_MEDIA_KEYS = ("video", "image", "video_start", "video_end")


@dataclass(frozen=True)
class Medium:
    """One video or image of a record: ``kind`` (``video``/``image``), absolute ``path`` and, for videos,
    the optional time range in seconds."""

    kind: str
    path: str
    start: float | None = None
    end: float | None = None


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

    ``turns`` hold exactly one placeholder per medium, in the order of ``media`` (module docstring rules).
    ``video``/``video_start``/``video_end``: the first video's path and time range (None without a video).
    ``where`` names the record in messages (``file: record i (line n)``).
    """

    turns: tuple[Turn, ...]
    video: str | None
    video_start: float | None
    video_end: float | None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    index: int = 0
    where: str = ""
    media: tuple[Medium, ...] = ()

    @property
    def videos(self) -> tuple[Medium, ...]:
        return tuple(m for m in self.media if m.kind == "video")

    @property
    def images(self) -> tuple[Medium, ...]:
        return tuple(m for m in self.media if m.kind == "image")


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


def _part_url(part: Mapping, kind: str) -> Any:
    """The path of a ``{kind}_url`` part (``{"url": ...}``) or of a ``{kind}`` part (HF: the path itself)."""
    if part.get("type") == f"{kind}_url":
        url = part.get(f"{kind}_url")
        return url.get("url") if isinstance(url, Mapping) and set(url) <= {"url"} else None
    return part.get(kind)


def _openai_turns(messages: Any, where: str, tokens: Mapping[str, str]) -> tuple[list[Turn], list[dict]]:
    """Turns with a placeholder where each video / image part was, and the media found, in order."""
    if not isinstance(messages, list):
        raise _bad("bad_field", where, f"'messages' must be a list, got {type(messages).__name__}")
    turns: list[Turn] = []
    media: list[dict] = []
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
            medium = kind.removesuffix("_url") if kind in ("video_url", "video", "image_url", "image") else None
            if kind == "text" and isinstance(part.get("text"), str) and set(part) <= {"type", "text"}:
                pieces.append(part["text"])
            elif medium is not None and set(part) <= {"type", kind} | (
                    {"video_start", "video_end"} if medium == "video" else set()):
                url = _part_url(part, medium)
                if not isinstance(url, str) or not url:
                    shape = f"{{'type': '{kind}', '{kind}': " + ("{'url': '<path>'}}" if kind.endswith("_url")
                                                                  else "'<path>'}")
                    raise _bad("bad_turn", where, f"message {i} part {j}: a {kind} part is {shape}")
                if role != "user":
                    raise _bad("bad_turn", where, f"message {i} part {j}: {medium}s belong in user messages, "
                                                  f"not {role}")
                media.append({"kind": medium, "path": url.removeprefix("file://"),
                              "start": part.get("video_start"), "end": part.get("video_end")})
                pieces.append(tokens[medium])
            else:
                raise _bad("bad_turn", where, f"message {i} part {j} is not a text, video_url, video, image_url or "
                                              f"image part: {part!r}")
        turns.append(Turn(role, "\n".join(pieces)))
    return turns, media


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


def _place_tags(turns: list[Turn], counts: Mapping[str, int], tokens: Mapping[str, str],
                where: str) -> list[Turn]:
    """Placeholders as the module docstring says: added when absent, counted, the lone video moved."""
    first_user = next(i for i, t in enumerate(turns) if t.role == "user")
    for kind in ("image", "video"):  # videos end up first when both are added
        token, wanted = tokens[kind], counts[kind]
        found = sum(t.text.count(token) for t in turns)
        if found and not wanted:
            raise _bad(f"placeholder_without_{kind}", where,
                       f"{token!r} appears {found} time(s) but the record names no {kind}")
        if found and found != wanted:
            raise _bad("placeholder_count", where, f"{token!r} appears {found} time(s) but the record has "
                                                   f"{wanted} {kind}(s); give one {token} per {kind}, or none")
        if wanted and not found:
            text = turns[first_user].text
            turns = turns[:first_user] + [Turn("user", "\n".join([token] * wanted) + ("\n" + text if text else ""))] \
                + turns[first_user + 1:]
    if counts["video"] == 1 and counts["image"] == 0:
        token = tokens["video"]
        out = []
        for i, turn in enumerate(turns):
            text = turn.text.replace(token, "", 1).strip() if token in turn.text else turn.text
            if i == first_user:
                text = token + ("\n" + text if text else "")
            out.append(Turn(turn.role, text))
        turns = out
    return turns


def _paths(value: Any, key: str, where: str) -> list[str]:
    """A LLaVA ``video`` / ``image`` value: one path or a list of paths."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not values or any(not isinstance(v, str) or not v for v in values):
        raise _bad("bad_field", where, f"{key!r} must be a non-empty path string or a list of them, got {value!r}")
    return list(values)


def _media_path(path: str, folder: str | Path, kind: str, check: bool, where: str,
                videos_inside_folder: bool = False) -> str:
    resolved = Path(path).expanduser()
    resolved = resolved if resolved.is_absolute() else Path(folder) / resolved
    if videos_inside_folder and kind == "video":
        base = os.path.normpath(os.path.abspath(folder))
        if os.path.commonpath([base, os.path.normpath(os.path.abspath(resolved))]) != base:
            raise _bad("video_outside_folder", where, f"video {path!r} leads outside the video folder "
                                                      f"{str(folder)!r} (videos_inside_folder: true)")
    # exists() rather than is_file(): a named pipe or a device is read like a file (and a read that
    # blocks on one is the decoder's deadline to handle, not a missing file).
    if check and (not resolved.exists() or resolved.is_dir()):
        what = "is a directory, not a file" if resolved.is_dir() else "does not exist"
        raise _bad(f"missing_{kind}", where, f"{kind} file {str(resolved)!r} {what} ({kind} folder {str(folder)!r})")
    return str(resolved)


def parse_record(
    obj: Any,
    where: str,
    *,
    video_folder: str | Path,
    video_token: str = "<video>",
    check_video_exists: bool = True,
    index: int = 0,
    videos_inside_folder: bool = False,
    image_folder: str | Path | None = None,
    image_token: str = "<image>",
) -> ConversationRecord:
    """Validate one raw record (either form) and return it in canonical form (module docstring rules).

    ``image_folder``: where relative image paths start (None = ``video_folder``). ``check_video_exists``:
    check that every video and image file exists. ``videos_inside_folder``: a video path that leads
    outside ``video_folder`` (an absolute path elsewhere, or ``..`` parts climbing out; judged on the path
    as written, symlinks are not followed) is a bad record (``video_outside_folder``); by default such
    paths are read where they point. Raises :class:`BadRecordError` naming ``where`` and the reason.
    """
    if isinstance(obj, BadRecordError):
        raise obj
    if not isinstance(obj, Mapping):
        raise _bad("not_an_object", where, f"expected a JSON object, got {type(obj).__name__}")
    _check_text(obj, where)
    has_llava, has_openai = "conversations" in obj, "messages" in obj
    if has_llava == has_openai:
        raise _bad("no_conversation", where, "a record needs exactly one of 'conversations' (LLaVA) or 'messages' "
                                             f"(OpenAI-style); keys found: {sorted(obj)}")
    valid = ("conversations" if has_llava else "messages",) + _MEDIA_KEYS + METADATA_KEYS
    if has_openai:
        valid = tuple(k for k in valid if k not in ("video", "image"))
    for key in obj:
        if key not in valid:
            raise _bad("unknown_field", where, f"unknown key {key!r}{suggest(str(key), valid)}; valid keys: "
                                               f"{', '.join(valid)}")
    start = _optional_seconds(obj.get("video_start"), "video_start", where)
    end = _optional_seconds(obj.get("video_end"), "video_end", where)
    tokens = {"video": video_token, "image": image_token}
    if has_llava:
        turns = _llava_turns(obj["conversations"], where)
        raw = [{"kind": "video", "path": p, "start": None, "end": None} for p in _paths(obj.get("video"), "video", where)]
        raw += [{"kind": "image", "path": p, "start": None, "end": None} for p in _paths(obj.get("image"), "image", where)]
    else:
        turns, raw = _openai_turns(obj["messages"], where, tokens)
    videos = [m for m in raw if m["kind"] == "video"]
    if start is not None or end is not None:
        if len(videos) != 1:
            raise _bad("bad_field", where, "video_start/video_end given without a video" if not videos else
                       f"top-level video_start/video_end with {len(videos)} videos; give each video's range in its "
                       "content part")
        for key, value in (("start", start), ("end", end)):
            if value is not None and videos[0][key] is not None:
                raise _bad("bad_field", where, "video_start/video_end given both in the record and in the video part")
            if value is not None:
                videos[0][key] = value
    for medium in videos:
        medium["start"] = _optional_seconds(medium["start"], "video_start", where)
        medium["end"] = _optional_seconds(medium["end"], "video_end", where)
        if medium["start"] is not None and medium["end"] is not None and medium["end"] <= medium["start"]:
            raise _bad("bad_field", where, f"video_end ({medium['end']}) must be greater than video_start "
                                           f"({medium['start']})")
    _check_roles(turns, where)
    counts = {k: sum(m["kind"] == k for m in raw) for k in tokens}
    if has_openai:
        for kind in tokens:  # a tag typed into a text part beside media parts would be matched to none
            typed = sum(t.text.count(tokens[kind]) for t in turns) - counts[kind]
            if typed and counts[kind]:
                raise _bad("placeholder_count", where, f"{tokens[kind]!r} typed in a text part of a record with "
                                                       f"{kind} parts; use parts only")
    turns = _place_tags(turns, counts, tokens, where)
    pending = {k: iter([m for m in raw if m["kind"] == k]) for k in tokens}
    raw = [next(pending[k]) for k in _tag_order(turns, tokens)]  # each kind's media in the order of its tags
    for i, turn in enumerate(turns):
        if not turn.text.strip():
            raise _bad("bad_turn", where, f"turn {i} ({turn.role}) is empty")
    folders = {"video": video_folder, "image": video_folder if image_folder is None else image_folder}
    media = tuple(Medium(m["kind"], _media_path(m["path"], folders[m["kind"]], m["kind"], check_video_exists, where,
                                     videos_inside_folder),
                         m["start"], m["end"]) for m in raw)
    first = next((m for m in media if m.kind == "video"), None)
    metadata = {k: obj[k] for k in METADATA_KEYS if k in obj}
    return ConversationRecord(tuple(turns), first.path if first else None, first.start if first else None,
                              first.end if first else None, metadata, index, where, media)


def _tag_order(turns: Sequence[Turn], tokens: Mapping[str, str]) -> list[str]:
    """The kinds of the placeholders in reading order (``["video", "image", ...]``)."""
    pattern = re.compile("|".join(re.escape(t) for t in tokens.values()))
    by_token = {t: k for k, t in tokens.items()}
    return [by_token[m.group(0)] for turn in turns for m in pattern.finditer(turn.text)]


__all__ = [
    "BAD_RECORD_REASONS",
    "METADATA_KEYS",
    "BadRecordError",
    "ConversationRecord",
    "DataFileError",
    "Medium",
    "Turn",
    "no_usable_records",
    "parse_record",
    "record_location",
]
