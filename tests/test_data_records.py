"""Record parsing: both record forms, placeholder rules, and every kind of bad record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmms_engine.data.dataset import load_records
from lmms_engine.data.records import BAD_RECORD_REASONS, BadRecordError, Turn, parse_record


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "a.mp4").write_bytes(b"x")  # parsing only checks that the file exists
    return tmp_path


def parse(obj, folder, **kw):
    return parse_record(obj, "data.json: record 7", video_folder=folder, **kw)


def llava(video="clips/a.mp4", first="<video>\nWhat moves?", **extra):
    record = {"conversations": [{"from": "human", "value": first}, {"from": "gpt", "value": "The red one."}]}
    if video is not None:
        record["video"] = video
    record.update(extra)
    return record


def test_llava_record(folder):
    rec = parse(llava(id="x1", question_type="direction", answer="left", options=["left", "right"]), folder)
    assert rec.turns == (Turn("user", "<video>\nWhat moves?"), Turn("assistant", "The red one."))
    assert rec.video == str(folder / "clips" / "a.mp4")
    assert rec.metadata == {"id": "x1", "question_type": "direction", "answer": "left",
                            "options": ["left", "right"]}
    assert (rec.video_start, rec.video_end) == (None, None)


def test_openai_record_equals_llava(folder):
    openai = {"messages": [
        {"role": "user", "content": [{"type": "video_url", "video_url": {"url": "clips/a.mp4"}},
                                     {"type": "text", "text": "What moves?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "The red one."}]}]}
    assert parse(openai, folder) == parse(llava(), folder)
    # string content, video after the text, times inside the video part
    openai2 = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "What moves?"},
                                     {"type": "video_url", "video_url": {"url": "file://clips/a.mp4"},
                                      "video_start": 1, "video_end": 2.5}]},
        {"role": "assistant", "content": "The red one."}]}
    rec = parse(openai2, folder)
    assert rec.turns == parse(llava(), folder).turns
    assert (rec.video_start, rec.video_end) == (1.0, 2.5)


def test_placeholder_is_added_and_moved_to_the_first_user_turn(folder):
    assert parse(llava(first="What moves?"), folder).turns[0].text == "<video>\nWhat moves?"
    assert parse(llava(first="What moves? <video>"), folder).turns[0].text == "<video>\nWhat moves?"
    multi = {"conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi"},
        {"from": "human", "value": "<video>\nAnd this?"}, {"from": "gpt", "value": "A square."}],
        "video": "clips/a.mp4"}
    rec = parse(multi, folder)
    assert [t.text for t in rec.turns] == ["Be brief.", "<video>\nHello", "Hi", "And this?", "A square."]
    assert [t.role for t in rec.turns] == ["system", "user", "assistant", "user", "assistant"]


def test_text_only_and_absolute_paths(folder):
    rec = parse(llava(video=None, first="Hi"), folder)
    assert rec.video is None and rec.turns[0].text == "Hi"
    rec = parse(llava(video=str(folder / "clips" / "a.mp4")), Path("/nonexistent"))
    assert rec.video == str(folder / "clips" / "a.mp4")


BAD = {
    "not_an_object": ["not a record"],
    "unknown_field": llava(vidoe="clips/a.mp4"),
    "no_conversation": {"video": "clips/a.mp4"},
    "empty_conversation": llava() | {"conversations": []},
    "bad_turn": {"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "x"}]},
    "wrong_role_order": {"conversations": [{"from": "gpt", "value": "Hi"}, {"from": "human", "value": "x"}]},
    "bad_field": llava(video_start=-1),
    "placeholder_without_video": llava(video=None),
    "placeholder_without_image": llava(first="<image>\n<video>\nTwo?"),
    "placeholder_count": llava(first="<video><video>\nTwo?"),
    "missing_video": llava(video="clips/missing.mp4"),
    "missing_image": llava() | {"image": "clips/gone.png"},
}


@pytest.mark.parametrize("reason", sorted(BAD))
def test_each_bad_record_kind_names_the_record_and_reason(folder, reason):
    with pytest.raises(BadRecordError) as info:
        parse(BAD[reason], folder)
    assert info.value.reason == reason
    assert str(info.value).startswith("data.json: record 7: ")
    assert reason in BAD_RECORD_REASONS


def test_bad_record_messages_are_specific(folder):
    with pytest.raises(BadRecordError, match=r"unknown key 'vidoe' \(did you mean 'video'\?\)"):
        parse(BAD["unknown_field"], folder)
    with pytest.raises(BadRecordError, match=r"roles \['assistant', 'user'\]"):
        parse(BAD["wrong_role_order"], folder)
    with pytest.raises(BadRecordError, match="clips/missing.mp4' does not exist"):
        parse(BAD["missing_video"], folder)
    with pytest.raises(BadRecordError, match=r"turn 1 \(assistant\) is empty"):
        parse({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": " "}]}, folder)
    ends_with_user = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"},
                                        {"from": "human", "value": "More?"}]}
    with pytest.raises(BadRecordError) as info:
        parse(ends_with_user, folder)
    assert info.value.reason == "wrong_role_order"
    with pytest.raises(BadRecordError, match=r"'<video>' appears 2 time\(s\) but the record has 1 video"):
        parse(BAD["placeholder_count"], folder)
    two_ranges = llava(video=["clips/a.mp4", "clips/a.mp4"], first="<video><video>\nTwo?", video_start=1)
    with pytest.raises(BadRecordError, match="top-level video_start/video_end with 2 videos"):
        parse(two_ranges, folder)


def test_several_videos_and_images_in_tag_order(folder):
    (folder / "clips" / "b.mp4").write_bytes(b"x")
    (folder / "clips" / "p.png").write_bytes(b"x")
    clip = lambda name: str(folder / "clips" / name)  # noqa: E731
    mixed = llava(video=["clips/a.mp4", "clips/b.mp4"], first="Compare <video> with <image> and <video>.",
                  image="clips/p.png")
    rec = parse(mixed, folder)
    assert [(m.kind, m.path) for m in rec.media] == [("video", clip("a.mp4")), ("image", clip("p.png")),
                                                     ("video", clip("b.mp4"))]
    assert rec.turns[0].text == "Compare <video> with <image> and <video>."  # tags stay where they are
    assert rec.video == clip("a.mp4") and len(rec.videos) == 2 and len(rec.images) == 1
    # no tags: one per medium at the start of the first user turn, videos first
    rec = parse(llava(video=["clips/a.mp4", "clips/b.mp4"], first="Which?", image=["clips/p.png"]), folder)
    assert rec.turns[0].text == "<video>\n<video>\n<image>\nWhich?"
    assert [m.kind for m in rec.media] == ["video", "video", "image"]
    # an image folder of its own
    images = folder / "images"
    images.mkdir()
    (images / "q.png").write_bytes(b"x")
    rec = parse(llava(video=None, first="<image>\nWhat?", image="q.png"), folder, image_folder=images)
    assert rec.media[0].path == str(images / "q.png") and rec.video is None
    # OpenAI and HF parts, in order, each range in its part
    openai = {"messages": [
        {"role": "user", "content": [{"type": "image", "image": "clips/p.png"},
                                     {"type": "video", "video": "clips/a.mp4", "video_start": 0.5},
                                     {"type": "image_url", "image_url": {"url": "file://clips/p.png"}},
                                     {"type": "video_url", "video_url": {"url": "clips/b.mp4"}, "video_end": 2},
                                     {"type": "text", "text": "Order?"}]},
        {"role": "assistant", "content": "Two of each."}]}
    rec = parse(openai, folder)
    assert [(m.kind, m.start, m.end) for m in rec.media] == [("image", None, None), ("video", 0.5, None),
                                                             ("image", None, None), ("video", None, 2.0)]
    assert rec.turns[0].text == "<image>\n<video>\n<image>\n<video>\nOrder?"


def test_load_records_jsonl_raise_and_skip(folder):
    lines = [json.dumps(llava()), "", "{not json", json.dumps(BAD["unknown_field"]), json.dumps(llava(video=None,
                                                                                                     first="Hi"))]
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadRecordError, match=r"data.jsonl: record 1 \(line 3\): invalid JSON"):
        load_records(path)
    records, total, failures = load_records(path, on_bad_record="skip")
    assert total == 4 and [r.index for r in records] == [0, 3]
    assert [reason for reason, _ in failures] == ["invalid_json", "unknown_field"]
    assert "data.jsonl: record 2 (line 4): unknown key 'vidoe'" in failures[1][1]
    # the default video folder is the data file's folder
    assert records[0].video == str((folder / "clips" / "a.mp4").resolve())


def test_load_records_json_list_and_video_folder(folder, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere")
    path = other / "data.json"
    path.write_text(json.dumps([llava(), llava(video=None, first="Hi")]))
    with pytest.raises(BadRecordError, match="missing_video"):
        load_records(path)
    records, total, failures = load_records(path, video_folder=folder)
    assert total == 2 and not failures and records[0].video == str(folder / "clips" / "a.mp4")
    (other / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        load_records(other / "broken.json")
