"""JSONL datasets: each format's loss mask is exact, overlong examples are cut or rejected, and
bad lines are reported with the right line numbers."""

import json

import pytest
from transformers import AutoTokenizer

from loquetier.tiny import arithmetic_examples, build_tokenizer, write_jsonl
from loquetier.training.data import (
    IGNORE_INDEX,
    DatasetError,
    DatasetSpec,
    InvalidDatasetError,
    alpaca_prompt,
    load_dataset,
    validate_jsonl,
)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def jsonl(*records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def loss_text(tokenizer, example) -> str:
    return tokenizer.decode([label for label in example.labels if label != IGNORE_INDEX])


def line_errors(source) -> list[tuple[int, str]]:
    return [(error.line, error.message) for error in validate_jsonl(source)]


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


# --- formats and loss masks ------------------------------------------------------------------


def test_chat_loss_on_assistant_turns_only(tokenizer):
    [example] = load_dataset(jsonl({"messages": CHAT}), tokenizer, max_seq_len=256)
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert loss_text(tokenizer, example) == "Hello there<|end|>4<|end|>"
    # Outside reference: transformers' mask from the template's {% generation %} markers.
    ref = tokenizer.apply_chat_template(CHAT, return_dict=True, return_assistant_tokens_mask=True)
    assert example.input_ids == ref["input_ids"]
    assert [label != IGNORE_INDEX for label in example.labels] == [bool(m) for m in ref["assistant_masks"]]
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(example.labels, example.input_ids))


def test_chat_trailing_user_turn_has_no_loss(tokenizer):
    messages = CHAT[1:3] + [{"role": "user", "content": "thanks"}]
    [example] = load_dataset(jsonl({"messages": messages}), tokenizer, max_seq_len=256)
    assert loss_text(tokenizer, example) == "Hello there<|end|>"
    assert example.labels[-1] == IGNORE_INDEX


