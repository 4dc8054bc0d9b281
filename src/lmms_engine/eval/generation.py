"""Batched greedy generation of answers for held-out LLaVA-format records.

Each record becomes a generation prompt (its conversation without the last assistant turn, ending
with the assistant header: :meth:`~lmms_engine.data.dataset.VideoSFTDataset.generation_sample`), the
prompts of a batch are left-padded (so every sequence ends where generation starts) and the model's
``generate`` runs greedily until an end token or ``max_new_tokens``. The reference is the record's
last assistant turn; ``question_type`` and ``options`` come from the record's metadata keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from lmms_engine.data.collator import VideoSFTCollator
from lmms_engine.eval.accuracy import Prediction

#: End-of-turn tokens that also stop generation when the tokenizer knows them as one token.
END_OF_TURN_TOKENS: tuple[str, ...] = ("<|im_end|>",)


class GenerationPrompts(Dataset):
    """``dataset.generation_sample(i)`` for the first ``limit`` records (all when None)."""

    def __init__(self, dataset: Any, limit: int | None = None) -> None:
        self.dataset = dataset
        self.size = len(dataset) if limit is None else min(limit, len(dataset))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.dataset.generation_sample(index)


@dataclass
class PromptBatch:
    """A left-padded batch of prompts: model ``inputs`` plus each sample's reference and metadata."""

    inputs: dict[str, torch.Tensor]
    references: list[str]
    metadata: list[dict[str, Any]]
    indices: list[int]

    def to(self, device: torch.device | str) -> "PromptBatch":
        self.inputs = {k: v.to(device) for k, v in self.inputs.items()}
        return self


class PromptCollator:
    """Left-pads prompts with :class:`~lmms_engine.data.collator.VideoSFTCollator` (or ``collator_cls``,
    e.g. the Qwen-VL collator); keeps references."""

    def __init__(self, pad_token_id: int, collator_cls: type = VideoSFTCollator) -> None:
        self.collator = collator_cls(pad_token_id=pad_token_id, padding_side="left")

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> PromptBatch:
        inputs = self.collator(samples)
        inputs.pop("labels")
        return PromptBatch(inputs, [s["reference"] for s in samples], [dict(s["metadata"]) for s in samples],
                           [int(s["index"]) for s in samples])


def prompt_loader(dataset: Any, tokenizer: Any, batch_size: int, *, limit: int | None = None,
                  num_workers: int = 0, collator_cls: type = VideoSFTCollator) -> DataLoader:
    """Batches of :class:`PromptBatch` over ``dataset``'s records in file order (videos decoded in
    ``num_workers`` worker processes when > 0)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return DataLoader(GenerationPrompts(dataset, limit), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, collate_fn=PromptCollator(tokenizer.pad_token_id, collator_cls))


def stop_token_ids(tokenizer: Any, model: Any | None = None) -> list[int]:
    """Token ids that end an answer: the model's generation-config EOS ids, the tokenizer's EOS and
    the chat template's end-of-turn token (``<|im_end|>``, what the engine's labels teach)."""
    ids: list[int] = []
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in ([config_eos] if isinstance(config_eos, int) else list(config_eos or [])) + [tokenizer.eos_token_id]:
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    vocab = tokenizer.get_vocab()
    for token in END_OF_TURN_TOKENS:
        if token in vocab and vocab[token] not in ids:
            ids.append(int(vocab[token]))
    if not ids:
        raise ValueError("the tokenizer has no EOS token and no <|im_end|>: generation would never stop early")
    return ids


def set_chat_generation_config(model: Any, tokenizer: Any) -> list[int]:
    """Make ``model.generation_config`` (saved as ``generation_config.json`` with every checkpoint) stop
    where the chat's answers end: ``eos_token_id`` = the end-of-turn token first (``<|im_end|>``), then
    the other :func:`stop_token_ids`; ``pad_token_id`` = the tokenizer's. Plain transformers'
    ``generate`` (and lmms-eval on top of it) then ends each answer as training taught. Returns the ids."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return []
    ids = stop_token_ids(tokenizer, model)
    vocab = tokenizer.get_vocab()
    turn_ends = [int(vocab[t]) for t in END_OF_TURN_TOKENS if t in vocab]
    ids = turn_ends + [i for i in ids if i not in turn_ends]
    config.eos_token_id = ids if len(ids) > 1 else ids[0]
    if tokenizer.pad_token_id is not None:
        config.pad_token_id = int(tokenizer.pad_token_id)
    return ids


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: Any,
    batch: PromptBatch,
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
) -> list[str]:
    """Greedy answers (decoded, special tokens skipped, whitespace stripped) for one batch already on
    the model's device."""
    inputs = batch.inputs
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=list(stop_ids),
        pad_token_id=tokenizer.pad_token_id,
    )
    new_tokens = output[:, inputs["input_ids"].shape[1]:]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def to_predictions(batch: PromptBatch, answers: Sequence[str]) -> list[Prediction]:
    """Pair a batch's answers with its references and metadata (``id`` falls back to the record index)."""
    preds = []
    for answer, reference, meta, index in zip(answers, batch.references, batch.metadata, batch.indices):
        options = meta.get("options") or []
        preds.append(Prediction(
            id=str(meta.get("id", index)),
            prediction=answer,
            reference=reference,
            question_type=meta.get("question_type"),
            options=[str(o) for o in options],
        ))
    return preds


__all__ = ["END_OF_TURN_TOKENS", "GenerationPrompts", "PromptBatch", "PromptCollator", "generate_answers",
           "prompt_loader", "stop_token_ids", "to_predictions"]
