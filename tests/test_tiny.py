"""The offline tiny tokenizer loads through transformers, round-trips text and renders chats;
the arithmetic task is deterministic and its splits are disjoint."""

import random

import pytest
from transformers import AutoTokenizer

from loquetier.tiny import arithmetic_examples, arithmetic_split, build_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


def test_build_is_deterministic(tokenizer_dir, tmp_path):
    build_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (tokenizer_dir / name).read_bytes()


def test_special_tokens_and_size(tokenizer):
    assert len(tokenizer) <= 512
    ids = [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id]
    assert tokenizer.convert_ids_to_tokens(ids) == ["<pad>", "<s>", "</s>"]
    for token in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"):
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1


def test_round_trips_ascii(tokenizer):
    printable = "".join(chr(c) for c in range(32, 127)) + "\n\t\r"
    rng = random.Random(0)
    texts = [printable, "  leading and trailing  ", " , spaced ,punctuation . "]
    texts += ["".join(rng.choice(printable) for _ in range(rng.randint(1, 60))) for _ in range(50)]
    for text in texts:
        ids = tokenizer(text).input_ids
        assert ids[0] == tokenizer.bos_token_id  # like Llama, plain encoding starts with <s>
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(tokenizer("naïve 日本").input_ids, skip_special_tokens=True) == "naïve 日本"


def test_digits_are_single_tokens(tokenizer):
    tokens = tokenizer.convert_ids_to_tokens(tokenizer.encode("123+45=168", add_special_tokens=False))
    assert tokens == ["1", "2", "3", "+", "4", "5", "=", "1", "6", "8"]


def test_chat_template_renders_roles(tokenizer):
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert rendered == ("<s><|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>Hello there<|end|>"
                        "<|user|>2+2?<|end|><|assistant|>4<|end|>")
    prompt = tokenizer.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s><|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>"


def test_chat_template_generation_markers_give_assistant_mask(tokenizer):
    out = tokenizer.apply_chat_template(CHAT, return_dict=True, return_assistant_tokens_mask=True)
    assistant = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tokenizer.decode(assistant) == "Hello there<|end|>4<|end|>"


def test_arithmetic_examples_are_deterministic_and_correct():
    examples = arithmetic_examples(200, seed=3)
    assert examples == arithmetic_examples(200, seed=3)
    assert examples != arithmetic_examples(200, seed=4)
    assert len({e["prompt"] for e in examples}) == 200
    for example in examples:
        a, b = example["prompt"].removesuffix("=").split("+")
        assert 0 <= int(a) <= 50 and 0 <= int(b) <= 50
        assert example["completion"] == str(int(a) + int(b))


def test_arithmetic_examples_bounds():
    assert len(arithmetic_examples(100, seed=0, max_operand=9)) == 100  # every single-digit pair
    with pytest.raises(ValueError, match="between 0 and 100"):
        arithmetic_examples(101, seed=0, max_operand=9)


def test_arithmetic_split_is_disjoint():
    train, held_out = arithmetic_split(300, 50, seed=1)
    assert len(train) == 300 and len(held_out) == 50
    assert not {e["prompt"] for e in train} & {e["prompt"] for e in held_out}
