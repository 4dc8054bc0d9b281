"""Where records come from: one file, a list of files, or a mixture file; read lazily.

``dataset_config.data_path`` may be

- one record file: a JSON list (``[{...}, ...]``), JSONL (one object per line), a Parquet file
  (``.parquet``), an Arrow file (``.arrow``) or a folder written by HF ``datasets``' ``save_to_disk``;
- a list of such files (each read in full, its media relative to its own folder);
- a mixture file in LLaVA-NeXT's format, YAML (``.yaml``/``.yml``) or JSON (an object with ``datasets``)::

      datasets:
        - json_path: data/captions.jsonl
          sampling_strategy: "first:50%"
          video_folder: /data/videos          # optional, per source
        - json_path: data/qa.json
          sampling_strategy: "random:1000"
          image_folder: /data/images          # optional, per source

  Each entry has ``json_path`` (LLaVA-NeXT) or ``path`` (lmms-engine's name), an optional
  ``sampling_strategy`` (default ``all``), ``video_folder`` / ``image_folder`` (default: the global
  ``dataset_config`` folder, else the record file's folder), lmms-engine's ``data_folder`` (both
  folders at once), ``data_type`` (``json``, ``jsonl``, ``parquet``, ``arrow``, ``hf_dataset``;
  default: from the file) and ``name`` (default: the file name; shown in reports). Relative paths in a
  mixture file are relative to the mixture file's folder, else to the current directory.

Sampling strategies (N a count, P a percentage of the source's records, rounded up as LLaVA-NeXT does):
``all``; ``first:N``/``first:P%`` (the first records in file order); ``end:N``/``end:P%`` (the last);
``random:N``/``random:P%`` (a uniformly random subset, drawn with ``numpy``'s generator seeded by
``sampling_seed`` and the source's position in the mixture, so the same seed always picks the same
records; kept in file order). A count larger than the source is an error naming the source.

Reading is lazy. JSONL files are indexed by the byte offsets of their non-blank lines (one vectorised
pass over the bytes; nothing is parsed); a record is parsed when it is first needed. JSON lists are
scanned once, element by element, for each element's span (the elements are not kept); the text stays in
memory, so prefer JSONL for large data. Parquet, Arrow and ``datasets`` folders are memory-mapped by the
``datasets`` library (an optional extra: ``pip install 'lmms-video[datasets]'``); columns a row does not
use are null in Arrow, and null values are dropped from rows before they are validated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from lmms_engine.utils.config import ConfigError, suggest

DataType = Literal["json", "jsonl", "parquet", "arrow", "hf_dataset"]
DATA_TYPES: tuple[str, ...] = ("json", "jsonl", "parquet", "arrow", "hf_dataset")
MIXTURE_SUFFIXES: tuple[str, ...] = (".yaml", ".yml")
#: Keys of one mixture entry (LLaVA-NeXT's, lmms-engine's, and ours).
SOURCE_KEYS: tuple[str, ...] = ("json_path", "path", "sampling_strategy", "video_folder", "image_folder",
                                "data_folder", "data_type", "name")
_STRATEGY = re.compile(r"^(all)$|^(first|end|random):(\d+(?:\.\d+)?)(%?)$")
_BOM = b"\xef\xbb\xbf"
_HAS_TEXT = np.ones(256, dtype=np.uint8)
_HAS_TEXT[[ord(c) for c in " \t\r\n\f\v"]] = 0  # byte -> 1 unless whitespace
_CHUNK = 8 << 20
DATASETS_EXTRA = "pip install 'lmms-video[datasets]' (the `datasets` library)"


class RawRecordError(ValueError):
    """A record whose bytes are no JSON: ``reason`` is ``invalid_json`` or ``invalid_text`` (not UTF-8);
    ``where`` names the file, record and line."""

    def __init__(self, where: str, detail: str, reason: str = "invalid_json") -> None:
        super().__init__(f"{where}: {detail} [{reason}]")
        self.reason = reason
        self.where = where
        self.detail = detail


@dataclass(frozen=True)
class SourceConfig:
    """One source of records (an entry of a mixture, or one file of ``data_path``).

    Attributes:
        path: the record file (or ``datasets`` folder), resolved.
        sampling_strategy: which of its records are used (module docstring).
        video_folder, image_folder: where relative media paths start; None = the file's folder.
        data_type: the file's format; None = from the file (extension, first character, folder).
        name: shown in reports; default the file name.
    """

    path: str
    sampling_strategy: str = "all"
    video_folder: str | None = None
    image_folder: str | None = None
    data_type: DataType | None = None
    name: str = ""

    def __post_init__(self) -> None:
        parse_sampling_strategy(self.sampling_strategy, self.name or self.path)
        if not self.name:
            object.__setattr__(self, "name", Path(self.path).name)

    @property
    def media_folder(self) -> Path:
        """The record file's folder (default start of relative media paths)."""
        return Path(self.path).resolve().parent


