"""The tiny BPE tokenizer: special tokens, Qwen2-style chat template, offline save/reload."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lmms_engine.data.tokenizer import SPECIAL_TOKENS, build_tiny_tokenizer

TEXTS = [
    "In which direction does the red circle move? Options: left, right, up, down.",
    "Ünïcödé, emoji \U0001F600 and tabs\tare bytes too",
    "<video>\nDescribe this video.<|im_end|>",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


def test_special_tokens_are_single_tokens(tokenizer):
    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    for token, token_id in zip(SPECIAL_TOKENS, ids):
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [token_id]
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token == "<|im_end|>"  # where assistant turns end: generation stops there
    assert tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    # a placeholder inside text stays one token, never split into '<', 'video', '>'
    ids = tokenizer("see <video>\nnow", add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids("<video>")) == 1


def test_byte_level_round_trip(tokenizer):
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id is None


def test_qwen2_chat_template(tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n")
    with_system = [{"role": "system", "content": "Be brief."}] + messages[:1]
    assert tokenizer.apply_chat_template(with_system, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_vocab_size_and_determinism():
    small = build_tiny_tokenizer(vocab_size=300)
    assert len(small) <= 300
    a, b = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    custom = build_tiny_tokenizer(corpus=["zebra zebra zebra quagga"] * 5)
    assert len(custom("zebra", add_special_tokens=False)["input_ids"]) == 1
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_tokenizer(vocab_size=100)


def test_save_and_reload_offline(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.get_vocab() == tokenizer.get_vocab()
    for text in TEXTS:
        assert reloaded(text, add_special_tokens=False)["input_ids"] == \
            tokenizer(text, add_special_tokens=False)["input_ids"]
    messages = [{"role": "user", "content": "<video>\nWhere?"}, {"role": "assistant", "content": "left"}]
    assert reloaded.apply_chat_template(messages, tokenize=False) == \
        tokenizer.apply_chat_template(messages, tokenize=False)
    assert (reloaded.pad_token_id, reloaded.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)
    assert reloaded.convert_tokens_to_ids("<video>") == tokenizer.convert_tokens_to_ids("<video>")
