"""Data sources: lists of files, LLaVA-NeXT / lmms-engine mixtures, sampling strategies, lazy reading,
Parquet / Arrow / ``datasets`` folders, per-source counts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from lmms_engine.data import records as records_module
from lmms_engine.data.dataset import build_dataset
from lmms_engine.data.preprocess import ProcessorInfo
from lmms_engine.data.sources import JsonlTable, open_table, resolve_sources, select_indices
from lmms_engine.data.tokenizer import build_tiny_tokenizer
from lmms_engine.utils.config import ConfigError

INFO = ProcessorInfo(image_size=64, patch_size=8)


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def text_record(i: int) -> dict:
    return {"id": f"r{i}", "conversations": [{"from": "human", "value": f"Question {i}?"},
                                             {"from": "gpt", "value": f"Answer {i}."}]}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def ids(ds) -> list[str]:
    """The ``id`` of every record the dataset serves, in order (parsed records, nothing decoded)."""
    return [ds.records[j].metadata["id"] for j in range(len(ds))]


@pytest.mark.parametrize("strategy, expected", [
    ("all", list(range(10))), ("first:3", [0, 1, 2]), ("first:25%", [0, 1, 2]),  # ceil(2.5) = 3, as LLaVA-NeXT
    ("end:2", [8, 9]), ("end:10%", [9]), ("first:100%", list(range(10))),
])
def test_sampling_strategies_select_exact_records(strategy, expected):
    assert select_indices(10, strategy, seed=0, where="s").tolist() == expected


def test_random_sampling_is_seeded_sorted_and_uniform():
    a = select_indices(1000, "random:10%", seed=3, where="s")
    assert a.tolist() == select_indices(1000, "random:10%", seed=3, where="s").tolist()
    assert len(a) == 100 and len(set(a.tolist())) == 100 and a.tolist() == sorted(a.tolist())
    assert a.tolist() != select_indices(1000, "random:10%", seed=4, where="s").tolist()
    assert len(select_indices(50, "random:7", seed=0, where="s")) == 7
    # uniform: over many seeds every record is picked about 10% of the time
    hits = np.zeros(100)
    for seed in range(400):
        hits[select_indices(100, "random:10%", seed=seed, where="s")] += 1
    assert hits.min() > 20 and hits.max() < 65  # mean 40; binomial sd ~6


@pytest.mark.parametrize("strategy, message", [
    ("first", "not valid"), ("top:3", "not valid"), ("first:0", "count must be a whole number >= 1"),
    ("first:1.5", "count must be a whole number"), ("end:150%", r"percentage must be in \(0, 100\]"),
    ("first:11", "asks for 11 records but the source has 10"),
])
def test_bad_sampling_strategies_are_config_errors(strategy, message):
    with pytest.raises(ConfigError, match=message):
        select_indices(10, strategy, seed=0, where="source 'a'")


def test_yaml_mixture_counts_folders_and_report(tok, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "a.jsonl", [text_record(i) for i in range(10)])
    (data / "b.json").write_text(json.dumps([text_record(100 + i) for i in range(20)]))
    clips = tmp_path / "clips"
    clips.mkdir()
    mixture = data / "mix.yaml"
    mixture.write_text(f"""
datasets:
  - json_path: a.jsonl              # relative to the mixture file's folder
    sampling_strategy: "end:30%"
  - json_path: {data / 'b.json'}
    sampling_strategy: "random:25%"
    video_folder: {clips}