def parse_sampling_strategy(text: str, where: str) -> tuple[str, float | None, bool]:
    """``"first:50%"`` -> ``("first", 50.0, True)``; ``"all"`` -> ``("all", None, False)``."""
    match = _STRATEGY.match(str(text).strip()) if isinstance(text, str) else None
    if match is None:
        raise ConfigError(f"{where}: sampling_strategy {text!r} is not valid; valid: 'all', 'first:N', 'first:N%', "
                          "'end:N', 'end:N%', 'random:N', 'random:N%' (N a number)")
    if match.group(1):
        return "all", None, False
    kind, number, percent = match.group(2), float(match.group(3)), bool(match.group(4))
    if percent and not 0 < number <= 100:
        raise ConfigError(f"{where}: sampling_strategy {text!r}: a percentage must be in (0, 100]")
    if not percent and (number != int(number) or number < 1):
        raise ConfigError(f"{where}: sampling_strategy {text!r}: a count must be a whole number >= 1")
    return kind, number, percent


def select_indices(num_records: int, strategy: str, seed: int, where: str) -> np.ndarray:
    """Indices (int64, ascending) of the records ``strategy`` keeps out of ``num_records``."""
    kind, number, percent = parse_sampling_strategy(strategy, where)
    if kind == "all":
        return np.arange(num_records, dtype=np.int64)
    count = math.ceil(number * num_records / 100) if percent else int(number)
    if count > num_records:
        raise ConfigError(f"{where}: sampling_strategy {strategy!r} asks for {count} records but the source has "
                          f"{num_records}")
    if kind == "first":
        return np.arange(count, dtype=np.int64)
    if kind == "end":
        return np.arange(num_records - count, num_records, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_records, size=count, replace=False)).astype(np.int64)


# ------------------------------------------------------------------------------------------ resolving
def _resolve(path: str, base: Path | None, where: str) -> str:
    """An existing path: as given when absolute, else under ``base`` (a mixture file's folder), else
    under the current directory."""
    candidate = Path(path).expanduser()
    tries = [candidate] if candidate.is_absolute() else ([base / candidate] if base is not None else []) + [candidate]
    for option in tries:
        if option.exists():
            return str(option)
    looked = " or ".join(repr(str(t)) for t in tries)
    raise ConfigError(f"{where}: {path!r} does not exist (looked for {looked})")


def is_mixture_file(path: str | Path) -> bool:
    """A YAML file, or a JSON file holding one object with a ``datasets`` list (not a record)."""
    path = Path(path)
    if path.suffix.lower() in MIXTURE_SUFFIXES:
        return True
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    with open(path, "rb") as handle:
        head = handle.read(4096).lstrip(_BOM).lstrip()
    if not head.startswith(b"{"):
        return False
    try:
        whole = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False  # JSONL (or broken): the record reader says what is wrong
    return isinstance(whole, dict) and "datasets" in whole and not ({"conversations", "messages"} & set(whole))


