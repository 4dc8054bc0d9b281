"""Conversation -> token ids and labels, through the tokenizer's own chat template.

The template renders the whole conversation once; the assistant spans are found by rendering prefixes
(``messages[:k]`` with the generation prompt is the text up to where assistant turn ``k`` begins), so
any prefix-stable template works (Qwen2's, the tiny tokenizer's). The text is cut at span and turn
boundaries and at each media placeholder (``<video>``, ``<image>``), each piece is tokenized on its own,
and the k-th placeholder becomes ``media[k]``'s count of copies of its token id.

Labels are -100 everywhere except the assistant contents and the end-of-turn token that follows each
(``<|im_end|>``: the model must learn to stop); whitespace after it (``\\n``) is not a target.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from lmms_engine.data.records import Turn
from lmms_engine.models.loss_terms import IGNORE_INDEX


@dataclass(frozen=True)
class EncodedConversation:
    """``input_ids``/``labels`` (equal lengths); ``turn_ends[k]``: token count up to the end of the k-th
    assistant turn (the lengths a turn-wise truncation may keep); ``media_spans``: ``(start, end)`` token
    positions of each placeholder's run, in order; ``video_span``: the first video's, or None."""

    input_ids: list[int]
    labels: list[int]
    turn_ends: list[int]
    video_span: tuple[int, int] | None
    media_spans: tuple[tuple[int, int], ...] = ()


def _render(tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


def video_token_id(tokenizer: Any, video_token: str) -> int:
    """The id of ``video_token`` (or any placeholder); it must be a single token known to the tokenizer."""
    ids = tokenizer(video_token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer does not have {video_token!r} as one token (it encodes to {ids}); "
                         "add it as a special token")
    return int(ids[0])


def encode_conversation(
    turns: Sequence[Turn],
    tokenizer: Any,
    *,
    video_token: str = "<video>",
    video_token_count: int = 0,
    add_generation_prompt: bool = False,
    media: Sequence[tuple[str, int]] | None = None,
) -> EncodedConversation:
    """Tokenize ``turns`` with the tokenizer's chat template; labels as in the module docstring.

    ``media``: ``(placeholder, token count)`` of each placeholder in reading order (e.g.
    ``[("<video>", 129), ("<image>", 17)]``); the rendered text must hold exactly these placeholders.
    Without it, ``video_token_count`` > 0 means one ``video_token`` of that many tokens and 0 none.
    With ``add_generation_prompt`` (generation prompts for evaluation) the text ends with the assistant
    header and nothing is labelled after the last turn.
    """
    if media is None:
        media = [(video_token, video_token_count)] if video_token_count else []
    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat_template; give it one (build_tiny_tokenizer has Qwen2's)")
    messages = [{"role": t.role, "content": t.text} for t in turns]
    full = _render(tokenizer, messages, add_generation_prompt)
    cuts = {0, len(full)}
    label_spans: list[tuple[int, int]] = []
    turn_end_chars: list[int] = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:k], True)
        upto = _render(tokenizer, messages[: k + 1], False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise ValueError("the chat template is not prefix-stable (rendering a conversation's first turns "
                             "does not give a prefix of the whole); assistant spans cannot be located")
        body = upto[len(before):]
        if not body.startswith(message["content"]):
            raise ValueError(f"the chat template rewrites assistant turn {k}'s content; cannot locate it")
        end = len(before) + len(message["content"]) + len(body[len(message["content"]):].rstrip())
        label_spans.append((len(before), end))
        turn_end_chars.append(len(upto))
        cuts.update((len(before), end, len(upto)))
    placeholders = sorted({token for token, _ in media} | {video_token})
    pattern = re.compile("|".join(re.escape(t) for t in placeholders))
    found = [(m.start(), m.end(), m.group(0)) for m in pattern.finditer(full)]
    expected = [token for token, _ in media]
    if [token for _, _, token in found] != expected:
        raise ValueError(f"the rendered conversation holds the placeholders {[t for _, _, t in found]}; expected "
                         f"{expected} (one per medium, in order)")
    media_chars = {(a, b): k for k, (a, b, _) in enumerate(found)}
    for a, b, _ in found:
        cuts.update((a, b))
    bounds = sorted(cuts)
    pieces = [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    texts = [full[a:b] for a, b in pieces if (a, b) not in media_chars]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
    token_ids = {token: video_token_id(tokenizer, token) for token in set(expected)}
    input_ids: list[int] = []
    labels: list[int] = []
    turn_ends: list[int] = []
    spans: list[tuple[int, int]] = []
    end_iter = iter(turn_end_chars)
    next_end = next(end_iter, None)
    for a, b in pieces:
        if (a, b) in media_chars:
            token, count = media[media_chars[(a, b)]]
            spans.append((len(input_ids), len(input_ids) + count))
            ids = [token_ids[token]] * count
        else:
            ids = list(next(encoded))
        labelled = any(s <= a and b <= e for s, e in label_spans)
        input_ids.extend(ids)
        labels.extend(ids if labelled else [IGNORE_INDEX] * len(ids))
        if b == next_end:
            turn_ends.append(len(input_ids))
            next_end = next(end_iter, None)
    video_span = next((span for span, (token, _) in zip(spans, media) if token == video_token), None)
    return EncodedConversation(input_ids, labels, turn_ends, video_span, tuple(spans))


__all__ = ["IGNORE_INDEX", "EncodedConversation", "encode_conversation", "video_token_id"]
