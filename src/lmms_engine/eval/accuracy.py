"""Scoring generated answers: normalisation, exact match, multiple choice, per-question-type tables.

Answer normalisation (:func:`normalize_answer`), applied to predictions, references and options alike:

1. Unicode NFKC, lower case;
2. every character that is not a letter or a digit becomes a space (punctuation, quotes, ``<|...|>``
   remnants);
3. the articles ``a``, ``an``, ``the`` are dropped (SQuAD's rule);
4. runs of whitespace collapse to one space, ends stripped.

So ``"Red."``, ``" the red "`` and ``"RED"`` all normalise to ``"red"``.

Scoring of one sample:

- **multiple choice** (the record has ``options``): the prediction is mapped to one option, then that
  option is compared with the reference (both normalised). The mapping, first rule that applies:
  (a) the normalised prediction equals a normalised option; (b) the stripped raw prediction is an
  option letter (``B``, ``(B)``, ``B.``, ``B)``: ``A`` is the first option) and no option is itself a
  single letter; (c) exactly one option occurs in the normalised prediction as whole words
  (``"the red one"`` -> ``red``). Otherwise the prediction is *unmatched* and counts as wrong
  (several options mentioned is unmatched too: no credit for hedging).
- **exact match** (no options): normalised prediction == normalised reference.

Baselines reported beside each accuracy, computed from the references alone:
``chance_accuracy`` = mean over samples of ``1 / len(options)`` (uniform guessing among the options;
exact-match samples count 0), and ``majority_accuracy`` = the accuracy of always answering the most
frequent normalised reference of that group.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

ScoringMode = Literal["auto", "exact_match", "multiple_choice"]
NO_TYPE = "(none)"
_ARTICLES = frozenset({"a", "an", "the"})
_LETTER = re.compile(r"^\(?([A-Za-z])[\).:]?$")


def normalize_answer(text: str) -> str:
    """The normalised form of an answer (module docstring): ``" The Red."`` -> ``"red"``."""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    # Letters outside a-z (accents, other scripts) survive NFKC; keep them as word characters.
    text = "".join(ch if ch.isalnum() else " " for ch in text)
    words = [w for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def match_option(prediction: str, options: Sequence[str]) -> str | None:
    """The option ``prediction`` designates (rules (a)-(c) of the module docstring), or None."""
    if not options:
        return None
    normalized = [normalize_answer(o) for o in options]
    pred = normalize_answer(prediction)
    for option, norm in zip(options, normalized):
        if pred == norm:
            return option
    letter = _LETTER.match(prediction.strip())
    if letter and not any(len(n) == 1 for n in normalized):
        index = ord(letter.group(1).upper()) - ord("A")
        if 0 <= index < len(options):
            return options[index]
    padded = f" {pred} "
    found = [o for o, n in zip(options, normalized) if n and f" {n} " in padded]
    return found[0] if len(found) == 1 else None


@dataclass
class Prediction:
    """One generated answer with what scoring needs.

    ``options`` empty = exact-match sample. ``question_type`` None = no type (grouped as ``(none)``).
    """

    id: str
    prediction: str
    reference: str
    question_type: str | None = None
    options: list[str] = field(default_factory=list)


@dataclass
class ScoredPrediction(Prediction):
    """A :class:`Prediction` with its verdict: ``mode`` (``multiple_choice``/``exact_match``),
    ``matched_option`` (multiple choice; None = unmatched) and ``correct``."""

    mode: str = "exact_match"
    matched_option: str | None = None
    correct: bool = False


def score_prediction(pred: Prediction, scoring: ScoringMode = "auto") -> ScoredPrediction:
    """Score one prediction; ``scoring="auto"`` = multiple choice when the sample has options."""
    if scoring not in ("auto", "exact_match", "multiple_choice"):
        raise ValueError(f"scoring must be 'auto', 'exact_match' or 'multiple_choice', got {scoring!r}")
    mode = "multiple_choice" if (scoring == "multiple_choice" or (scoring == "auto" and pred.options)) \
        else "exact_match"
    if mode == "multiple_choice":
        if not pred.options:
            raise ValueError(f"sample {pred.id!r}: scoring='multiple_choice' but the record has no options")
        matched = match_option(pred.prediction, pred.options)
        correct = matched is not None and normalize_answer(matched) == normalize_answer(pred.reference)
    else:
        matched = None
        correct = normalize_answer(pred.prediction) == normalize_answer(pred.reference)
    return ScoredPrediction(**asdict(pred), mode=mode, matched_option=matched, correct=correct)


@dataclass
class GroupScore:
    """Accuracy of one group of samples (all of them, or one question type)."""

    num_samples: int
    correct: int
    accuracy: float
    chance_accuracy: float
    majority_accuracy: float
    majority_answer: str
    unmatched: int  # multiple-choice predictions that designate no single option


def _group(scored: Sequence[ScoredPrediction]) -> GroupScore:
    n = len(scored)
    correct = sum(s.correct for s in scored)
    chance = sum(1.0 / len(s.options) for s in scored if s.mode == "multiple_choice") / n
    counts = Counter(normalize_answer(s.reference) for s in scored)
    majority, majority_count = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    unmatched = sum(s.mode == "multiple_choice" and s.matched_option is None for s in scored)
    return GroupScore(n, correct, correct / n, chance, majority_count / n, majority, unmatched)


@dataclass
class AccuracyReport:
    """Overall and per-question-type accuracy; ``scoring``: how many samples each mode scored."""

    overall: GroupScore
    by_question_type: dict[str, GroupScore]
    scoring: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def accuracy_report(scored: Sequence[ScoredPrediction]) -> AccuracyReport:
    """Group scored predictions into an :class:`AccuracyReport` (question types sorted by name)."""
    if not scored:
        raise ValueError("no predictions to score")
    groups: dict[str, list[ScoredPrediction]] = {}
    for s in scored:
        groups.setdefault(s.question_type or NO_TYPE, []).append(s)
    modes = Counter(s.mode for s in scored)
    return AccuracyReport(
        overall=_group(scored),
        by_question_type={name: _group(groups[name]) for name in sorted(groups)},
        scoring={"multiple_choice": modes.get("multiple_choice", 0), "exact_match": modes.get("exact_match", 0)},
    )


def score_predictions(predictions: Iterable[Prediction], scoring: ScoringMode = "auto",
                      ) -> tuple[list[ScoredPrediction], AccuracyReport]:
    """Score every prediction and build the report."""
    scored = [score_prediction(p, scoring) for p in predictions]
    return scored, accuracy_report(scored)


# ---------------------------------------------------------------------------------------------- writers
def accuracy_verdict(group: GroupScore | Mapping[str, Any]) -> str:
    """A plain-words reading of a group's accuracy against chance, with its binomial standard error
    under guessing (``sqrt(p (1 - p) / n)``): "well above" at 3 or more standard errors."""
    g = asdict(group) if isinstance(group, GroupScore) else dict(group)
    n, accuracy, chance = int(g["num_samples"]), float(g["accuracy"]), float(g["chance_accuracy"])
    if n == 0:
        return "no samples: nothing to judge"
    se = math.sqrt(max(chance * (1 - chance), 1e-12) / n)
    z = (accuracy - chance) / se
    if z >= 3:
        return (f"learned: accuracy {accuracy:.3f} is well above chance {chance:.3f} "
                f"({z:.0f} standard errors over {n} held-out samples)")
    if z >= 2:
        return f"barely above chance: accuracy {accuracy:.3f} against {chance:.3f} ({z:.1f} standard errors)"
    return (f"not learned: accuracy {accuracy:.3f} is at chance {chance:.3f}; the answers do not depend on "
            f"the videos yet (majority answer {g['majority_answer']!r} alone scores {float(g['majority_accuracy']):.3f})")


def accuracy_markdown(report: AccuracyReport | dict[str, Any]) -> str:
    """A markdown table: one row per question type, then ``all``."""
    data = report.to_dict() if isinstance(report, AccuracyReport) else report
    lines = [
        "| question type | samples | correct | accuracy | chance | majority answer | unmatched |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    rows = list(data["by_question_type"].items()) + [("**all**", data["overall"])]
    for name, g in rows:
        lines.append(f"| {name} | {g['num_samples']} | {g['correct']} | {g['accuracy']:.3f} | "
                     f"{g['chance_accuracy']:.3f} | {g['majority_accuracy']:.3f} ({g['majority_answer']}) | "
                     f"{g['unmatched']} |")
    return "\n".join(lines)


def write_predictions(path: str | Path, scored: Sequence[ScoredPrediction]) -> Path:
    """One JSON object per line: id, question_type, prediction, reference, options, verdict."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for s in scored:
            f.write(json.dumps(asdict(s), ensure_ascii=False) + "\n")
    return path


__all__ = ["AccuracyReport", "GroupScore", "NO_TYPE", "Prediction", "ScoredPrediction", "ScoringMode",
           "accuracy_markdown", "accuracy_report", "accuracy_verdict", "match_option", "normalize_answer", "score_prediction",
           "score_predictions", "write_predictions"]