def _read_mixture(path: Path, video_folder: str | None, image_folder: str | None,
                  outer: str) -> list[SourceConfig]:
    import yaml

    where = f"{outer}: {path}"
    try:
        text = path.read_text(encoding="utf-8-sig")
        raw = yaml.safe_load(text) if path.suffix.lower() in MIXTURE_SUFFIXES else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{where}: cannot read the mixture file: {err}") from err
    if not isinstance(raw, Mapping) or not isinstance(raw.get("datasets"), list) or not raw["datasets"]:
        raise ConfigError(f"{where}: a mixture file holds 'datasets:', a non-empty list of sources, each with "
                          "json_path (or path) and an optional sampling_strategy")
    for key in raw:
        if key != "datasets":
            raise ConfigError(f"{where}: unknown top-level key {key!r}{suggest(str(key), ['datasets'])}; a mixture "
                              "file holds only 'datasets'")
    sources = []
    for i, entry in enumerate(raw["datasets"]):
        at = f"{where}: datasets[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{at}: expected a mapping with json_path, got {entry!r}")
        for key in entry:
            if key not in SOURCE_KEYS:
                raise ConfigError(f"{at}: unknown key {key!r}{suggest(str(key), SOURCE_KEYS)}; valid keys: "
                                  f"{', '.join(SOURCE_KEYS)}")
        if ("json_path" in entry) == ("path" in entry):
            raise ConfigError(f"{at}: give exactly one of json_path (LLaVA-NeXT) or path (lmms-engine)")
        file = entry.get("json_path", entry.get("path"))
        if not isinstance(file, str) or not file:
            raise ConfigError(f"{at}: json_path must be a path string, got {file!r}")
        data_folder = entry.get("data_folder")
        for key in ("video_folder", "image_folder"):
            if data_folder is not None and entry.get(key) is not None:
                raise ConfigError(f"{at}: data_folder sets both media folders; remove it or {key}")
        folders = {}
        for key, default in (("video_folder", video_folder), ("image_folder", image_folder)):
            value = entry.get(key, data_folder)
            if value is None:
                folders[key] = default
                continue
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{at}.{key}: expected a folder path, got {value!r}")
            resolved = _resolve(value, path.parent, f"{at}.{key}")
            if not Path(resolved).is_dir():
                raise ConfigError(f"{at}.{key}: {resolved!r} is not a folder")
            folders[key] = resolved
        data_type = entry.get("data_type")
        if data_type is not None and data_type not in DATA_TYPES:
            raise ConfigError(f"{at}.data_type: {data_type!r} is not valid{suggest(str(data_type), DATA_TYPES)}; "
                              f"valid: {', '.join(DATA_TYPES)}")
        strategy = entry.get("sampling_strategy", "all")
        name = entry.get("name") or ""
        if not isinstance(name, str):
            raise ConfigError(f"{at}.name: expected a string, got {name!r}")
        parse_sampling_strategy(strategy, at)
        sources.append(SourceConfig(_resolve(file, path.parent, f"{at}.json_path"), strategy, folders["video_folder"],
                                    folders["image_folder"], data_type, name))
    return sources


def resolve_sources(data_path: str | Sequence[str], *, video_folder: str | None = None,
                    image_folder: str | None = None, where: str = "dataset_config.data_path") -> list[SourceConfig]:
    """The sources ``data_path`` names (module docstring), every file checked to exist.

    ``video_folder``/``image_folder``: the ``dataset_config`` folders, the default of every source.
    Raises :class:`~lmms_engine.utils.config.ConfigError` naming the file, entry and key.
    """
    paths = [data_path] if isinstance(data_path, (str, os.PathLike)) else list(data_path)
    if not paths:
        raise ConfigError(f"{where}: an empty list; give a record file, a list of them or a mixture file")
    sources: list[SourceConfig] = []
    for i, item in enumerate(paths):
        at = where if isinstance(data_path, (str, os.PathLike)) else f"{where}[{i}]"
        if not isinstance(item, (str, os.PathLike)) or not str(item):
            raise ConfigError(f"{at}: expected a file path, got {item!r}")
        path = Path(item).expanduser()
        if not path.exists():
            raise ConfigError(f"{at}: file {str(item)!r} does not exist")
        if is_mixture_file(path):
            sources.extend(_read_mixture(path, video_folder, image_folder, at))
        else:
            sources.append(SourceConfig(str(path), "all", video_folder, image_folder))
    names = [s.name for s in sources]
    for name in names:
        if names.count(name) > 1:  # reports key on names: make them unique, keeping the first as is
            seen: dict[str, int] = {}
            renamed = []
            for s in sources:
                k = seen.get(s.name, 0)
                seen[s.name] = k + 1
                renamed.append(s if k == 0 else SourceConfig(s.path, s.sampling_strategy, s.video_folder,
                                                             s.image_folder, s.data_type, f"{s.name}#{k + 1}"))
            return renamed
    return sources