""")
    ds = build_dataset({"data_path": str(mixture), "sampling_seed": 7}, tok, INFO)
    picked = select_indices(20, "random:25%", seed=7 + 1, where="b").tolist()
    assert ids(ds) == ["r7", "r8", "r9"] + [f"r{100 + i}" for i in picked]
    assert ids(build_dataset({"data_path": str(mixture), "sampling_seed": 7}, tok, INFO)) == ids(ds)
    sources = resolve_sources(str(mixture))
    assert [s.video_folder for s in sources] == [None, str(clips)] and sources[0].name == "a.jsonl"
    report = ds.bad_record_report()
    assert [(s["name"], s["records_in_file"], s["selected"], s["skipped"]) for s in report.sources] == [
        ("a.jsonl", 10, 3, 0), ("b.json", 20, 5, 0)]
    assert "source a.jsonl: 3 of 10 records (end:30%), 0 skipped" in str(report)


def test_lmms_engine_keys_json_mixture_and_lists(tok, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [text_record(i) for i in range(4)])
    write_jsonl(tmp_path / "b.jsonl", [text_record(10 + i) for i in range(4)])
    media = tmp_path / "media"
    media.mkdir()
    mixture = tmp_path / "mix.json"
    mixture.write_text(json.dumps({"datasets": [
        {"path": "a.jsonl", "data_folder": str(media), "data_type": "jsonl", "name": "first"},
        {"json_path": "b.jsonl", "sampling_strategy": "first:1"}]}))
    sources = resolve_sources(str(mixture))
    assert [(s.name, s.video_folder, s.image_folder, s.data_type) for s in sources] == [
        ("first", str(media), str(media), "jsonl"), ("b.jsonl", None, None, None)]
    assert ids(build_dataset({"data_path": str(mixture)}, tok, INFO)) == ["r0", "r1", "r2", "r3", "r10"]
    listed = build_dataset({"data_path": [str(tmp_path / "b.jsonl"), str(tmp_path / "a.jsonl")]}, tok, INFO)
    assert ids(listed) == ["r10", "r11", "r12", "r13", "r0", "r1", "r2", "r3"]


@pytest.mark.parametrize("entry, message", [
    ({"json_path": "a.jsonl", "sampling_stratgy": "all"}, r"unknown key 'sampling_stratgy' \(did you mean "
                                                          r"'sampling_strategy'\?\)"),
    ({"json_path": "a.jsonl", "path": "a.jsonl"}, "exactly one of json_path"),
    ({"json_path": "nope.jsonl"}, r"datasets\[0\]\.json_path: 'nope.jsonl' does not exist"),
    ({"json_path": "a.jsonl", "sampling_strategy": "first:x"}, "sampling_strategy 'first:x' is not valid"),
    ({"json_path": "a.jsonl", "data_type": "csv"}, "data_type: 'csv' is not valid"),
    ({"json_path": "a.jsonl", "video_folder": "missing"}, r"video_folder: 'missing' does not exist"),
])
def test_mixture_errors_name_the_entry_and_key(tmp_path, entry, message):
    write_jsonl(tmp_path / "a.jsonl", [text_record(0)])
    mixture = tmp_path / "mix.yaml"
    mixture.write_text(json.dumps({"datasets": [entry]}))
    with pytest.raises(ConfigError, match=message):
        resolve_sources(str(mixture))


def test_jsonl_is_indexed_without_parsing(tok, tmp_path, monkeypatch):
    lines = [json.dumps(text_record(i)) for i in range(2000)]
    lines[1500] = '{"conversations": [oops'  # broken far down: found only when that record is loaded
    path = tmp_path / "big.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\n\n".join(lines).encode() + b"\n  \n")
    parsed = []
    real = records_module.parse_record
    monkeypatch.setattr(records_module, "parse_record", lambda *a, **k: parsed.append(1) or real(*a, **k))
    ds = build_dataset({"data_path": str(path), "on_bad_record": "skip"}, tok, INFO)
    assert len(ds) == 2000 and parsed == []  # nothing parsed at build
    table = ds.records.mixed.tables[0]
    assert isinstance(table, JsonlTable) and table.starts.dtype == np.int64
    assert table.line(1999) == 3999  # blank lines between records are skipped, numbering kept
    assert ds[1999]["index"] == 1999 and len(parsed) == 1
    assert ds[1500]["index"] == 1501  # the broken line is replaced by the next record
    report = ds.bad_record_report()
    assert report.counts == {"invalid_json": 1}
    assert report.records[0]["where"] == f"{path}: record 1500 (line 3001)"


def test_non_utf8_line_is_one_bad_record(tok, tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = json.dumps(text_record(0)).encode()
    path.write_bytes(good + b"\n" + json.dumps(text_record(1)).encode().replace(b"Answer", b"R\xe9ponse") + b"\n")
    ds = build_dataset({"data_path": str(path), "on_bad_record": "skip", "check_records": "at_start"}, tok, INFO)
    assert ds.bad_record_report().counts == {"invalid_text": 1}
    assert "byte 0xe9 at line 2" in ds.bad_record_report().records[0]["message"]


def test_empty_and_malformed_files_are_clear_errors(tok, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty.jsonl: the file is empty"):
        build_dataset({"data_path": str(tmp_path / "empty.jsonl")}, tok, INFO)
    (tmp_path / "broken.json").write_text('[{"a": 1}, {"b": ]')
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        open_table(tmp_path / "broken.json")


def test_parquet_arrow_and_datasets_folders_give_the_same_samples(tok, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [text_record(i) for i in range(6)]
    rows[2] = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi?"}]},
                            {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]}], "id": "r2"}
    jsonl = write_jsonl(tmp_path / "rows.jsonl", rows)
    table = datasets.Dataset.from_json(str(jsonl))  # unified schema: every row has every column (nulls)
    table.to_parquet(str(tmp_path / "rows.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    reference = build_dataset({"data_path": str(jsonl)}, tok, INFO)
    for path in (tmp_path / "rows.parquet", arrow, tmp_path / "saved"):
        ds = build_dataset({"data_path": str(path)}, tok, INFO)
        assert len(ds) == 6
        for i in range(6):
            assert ds[i]["input_ids"].tolist() == reference[i]["input_ids"].tolist(), (path, i)
    assert [s["data_type"] for s in build_dataset({"data_path": [str(arrow), str(tmp_path / "saved")]}, tok,
                                                  INFO).bad_record_report().sources] == ["arrow", "hf_dataset"]
    mixture = tmp_path / "mix.yaml"  # lmms-engine's keys: data_type arrow on a save_to_disk folder
    mixture.write_text(f"datasets:\n  - path: {tmp_path / 'saved'}\n    data_type: arrow\n")
    assert len(build_dataset({"data_path": str(mixture)}, tok, INFO)) == 6


def test_missing_datasets_library_names_the_extra(tok, tmp_path, monkeypatch):
    (tmp_path / "rows.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"needs the `datasets` library: pip install 'lmms-video\[datasets\]'"):
        build_dataset({"data_path": str(tmp_path / "rows.parquet")}, tok, INFO)


def test_the_launcher_checks_mixture_entries_before_any_model(tmp_path):
    from lmms_engine.launch.config import check_pipeline

    write_jsonl(tmp_path / "a.jsonl", [text_record(0)])
    mixture = tmp_path / "mix.yaml"
    mixture.write_text("datasets:\n  - json_path: a.jsonl\n  - json_path: gone.jsonl\n    sampling_strategy: all\n")
    raw = [{"type": "trainer", "config": {"trainer_type": "sft", "output_dir": str(tmp_path / "out"),
                                          "dataset_config": {"data_path": str(mixture)}}}]
    with pytest.raises(ConfigError, match=r"data_path: .*mix.yaml: datasets\[1\]\.json_path: 'gone.jsonl' does not "
                                          r"exist"):
        check_pipeline(raw, "run.yaml")
    raw[0]["config"]["dataset_config"]["data_path"] = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    with pytest.raises(ConfigError, match=r"data_path\[1\]: file '.*b.jsonl' does not exist"):
        check_pipeline(raw, "run.yaml")
