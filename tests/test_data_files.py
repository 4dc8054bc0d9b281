"""Reading record files: text that is not UTF-8, lone surrogates, byte-order marks, and files that are
unusable as a whole; each either a skipped record naming file and line, or a ``data error:`` (exit 2)
found while the config is checked, before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmms_engine.data.dataset import load_records
from lmms_engine.data.records import BadRecordError, DataFileError
from lmms_engine.data.sources import SourceConfig, first_usable_record


def check_records_file(path: Path, **kwargs):
    """What the launcher does with each data file while checking a config."""
    return first_usable_record(SourceConfig(str(path)), **kwargs)

GOOD = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}


def good(text: str = "Hello.") -> dict:
    return {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": text}]}


def test_a_jsonl_line_that_is_not_utf8_is_skipped_and_named(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(good("one")).encode() + b"\n" + json.dumps(good("caf\xe9"), ensure_ascii=False).encode("latin-1")
                     + b"\n" + json.dumps(good("three")).encode() + b"\n")
    records, total, failures = load_records(path, on_bad_record="skip")
    assert total == 3 and [r.turns[1].text for r in records] == ["one", "three"]
    column = json.dumps(good("caf\xe9"), ensure_ascii=False).index("\xe9") + 1
    assert failures == [("invalid_text", f"{path}: record 1 (line 2): byte 0xe9 at line 2, column {column} is "
                                         f"not valid UTF-8 [invalid_text]")]
    with pytest.raises(BadRecordError, match=r"record 1 \(line 2\): byte 0xe9"):
        load_records(path)


def test_a_lone_surrogate_is_a_bad_record_not_a_tokenizer_crash(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(good()) + "\n" + '{"conversations": [{"from": "human", "value": "Hi"}, '
                    '{"from": "gpt", "value": "x\\ud800y"}]}\n')
    records, total, failures = load_records(path, on_bad_record="skip")
    assert total == 2 and len(records) == 1
    assert failures[0][0] == "invalid_text"
    assert "record 1 (line 2): conversations[1].value holds a lone surrogate '\\ud800' at character 1" \
        in failures[0][1]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_byte_order_mark_is_accepted(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    body = json.dumps([good("a"), good("b")]) if suffix == ".json" else \
        json.dumps(good("a")) + "\n" + json.dumps(good("b")) + "\n"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    records, total, failures = load_records(path)
    assert total == 2 and not failures and [r.turns[1].text for r in records] == ["a", "b"]


UNUSABLE = {
    "syntax.json": (b'[{"conversations": []},', "not valid JSON"),
    "empty.json": (b"  \n", "the file is empty"),
    "empty_list.json": (b"[]", r"an empty list \(\[\]\)"),
    "one_object.json": (json.dumps(GOOD).encode(), "holds a single JSON object"),
    "pretty_object.json": (json.dumps(GOOD, indent=2).encode(), "holds a single JSON object"),
    "latin1_list.json": (json.dumps([good("caf\xe9")], ensure_ascii=False).encode("latin-1"),
                         "byte 0xe9 at line 1, column "
                         f"{json.dumps([good('caf')]).index('caf') + 4} is not valid UTF-8"),
    "a_number.json": (b"42", "a JSON int, not a list"),
    "none_usable.jsonl": (b'{"conversations": []}\n{"vidoe": 1}\n', r"no usable records \(2 read, 2 bad"),
}


@pytest.mark.parametrize("name", sorted(UNUSABLE))
def test_unusable_files_are_data_file_errors(tmp_path, name):
    data, message = UNUSABLE[name]
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DataFileError, match=rf"{path.name}: .*{message}"):
        check_records_file(path, on_bad_record="skip")


def test_a_one_record_jsonl_file_is_fine(tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(good()) + "\n")
    assert check_records_file(path).turns[1].text == "Hello."


def test_the_launcher_reports_each_unusable_file_as_a_data_error_before_any_model_loads(tmp_path, capsys,
                                                                                      monkeypatch):
    """The CLI on every file: exit 2, ``data error:`` naming the file, no tokenizer, model or dataset
    built (the check reads the data before anything is), also with --dry-run."""
    import lmms_engine.data.dataset as dataset
    import lmms_engine.models.builder as builder
    from lmms_engine.launch.cli import main

    def forbidden(*args, **kwargs):
        raise AssertionError("a model or dataset was built before the data error")

    monkeypatch.setattr(builder, "build_model", forbidden)
    monkeypatch.setattr(dataset, "build_dataset", forbidden)
    for name in sorted(UNUSABLE):
        (tmp_path / name).write_bytes(UNUSABLE[name][0])
        config = tmp_path / f"{name}.yaml"
        config.write_text(f"- type: trainer\n  config:\n    trainer_type: sft\n    model_config: {{}}\n"
                          f"    dataset_config: {{data_path: {tmp_path / name}, on_bad_record: skip}}\n"
                          f"    output_dir: {tmp_path / 'out'}\n")
        for extra in ([], ["--dry-run"]):
            assert main(["--config", str(config), *extra]) == 2, name
            message = capsys.readouterr().err.strip().splitlines()[-1]
            assert message.startswith(f"data error: {tmp_path / name}: "), message
    assert not (tmp_path / "out").exists()


def test_video_paths_leading_outside_the_video_folder(tmp_path):
    """By default ``../`` and absolute paths are read where they point (documented); with
    ``videos_inside_folder`` they are bad records."""
    folder, outside = tmp_path / "videos", tmp_path / "elsewhere"
    folder.mkdir()
    outside.mkdir()
    for path in (folder / "in.mp4", outside / "out.mp4"):
        path.write_bytes(b"x")
    (folder / "sub").mkdir()
    rows = [dict(good(), video=v) for v in ("in.mp4", "sub/../in.mp4", "../elsewhere/out.mp4",
                                           str(outside / "out.mp4"), str(folder / "in.mp4"))]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(rows))
    records, total, failures = load_records(data, video_folder=folder)
    assert total == 5 and not failures and records[2].video == str(folder / "../elsewhere/out.mp4")
    from lmms_engine.data.dataset import DatasetConfig, open_records

    lazy, _ = open_records(DatasetConfig(data_path=str(data), video_folder=str(folder), videos_inside_folder=True),
                           "train")
    outcomes = []
    for j in range(len(lazy)):
        try:
            outcomes.append(lazy[j].index)
        except BadRecordError as err:
            outcomes.append((err.reason, err.where))
            assert "leads outside the video folder" in str(err)
    assert outcomes == [0, 1, ("video_outside_folder", f"{data}: record 2"),
                        ("video_outside_folder", f"{data}: record 3"), 4]
    # the launcher's check applies it too: a first record outside is a data error under raise
    outside_only = tmp_path / "outside.json"
    outside_only.write_text(json.dumps(rows[2:4]))
    with pytest.raises(BadRecordError, match="video_outside_folder"):
        first_usable_record(SourceConfig(str(outside_only), video_folder=str(folder)), videos_inside_folder=True)