# ------------------------------------------------------------------------------------------ tables
def detect_data_type(path: str | Path) -> DataType:
    """The format of a record file: a folder is a ``datasets`` folder; ``.parquet``/``.arrow`` by name;
    otherwise JSON when the first character (after a BOM and whitespace) is ``[``, else JSONL."""
    path = Path(path)
    if path.is_dir():
        return "hf_dataset"
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix == ".arrow":
        return "arrow"
    with open(path, "rb") as handle:
        head = handle.read(1 << 16).lstrip(_BOM).lstrip()
    return "json" if head.startswith(b"[") else "jsonl"


class RecordTable:
    """Raw records of one file by index, read on demand. ``get(i)`` returns the record's object (a
    :class:`RawRecordError` instead when its bytes are not JSON); ``line(i)`` its 1-based line (JSONL) or
    None."""

    path: str
    data_type: DataType

    def __len__(self) -> int:
        raise NotImplementedError

    def get(self, index: int) -> Any:
        raise NotImplementedError

    def line(self, index: int) -> int | None:
        return None


def _parse_line(where: str, data: bytes, line: int) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        return RawRecordError(where, f"byte 0x{data[err.start]:02x} at line {line}, column {err.start + 1} is not "
                                     "valid UTF-8", "invalid_text")
    except json.JSONDecodeError as err:
        return RawRecordError(where, f"invalid JSON: {err}")