def test_chat_mask_works_without_generation_markers(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    # The same rendering, no {% generation %}: the mask comes from prefix rendering alone.
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    [example] = load_dataset(jsonl({"messages": CHAT}), tokenizer, max_seq_len=256)
    assert loss_text(tokenizer, example) == "Hello there<|end|>4<|end|>"


def test_chat_template_that_rewrites_history_is_an_error(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    # Like templates that drop old reasoning: the last message renders differently.
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}{% if loop.last %}!{% endif %}"
        "{{ '<|end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    with pytest.raises(InvalidDatasetError, match=r"line 1: .*messages\[2\] differently"):
        load_dataset(jsonl({"messages": CHAT}), tokenizer, max_seq_len=256)


def test_chat_needs_a_chat_template(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = None
    with pytest.raises(InvalidDatasetError, match="file: .*chat template") as info:
        load_dataset(jsonl({"messages": CHAT}), tokenizer, max_seq_len=256)
    assert [e.line for e in info.value.errors] == [0]


def test_prompt_completion(tokenizer):
    [example] = load_dataset(jsonl({"prompt": "12+7=", "completion": "19"}), tokenizer, max_seq_len=64)
    expected = [tokenizer.bos_token_id] + tokenizer.encode("12+7=19", add_special_tokens=False)
    assert example.input_ids == expected + [tokenizer.eos_token_id]
    assert loss_text(tokenizer, example) == "19</s>"
    assert example.labels[:6] == [IGNORE_INDEX] * 6  # <s> and the five prompt characters


def test_prompt_completion_with_words(tokenizer):
    record = {"prompt": "Q: What is the answer?\nA:", "completion": " The answer is yes."}
    [example] = load_dataset(jsonl(record), tokenizer, max_seq_len=64)
    assert loss_text(tokenizer, example) == " The answer is yes.</s>"


@pytest.mark.parametrize("input_value", [None, "", "the fox"])
def test_alpaca(tokenizer, input_value):
    record = {"instruction": "Repeat the input.", "output": "the fox"}
    if input_value is not None:
        record["input"] = input_value
    [example] = load_dataset(jsonl(record), tokenizer, max_seq_len=256)
    prompt = alpaca_prompt("Repeat the input.", input_value)
    assert ("### Input:" in prompt) == bool(input_value)
    assert tokenizer.decode(example.input_ids) == "<s>" + prompt + "the fox</s>"
    assert loss_text(tokenizer, example) == "the fox</s>"


def test_text_loss_on_every_token(tokenizer):
    [example] = load_dataset(jsonl({"text": "hello world"}), tokenizer, max_seq_len=64)
    assert example.input_ids[0] == tokenizer.bos_token_id
    assert example.labels[0] == IGNORE_INDEX  # bos is context, never a target
    assert example.labels[1:] == example.input_ids[1:]
    assert loss_text(tokenizer, example) == "hello world</s>"


def test_extra_keys_crlf_and_bom_are_fine(tokenizer):
    data = b"\xef\xbb\xbf" + b'{"id": 7, "prompt": "1+1=", "completion": "2"}\r\n'
    assert validate_jsonl(data) == []
    [example] = load_dataset(data, tokenizer, max_seq_len=64)
    assert loss_text(tokenizer, example) == "2</s>"


def test_arithmetic_file_loads(tokenizer, tmp_path):
    path = tmp_path / "train.jsonl"
    write_jsonl(arithmetic_examples(50, seed=0), path)
    examples = load_dataset(path, tokenizer, max_seq_len=32)
    assert len(examples) == 50
    assert all(loss_text(tokenizer, e).endswith("</s>") for e in examples)


# --- overlong examples -----------------------------------------------------------------------


def test_truncate_keeps_first_tokens(tokenizer):
    [full] = load_dataset(jsonl({"text": "one two three four five six seven"}), tokenizer, max_seq_len=512)
    [cut] = load_dataset(jsonl({"text": "one two three four five six seven"}), tokenizer, max_seq_len=5)
    assert cut.input_ids == full.input_ids[:5] and cut.labels == full.labels[:5]


def test_reject_names_the_line(tokenizer):
    data = jsonl({"text": "short"}, {"text": "a much longer line of text than allowed"})
    with pytest.raises(InvalidDatasetError) as info:
        load_dataset(data, tokenizer, max_seq_len=8, overlong="reject")
    [error] = info.value.errors
    assert error.line == 2 and "max_seq_len=8" in error.message


def test_truncation_leaving_no_loss_is_an_error(tokenizer):
    data = jsonl({"prompt": "a long prompt that fills the window", "completion": "x"})
    with pytest.raises(InvalidDatasetError, match="line 1: example has no tokens to train on in its first"):
        load_dataset(data, tokenizer, max_seq_len=6)


def test_dataset_spec_checks_options():
    with pytest.raises(ValueError, match="overlong"):
        DatasetSpec(max_seq_len=16, overlong="drop")
    with pytest.raises(ValueError, match="max_seq_len"):
        DatasetSpec(max_seq_len=0)


# --- structure errors ------------------------------------------------------------------------


def test_error_str():
    assert str(DatasetError(3, "'completion' must be a string")) == "line 3: 'completion' must be a string"
    assert str(DatasetError(0, "dataset is empty")) == "file: dataset is empty"


@pytest.mark.parametrize("data", [b"", b"\n  \n\t\n"])
def test_empty_file(data):
    assert line_errors(data) == [(0, "dataset is empty: no JSON lines found")]


def test_blank_lines_are_skipped_but_counted():
    data = b'\n{"text": "a"}\n\n   \n{"text": 5}\n'
    assert line_errors(data) == [(5, "'text' must be a string, got a number")]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "a"', "invalid JSON"),
        ("[1, 2]", "expected a JSON object, got an array"),
        ('"text"', "expected a JSON object, got a string"),
        ('{"foo": "bar"}', "unrecognised format"),
        ('{"text": "a", "prompt": "b", "completion": "c"}', "ambiguous format"),
        ('{"prompt": "a"}', "missing 'completion'"),
        ('{"completion": "a"}', "missing 'prompt'"),
        ('{"prompt": "a", "completion": 3}', "'completion' must be a string"),
        ('{"prompt": null, "completion": "b"}', "'prompt' must be a string, got null"),
        ('{"instruction": "a"}', "missing 'output'"),
        ('{"instruction": "a", "output": ["b"]}', "'output' must be a string, got an array"),
        ('{"instruction": "a", "input": 1, "output": "b"}', "'input' must be a string"),
        ('{"text": {"a": 1}}', "'text' must be a string, got an object"),
        ('{"messages": []}', "'messages' must be a non-empty list"),
        ('{"messages": "hi"}', "'messages' must be a non-empty list"),
        ('{"messages": ["hi"]}', "messages[0] must be an object"),
        ('{"messages": [{"content": "hi"}]}', "messages[0] is missing 'role'"),
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}',
         "messages[1] has unknown role 'bot'"),
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 1}]}',
         "messages[1].content must be a string"),
        ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}',
         "messages[0].content must be a string"),
        ('{"messages": [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]}',
         "no assistant message"),
        ('{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}',
         "messages[0] is from the assistant"),
    ],
)
def test_bad_line(line, message):
    data = jsonl({"text": "fine"}) + b"\n" + line.encode() + b"\n" + jsonl({"text": "fine"})
    errors = validate_jsonl(data)
    assert len(errors) == 1, errors
    assert errors[0].line == 3
    assert message in errors[0].message


def test_invalid_utf8():
    assert line_errors(b'{"text": "a"}\n{"text": "\xff"}\n') == [(2, "not valid UTF-8")]


def test_mixed_formats_in_one_file():
    data = jsonl({"text": "a"}, {"prompt": "b", "completion": "c"}, {"text": "d"})
    [(line, message)] = line_errors(data)
    assert line == 2 and "differs from line 1's 'text'" in message


def test_sources_and_max_lines(tmp_path):
    data = jsonl({"text": "a"}, {"text": 1}, {"text": 2})
    path = tmp_path / "d.jsonl"
    path.write_bytes(data)
    assert line_errors(data) == line_errors(path) == line_errors(str(path))
    assert [e.line for e in validate_jsonl(data, max_lines=2)] == [2]
    assert validate_jsonl(data, max_lines=1) == []
    [(line, message)] = line_errors(tmp_path / "missing.jsonl")
    assert line == 0 and "cannot read" in message


def test_load_dataset_lists_first_twenty_problems(tokenizer):
    data = jsonl({"text": "ok"}, *[{"text": i} for i in range(25)])
    with pytest.raises(InvalidDatasetError) as info:
        load_dataset(data, tokenizer, max_seq_len=64)
    error = info.value
    assert isinstance(error, ValueError)
    assert [e.line for e in error.errors] == list(range(2, 27))
    message = str(error)
    assert "line 2: 'text' must be a string" in message and "line 21:" in message
    assert "line 22:" not in message and "... and 5 more" in message
