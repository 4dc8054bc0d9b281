"""Answer normalisation, option matching and accuracy reports (no model: answers are given)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from lmms_engine.data.demo import MOTION_QUESTION_TYPES, make_sample
from lmms_engine.eval.accuracy import (
    Prediction,
    accuracy_markdown,
    match_option,
    normalize_answer,
    score_prediction,
    score_predictions,
    write_predictions,
)


def demo_references(count: int, seed: int = 3) -> list[Prediction]:
    """References of the first ``count`` held-out demo samples, with an empty prediction."""
    refs = []
    for i in range(count):
        _, _, answer, options, qtype = make_sample("eval", i, seed, num_frames=12, size=32,
                                                   question_types=MOTION_QUESTION_TYPES)
        refs.append(Prediction(id=f"eval_{i}", prediction="", reference=answer, question_type=qtype, options=options))
    return refs


def answered(refs: list[Prediction], answer) -> list[Prediction]:
    return [Prediction(r.id, answer(r), r.reference, r.question_type, list(r.options)) for r in refs]


@pytest.mark.parametrize("text, expected", [
    ("Red.", "red"), (" the  RED ", "red"), ("An apple!", "apple"), ("left<|im_end|>", "left im end"),
    ("Ｒｅｄ", "red"), ("up-left", "up left"), ("", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize("prediction, expected", [
    ("Blue", "blue"),                  # (a) equal after normalisation
    ("B", "green"), ("(c)", "blue"), ("A.", "red"),  # (b) option letters
    ("the green one", "green"),        # (c) exactly one option named
    ("red or green", None),            # two options named: unmatched
    ("purple", None), ("D", None),     # no such option / letter out of range
])
def test_match_option(prediction, expected):
    assert match_option(prediction, ["red", "green", "blue"]) == expected


def test_letters_are_not_read_as_options_when_an_option_is_a_letter():
    assert match_option("B", ["A", "B"]) == "B"  # rule (a), not the letter rule
    assert match_option("b", ["x", "b"]) == "b"


def test_perfect_answerer_scores_one_in_every_question_type():
    refs = demo_references(24)
    _, report = score_predictions(answered(refs, lambda r: r.reference))
    assert report.overall.accuracy == 1.0 and report.overall.correct == 24
    assert set(report.by_question_type) == {"direction", "order", "next_color", "which_moves"}
    assert all(g.accuracy == 1.0 and g.num_samples == 6 for g in report.by_question_type.values())
    # the same answers given as option letters and in a sentence
    letters = answered(refs, lambda r: "ABCD"[r.options.index(r.reference)])
    sentences = answered(refs, lambda r: f"The answer is {r.reference.upper()}.")
    assert score_predictions(letters)[1].overall.accuracy == 1.0
    assert score_predictions(sentences)[1].overall.accuracy == 1.0


def test_constant_answerer_scores_the_frequency_of_its_answer():
    refs = demo_references(48)
    counts = Counter(r.reference for r in refs)
    for constant in ("red", "left", "magenta"):
        _, report = score_predictions(answered(refs, lambda r: constant))
        assert report.overall.correct == counts[constant]
        assert report.overall.accuracy == pytest.approx(counts[constant] / len(refs))
        for qtype, group in report.by_question_type.items():
            members = [r for r in refs if r.question_type == qtype]
            assert group.accuracy == pytest.approx(sum(r.reference == constant for r in members) / len(members))
    # the demo's answers are balanced: a constant direction is right a quarter of the time, the chance
    # rate of guessing among four options
    direction = report.by_question_type["direction"]
    _, report = score_predictions(answered(refs, lambda r: "up"))
    assert report.by_question_type["direction"].accuracy == 0.25 == direction.chance_accuracy
    # the majority baseline is the best constant answer
    best = max(score_predictions(answered(refs, lambda r, c=c: c))[1].overall.accuracy for c in counts)
    assert report.overall.majority_accuracy == pytest.approx(best)
    # chance: mean of 1/len(options): 12 direction questions at 1/4, 36 colour questions at 1/3
    assert report.overall.chance_accuracy == pytest.approx((12 / 4 + 36 / 3) / 48)


def test_unmatched_answers_are_counted_and_wrong():
    refs = demo_references(8)
    _, report = score_predictions(answered(refs, lambda r: "I do not know"))
    assert report.overall.correct == 0 and report.overall.unmatched == 8


def test_exact_match_without_options_and_forced_modes():
    pred = Prediction("x", "A dog.", "dog")
    assert score_prediction(pred).mode == "exact_match" and score_prediction(pred).correct
    assert not score_prediction(Prediction("y", "a big dog", "dog")).correct
    with pytest.raises(ValueError, match="no options"):
        score_prediction(pred, "multiple_choice")
    forced = score_prediction(Prediction("z", "the red one", "red", options=["red", "blue"]), "exact_match")
    assert forced.mode == "exact_match" and not forced.correct


def test_markdown_and_predictions_file(tmp_path):
    refs = demo_references(8)
    scored, report = score_predictions(answered(refs, lambda r: "red"))
    table = accuracy_markdown(report).splitlines()
    assert len(table) == 2 + 4 + 1  # header, separator, one row per type, all
    assert table[-1].startswith("| **all** | 8 | ")
    path = write_predictions(tmp_path / "p.jsonl", scored)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["id"] for r in rows] == [r.id for r in refs]
    assert sum(r["correct"] for r in rows) == report.overall.correct
    assert set(rows[0]) >= {"prediction", "reference", "question_type", "options", "matched_option", "correct"}