class JsonlTable(RecordTable):
    """A JSONL file indexed by the byte span of each non-blank line (``int64`` starts and ends, ``int64``
    line numbers: 24 bytes a record); lines are read with ``os.pread`` when asked for."""

    data_type: DataType = "jsonl"

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.starts, self.ends, self.lines = _index_lines(self.path)
        self._fd: int | None = None
        self._pid = -1
        self._check_shape()

    def _check_shape(self) -> None:
        """Whole-file errors, from the first record (cheap): an empty file, or a file that is one JSON
        value (a pretty-printed object, a ``.json`` file holding one object, a number) rather than JSONL."""
        from lmms_engine.data.records import _EXPECTED, DataFileError

        if not len(self):
            raise DataFileError(f"{self.path}: the file is empty; {_EXPECTED}")
        first = self.get(0)
        single = len(self) == 1 and not self.path.endswith(".jsonl")
        if isinstance(first, RawRecordError) or single:
            with open(self.path, "rb") as handle:
                data = handle.read().removeprefix(_BOM)
            try:  # parses as a whole only if it is one JSON value (JSONL stops at its second line)
                whole = json.loads(data.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                return
            if isinstance(whole, dict):
                raise DataFileError(f"{self.path}: holds a single JSON object, not a list of records; {_EXPECTED} "
                                    "(a one-record JSONL file is named .jsonl)")
            raise DataFileError(f"{self.path}: a JSON {type(whole).__name__}, not a list of records; {_EXPECTED}")

    def __len__(self) -> int:
        return len(self.starts)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fd"], state["_pid"] = None, -1
        return state

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            os.close(self._fd)

    def line(self, index: int) -> int | None:
        return int(self.lines[index])

    def get(self, index: int) -> Any:
        if self._fd is None or self._pid != os.getpid():  # one descriptor per process (DataLoader workers)
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        start, end = int(self.starts[index]), int(self.ends[index])
        data = os.pread(self._fd, end - start, start)
        line = self.line(index)
        return _parse_line(f"{self.path}: record {index} (line {line})", data, line)


def _index_lines(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Byte starts/ends and 1-based line numbers of the non-blank lines of ``path`` (a UTF-8 BOM before
    the first line is skipped), reading 8 MiB at a time."""
    starts: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    numbers: list[np.ndarray] = []
    with open(path, "rb") as handle:
        head = handle.read(len(_BOM))
        base = len(_BOM) if head == _BOM else 0  # file offset of ``pending``'s first byte
        pending = b"" if head == _BOM else head
        line_base = 0  # lines before ``pending``
        while True:
            block = handle.read(_CHUNK)
            data = pending + block
            if not data:
                break
            cut = data.rfind(b"\n") + 1 if block else len(data)  # whole lines; at the end, the rest too
            if cut == 0:
                pending = data
                continue
            chunk = np.frombuffer(data, dtype=np.uint8, count=cut)
            newlines = np.flatnonzero(chunk == 10)
            line_starts = np.concatenate(([0], newlines + 1))
            line_ends = np.concatenate((newlines, [cut]))
            if line_starts[-1] == cut:  # the chunk ends with a newline: no line after it
                line_starts, line_ends = line_starts[:-1], line_ends[:-1]
            has_text = np.zeros(len(line_starts), dtype=bool)
            nonempty = line_ends > line_starts
            if nonempty.any():
                # max over [start_k, next non-empty start): the bytes between are newlines, whitespace: exact.
                has_text[nonempty] = np.maximum.reduceat(_HAS_TEXT[chunk], line_starts[nonempty]) > 0
            keep = np.flatnonzero(has_text)
            starts.append(line_starts[keep] + base)
            ends.append(line_ends[keep] + base)
            numbers.append(keep + line_base + 1)
            line_base += len(line_starts)
            base += cut
            pending = data[cut:]
            if not block:
                break
    if not starts:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy(), empty.copy()
    def join(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts).astype(np.int64)

    return join(starts), join(ends), join(numbers)


class JsonListTable(RecordTable):
    """A JSON list file: scanned once for each element's character span (the elements are parsed to find
    where they end, then dropped); the text is kept and an element parsed again when asked for."""

    data_type: DataType = "json"

    def __init__(self, path: str | Path) -> None:
        from lmms_engine.data.records import _EXPECTED, DataFileError, _utf8_error

        self.path = str(path)
        raw = Path(path).read_bytes().removeprefix(_BOM)
        try:
            self.text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataFileError(f"{path}: {_utf8_error(err, raw)}; a JSON list is read as one document, so the "
                                "whole file is unusable (re-encode it as UTF-8)") from err
        self.spans = _list_spans(self.text, self.path)
        if not len(self.spans):
            raise DataFileError(f"{path}: an empty list ([]): no records; {_EXPECTED}")

    def __len__(self) -> int:
        return len(self.spans)

    def get(self, index: int) -> Any:
        start, end = self.spans[index]
        return json.loads(self.text[start:end])


def _list_spans(text: str, path: str) -> np.ndarray:
    from lmms_engine.data.records import _EXPECTED, DataFileError

    decoder = json.JSONDecoder()
    ws = re.compile(r"[ \t\n\r]*")
    pos = ws.match(text, 0).end()
    if not text.startswith("[", pos):
        raise DataFileError(f"{path}: {_EXPECTED}")
    pos = ws.match(text, pos + 1).end()
    spans: list[tuple[int, int]] = []
    if text.startswith("]", pos):
        return np.zeros((0, 2), dtype=np.int64)
    while True:
        try:
            _, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataFileError(f"{path}: not valid JSON ({err}); {_EXPECTED}") from err
        spans.append((pos, end))
        pos = ws.match(text, end).end()
        if text.startswith(",", pos):
            pos = ws.match(text, pos + 1).end()
            continue
        if text.startswith("]", pos) and not text[ws.match(text, pos + 1).end():].strip():
            break
        line = text.count("\n", 0, pos) + 1
        raise DataFileError(f"{path}: not valid JSON (expected ',' or ']' at line {line}); {_EXPECTED}")
    return np.asarray(spans, dtype=np.int64)


def require_datasets(what: str) -> Any:
    """Import the ``datasets`` library or raise an ImportError naming the extra that installs it."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError(f"{what} needs the `datasets` library: {DATASETS_EXTRA}") from err
    return datasets


class ArrowTable(RecordTable):
    """Parquet, Arrow or a ``datasets`` folder through HF ``datasets`` (memory-mapped); rows as dicts
    with null values dropped (Arrow gives every row every column)."""

    def __init__(self, path: str | Path, data_type: DataType) -> None:
        datasets = require_datasets(f"reading {path} ({data_type})")
        self.path, self.data_type = str(path), data_type
        if data_type == "hf_dataset":
            loaded = datasets.load_from_disk(self.path)
            if isinstance(loaded, datasets.DatasetDict):
                if "train" not in loaded:
                    raise ValueError(f"{path}: a DatasetDict without a 'train' split (splits: {list(loaded)}); point "
                                     "data_path at one split's folder")
                loaded = loaded["train"]
        elif data_type == "parquet":
            loaded = datasets.Dataset.from_parquet(self.path)
        else:
            loaded = datasets.Dataset.from_file(self.path)
        self.dataset = loaded

    def __len__(self) -> int:
        return len(self.dataset)

    def get(self, index: int) -> Any:
        return _drop_nulls(self.dataset[int(index)])


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def open_table(path: str | Path, data_type: DataType | None = None) -> RecordTable:
    """The :class:`RecordTable` of a record file (``data_type`` None = :func:`detect_data_type`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    kind = data_type or detect_data_type(path)
    if kind == "arrow" and path.is_dir():  # lmms-engine's data_type: arrow names a save_to_disk folder
        kind = "hf_dataset"
    if kind in ("json", "jsonl") and path.is_dir():
        raise ValueError(f"{path}: a folder, not a {kind} file")
    if kind == "jsonl":
        return JsonlTable(path)
    if kind == "json":
        return JsonListTable(path)
    return ArrowTable(path, kind)


# ------------------------------------------------------------------------------------------ mixture
@dataclass
class SourceStats:
    """What one source contributed: ``records_in_file``, ``selected`` (after its sampling strategy)."""

    name: str
    path: str
    data_type: str
    sampling_strategy: str
    records_in_file: int
    selected: int


@dataclass
class MixedRecords:
    """The selected records of every source, concatenated in source order.

    ``locate(i)`` -> ``(source index, index in that source's file)``. Memory: one ``int64`` per
    selected record (plus each table's index).
    """

    sources: list[SourceConfig]
    tables: list[RecordTable]
    selections: list[np.ndarray]
    offsets: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.offsets = np.cumsum([0] + [len(s) for s in self.selections]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        source = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return source, int(self.selections[source][index - self.offsets[source]])

    def source_of(self, index: int) -> int:
        return int(np.searchsorted(self.offsets, index, side="right")) - 1

    def stats(self) -> list[SourceStats]:
        return [SourceStats(s.name, s.path, t.data_type, s.sampling_strategy, len(t), len(sel))
                for s, t, sel in zip(self.sources, self.tables, self.selections)]


def open_sources(sources: Sequence[SourceConfig], seed: int = 0) -> MixedRecords:
    """Open every source's table and apply its sampling strategy (``random`` seeded by ``seed`` and the
    source's position)."""
    tables, selections = [], []
    for k, source in enumerate(sources):
        table = open_table(source.path, source.data_type)
        tables.append(table)
        selections.append(select_indices(len(table), source.sampling_strategy, seed + k,
                                         f"source {source.name!r} ({source.path})"))
    return MixedRecords(list(sources), tables, selections)


class LazyRecords:
    """Validated records of :class:`MixedRecords`, each parsed (``records.parse_record``) when asked for.

    ``records[j]`` returns the :class:`~lmms_engine.data.records.ConversationRecord` or raises its
    :class:`~lmms_engine.data.records.BadRecordError`; ``location(j)`` names it without parsing;
    ``source_of(j)`` is its source's index. ``subset(keep)`` keeps the records at positions ``keep``.
    """

    def __init__(self, mixed: MixedRecords, *, video_token: str = "<video>", image_token: str = "<image>",
                 index: np.ndarray | None = None, videos_inside_folder: bool = False) -> None:
        self.mixed = mixed
        self.video_token = video_token
        self.image_token = image_token
        self.videos_inside_folder = videos_inside_folder  # records.parse_record's rule for video paths
        self._index = index
        self._video_folders = [Path(s.video_folder) if s.video_folder else s.media_folder for s in mixed.sources]
        self._image_folders = [Path(s.image_folder) if s.image_folder else s.media_folder for s in mixed.sources]

    def __len__(self) -> int:
        return len(self.mixed) if self._index is None else len(self._index)

    def _global(self, j: int) -> int:
        if not 0 <= j < len(self):
            raise IndexError(f"record {j} out of range for {len(self)} records")
        return j if self._index is None else int(self._index[j])

    def subset(self, keep: Sequence[int]) -> "LazyRecords":
        chosen = np.asarray([self._global(int(j)) for j in keep], dtype=np.int64)
        return LazyRecords(self.mixed, video_token=self.video_token, image_token=self.image_token, index=chosen,
                           videos_inside_folder=self.videos_inside_folder)

    def source_of(self, j: int) -> int:
        return self.mixed.source_of(self._global(j))

    def location(self, j: int) -> str:
        from lmms_engine.data.records import record_location

        source, local = self.mixed.locate(self._global(j))
        table = self.mixed.tables[source]
        return record_location(table.path, local, table.line(local))

    def __getitem__(self, j: int) -> Any:
        from lmms_engine.data.records import BadRecordError, parse_record, record_location

        source, local = self.mixed.locate(self._global(j))
        table = self.mixed.tables[source]
        where = record_location(table.path, local, table.line(local))
        obj = table.get(local)
        if isinstance(obj, RawRecordError):
            raise BadRecordError(obj.reason, where, obj.detail)
        return parse_record(obj, where, video_folder=self._video_folders[source], video_token=self.video_token,
                            index=local, videos_inside_folder=self.videos_inside_folder,
                            image_folder=self._image_folders[source], image_token=self.image_token)

    def __iter__(self) -> Any:
        for j in range(len(self)):
            yield self[j]


def first_usable_record(source: SourceConfig, *, on_bad_record: str = "raise", video_token: str = "<video>",
                        image_token: str = "<image>", videos_inside_folder: bool = False) -> Any:
    """Read ``source`` up to its first usable record and return it (cheap: the launcher calls this while
    checking a config, before any model loads; the sampling strategy is not applied).

    Raises :class:`~lmms_engine.data.records.DataFileError` when the file as a whole cannot be used or
    holds no usable record, and, with ``on_bad_record="raise"``, the first bad record's
    :class:`~lmms_engine.data.records.BadRecordError`.
    """
    from lmms_engine.data.records import BadRecordError, DataFileError, no_usable_records

    lazy = LazyRecords(open_sources([dataclasses.replace(source, sampling_strategy="all")]), video_token=video_token,
                       image_token=image_token, videos_inside_folder=videos_inside_folder)
    failures = []
    for j in range(len(lazy)):
        try:
            return lazy[j]
        except BadRecordError as err:
            if on_bad_record == "raise":
                raise
            failures.append(err)
    raise DataFileError(no_usable_records(source.path, len(failures), failures))


__all__ = [
    "DATA_TYPES",
    "LazyRecords",
    "SOURCE_KEYS",
    "ArrowTable",
    "JsonListTable",
    "JsonlTable",
    "MixedRecords",
    "RawRecordError",
    "RecordTable",
    "SourceConfig",
    "SourceStats",
    "detect_data_type",
    "first_usable_record",
    "is_mixture_file",
    "open_sources",
    "open_table",
    "parse_sampling_strategy",
    "require_datasets",
    "resolve_sources",
    "select_indices",
]
