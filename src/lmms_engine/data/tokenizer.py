"""A tiny byte-level BPE tokenizer trained on the fly: tests and the quickstart run fully offline.

It behaves like Qwen2's tokenizer where the engine depends on it: byte-level BPE (any text encodes,
nothing is unknown), the special tokens ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>``
(eos: the end of an assistant turn, as in Qwen2-Instruct, so ``generate`` stops where answers end),
``<video>``, ``<image>``, and a Qwen2-style chat template::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n...<|im_end|>\\n

It saves with ``save_pretrained`` and reloads with ``AutoTokenizer.from_pretrained(dir)``.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VIDEO_TOKEN = "<video>"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, IM_START, IM_END, VIDEO_TOKEN, IMAGE_TOKEN)

# Qwen2's own template (default system prompt when the conversation has none), string content only.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Enough English to learn useful merges for chat text and the demo task's questions and answers.
DEFAULT_CORPUS: tuple[str, ...] = (
    "You are a helpful assistant.",
    "system user assistant",
    "Describe this video. This is a video about a red square moving to the left.",
    "In which direction does the shape move? Answer with left, right, up or down.",
    "The shape moves left. The shape moves right. The shape moves up. The shape moves down.",
    "Which colour appears first? The red circle appears first, then the blue square, then the green one.",
    "What comes next? Where will the shape be in the next frame? Answer with one word.",
    "Options: A. left B. right C. up D. down. Answer with the option's letter from the given choices.",
    "red green blue yellow white black orange purple cyan magenta circle square triangle",
    "The video lasts for 4.00 seconds, and 8 frames are uniformly sampled from it. "
    "These frames are located at 0.00s,0.50s,1.00s,1.50s,2.00s,2.50s,3.00s,3.50s. "
    "Please answer the following questions related to this video.",
    "first second third last before after then next appears disappears moves stays",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 yes no A B C D",
    # the demo dataset's questions (lmms_engine.data.demo)
    "In which direction does the cyan triangle move? Options: left, right, up, down. Answer with one word.",
    "Three shapes appear one after another. Which colour appears last? Options: magenta, yellow, green. "
    "Answer with one word.",
    "The circle changes colour in a repeating cycle. Which colour comes next? Options: red, cyan, blue. "
    "Answer with one word.",
    "Which colour is the shape that moves? Options: yellow, magenta, cyan. Answer with one word.",
)


def build_tiny_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 1024, *,
                         special_tokens: Sequence[str] = SPECIAL_TOKENS,
                         chat_template: str = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``corpus`` (default: a built-in English snippet set).

    ``vocab_size`` counts the 256 byte symbols and the special tokens; training stops early when the
    corpus has no more merges, so ``len(tokenizer)`` may be smaller. Deterministic for a given corpus.
    Returns a ``PreTrainedTokenizerFast`` with pad ``<|endoftext|>``, eos ``<|im_end|>`` (when among the
    special tokens, else ``<|endoftext|>``) and a Qwen2-style chat template. ``special_tokens`` (ids 0, 1,
    ... in this order; ``<|endoftext|>`` first) and ``chat_template`` replace the defaults (the Qwen-VL
    tiny checkpoints use Qwen's vision tokens).
    """
    special_tokens = list(special_tokens)
    if not special_tokens or special_tokens[0] != PAD_TOKEN:
        raise ValueError(f"special_tokens must start with {PAD_TOKEN!r} (the pad token), got {special_tokens[:1]}")
    if vocab_size < 256 + len(special_tokens):
        raise ValueError(f"vocab_size must be >= {256 + len(special_tokens)} (256 bytes + special tokens), "
                         f"got {vocab_size}")
    texts = list(DEFAULT_CORPUS if corpus is None else corpus)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END if IM_END in special_tokens else PAD_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=special_tokens[1:],
        padding_side="right",
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = chat_template
    return tokenizer


__all__ = ["CHAT_TEMPLATE", "IMAGE_TOKEN", "IM_END", "IM_START", "PAD_TOKEN", "SPECIAL_TOKENS", "VIDEO_TOKEN",
           "build_tiny_tokenizer"]
