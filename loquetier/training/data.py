"""JSONL fine-tuning datasets in the four formats people already use, checked then tokenized.

One JSON object per line; blank lines are skipped but still counted, so line numbers match an
editor's. A file holds one format:

- chat:               {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
                      rendered with the tokenizer's chat template; loss on assistant turns only.
- prompt/completion:  {"prompt": str, "completion": str}; loss on the completion and an eos.
- alpaca:             {"instruction": str, "input": str (optional), "output": str}; rendered with
                      the Stanford Alpaca prompt; loss on the output and an eos.
- text:               {"text": str}; loss on every token, bos before and eos after.

Other keys on a line (ids, metadata) are ignored. Structure is checked without a tokenizer
(`validate_jsonl`, for uploads); `load_dataset` checks, then tokenizes.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import jinja2

from loquetier.errors import LoquetierError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # label of a token that carries no loss (PyTorch cross_entropy's default)
MAX_ERRORS_SHOWN = 20

Format = Literal["chat", "prompt_completion", "alpaca", "text"]
Overlong = Literal["truncate", "reject"]
ROLES = ("system", "user", "assistant")

# The keys that identify each format; all of them are required.
_FORMAT_KEYS: dict[Format, tuple[str, ...]] = {
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}
_EXPECTED = "'messages', 'prompt'+'completion', 'instruction'+'output' or 'text'"

ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass(frozen=True)
class DatasetError:
    """One problem in a dataset file; `line` is 1-based, 0 for the file as a whole."""

    line: int
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line > 0 else "file"
        return f"{where}: {self.message}"


class InvalidDatasetError(LoquetierError, ValueError):
    """A dataset cannot be used; `.errors` lists every problem found, the message the first 20."""

    code = "invalid_dataset"

    def __init__(self, errors: list[DatasetError], source: str = "dataset"):
        self.errors = errors
        shown = "\n".join(f"  {error}" for error in errors[:MAX_ERRORS_SHOWN])
        more = len(errors) - MAX_ERRORS_SHOWN
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(f"{source}: {len(errors)} problem(s):\n{shown}{tail}")


@dataclass(frozen=True)
class DatasetSpec:
    """How to tokenize a dataset. An example longer than max_seq_len tokens is cut to its first
    max_seq_len tokens ("truncate") or is an error for its line ("reject"); either way an example
    left with no loss tokens is an error for its line."""

    max_seq_len: int
    overlong: Overlong = "truncate"

    def __post_init__(self) -> None:
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be at least 2, got {self.max_seq_len}")
        if self.overlong not in ("truncate", "reject"):
            raise ValueError(f"overlong must be 'truncate' or 'reject', got {self.overlong!r}")


@dataclass(frozen=True)
class Record:
    """One structurally valid line of a dataset file."""

    line: int
    format: Format
    data: dict


@dataclass
class TokenizedExample:
    """Token ids and per-token labels of one example, unshifted: labels[i] is input_ids[i] where
    the token carries loss and IGNORE_INDEX elsewhere (the trainer shifts)."""

    input_ids: list[int]
    labels: list[int]

    def __post_init__(self) -> None:
        assert len(self.input_ids) == len(self.labels), "labels must align with input_ids"

    @property
    def num_loss_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


class _LineError(ValueError):
    """A problem with one line; the caller adds the line number."""


# ---------------------------------------------------------------------------------------------
# Structure: no tokenizer needed.


def validate_jsonl(source: str | Path | bytes, max_lines: int | None = None) -> list[DatasetError]:
    """Check a dataset's structure (a str or Path is a file path, bytes are the file's contents);
    only the first max_lines lines are read when it is given. Returns the problems, [] if none."""
    return _parse(source, max_lines)[1]


def read_records(source: str | Path | bytes) -> list[Record]:
    """Parse and check a dataset; raises InvalidDatasetError listing its problems by line."""
    records, errors = _parse(source, None)
    if errors:
        raise InvalidDatasetError(errors, _describe(source))
    return records


def _parse(source: str | Path | bytes, max_lines: int | None) -> tuple[list[Record], list[DatasetError]]:
    records: list[Record] = []
    errors: list[DatasetError] = []
    seen_any = False
    try:
        for number, raw in _read_lines(source, max_lines):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                errors.append(DatasetError(number, "not valid UTF-8"))
                seen_any = True
                continue
            if number == 1:
                text = text.removeprefix("\ufeff")  # editors on Windows write a byte-order mark
            if not text.strip():
                continue
            seen_any = True
            try:
                record = _parse_line(number, text)
            except _LineError as e:
                errors.append(DatasetError(number, str(e)))
                continue
            # One format per file: mixing is nearly always a mistake, and the trainer treats a
            # dataset uniformly.
            if records and record.format != records[0].format:
                first = records[0]
                message = (f"format '{record.format}' differs from line {first.line}'s "
                           f"'{first.format}'; a file holds one format")
                errors.append(DatasetError(number, message))
                continue
            records.append(record)
    except OSError as e:
        return [], [DatasetError(0, f"cannot read {_describe(source)}: {e.strerror or e}")]
    if not seen_any:
        errors.append(DatasetError(0, "dataset is empty: no JSON lines found"))
    return records, errors


def _read_lines(source: str | Path | bytes, max_lines: int | None) -> Iterator[tuple[int, bytes]]:
    stream = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    with stream:
        for number, raw in enumerate(stream, start=1):
            if max_lines is not None and number > max_lines:
                return
            yield number, raw


def _describe(source: str | Path | bytes) -> str:
    return "dataset" if isinstance(source, bytes) else str(source)


def _parse_line(number: int, text: str) -> Record:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise _LineError(f"invalid JSON: {e.msg} (column {e.colno})") from None
    try:   # a "\ud800" escape decodes to half a surrogate pair, which no tokenizer can encode
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise _LineError("holds a lone UTF-16 surrogate escape (such as \\ud800), which is not a Unicode "
                         "character; write the character itself or a complete surrogate pair") from None
    if not isinstance(data, dict):
        raise _LineError(f"expected a JSON object, got {_json_type(data)}")
    found = [fmt for fmt, keys in _FORMAT_KEYS.items() if any(key in data for key in keys)]
    if not found:
        raise _LineError(f"unrecognised format: expected {_EXPECTED}, got keys {sorted(data)}")
    if len(found) > 1:
        raise _LineError(f"ambiguous format: has fields of both '{found[0]}' and '{found[1]}'")
    fmt = found[0]
    for key in _FORMAT_KEYS[fmt]:
        if key not in data:
            raise _LineError(f"missing '{key}' (a '{fmt}' line needs {' and '.join(_FORMAT_KEYS[fmt])})")
    if fmt == "chat":
        _check_messages(data["messages"])
    else:
        for key in _FORMAT_KEYS[fmt]:
            if not isinstance(data[key], str):
                raise _LineError(f"'{key}' must be a string, got {_json_type(data[key])}")
        if fmt == "alpaca" and not isinstance(data.get("input"), (str, type(None))):
            raise _LineError(f"'input' must be a string, got {_json_type(data['input'])}")
    return Record(number, fmt, data)


def _check_messages(messages: object) -> None:
    if not isinstance(messages, list) or not messages:
        raise _LineError("'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _LineError(f"messages[{i}] must be an object, got {_json_type(message)}")
        if "role" not in message:
            raise _LineError(f"messages[{i}] is missing 'role'")
        if message["role"] not in ROLES:
            raise _LineError(f"messages[{i}] has unknown role {message['role']!r}; "
                             f"expected 'system', 'user' or 'assistant'")
        if not isinstance(message.get("content"), str):
            raise _LineError(f"messages[{i}].content must be a string")
    if not any(message["role"] == "assistant" for message in messages):
        raise _LineError("'messages' has no assistant message, so nothing to train on")
    # The assistant mask is found by rendering the conversation before each assistant turn,
    # which needs at least one message there.
    if messages[0]["role"] == "assistant":
        raise _LineError("messages[0] is from the assistant; start with a system or user message")


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------------------------
# Tokenization: each format renders to text plus the character spans that carry loss; one
# tokenizer call on the whole text then labels each token by where it starts.


@dataclass(frozen=True)
class _Rendered:
    text: str
    loss_spans: list[tuple[int, int]]  # [start, end) character ranges of text that carry loss
    add_bos: bool  # prepend bos (no loss); chat templates write their own
    add_eos: bool  # append eos (with loss)


def load_dataset(
    path: str | Path | bytes,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int,
    overlong: Overlong = "truncate",
) -> list[TokenizedExample]:
    """Check then tokenize a JSONL dataset; raises InvalidDatasetError listing its problems by
    line (structure first; then, if the structure is sound, overlong or loss-free examples)."""
    spec = DatasetSpec(max_seq_len, overlong)
    records = read_records(path)
    _check_tokenizer(tokenizer)
    if records[0].format == "chat" and not tokenizer.chat_template:
        raise InvalidDatasetError([DatasetError(0, "chat ('messages') lines need a tokenizer with a "
                                                   "chat template; this one has none")], _describe(path))
    examples: list[TokenizedExample] = []
    errors: list[DatasetError] = []
    for record in records:
        try:
            examples.append(tokenize_record(record, tokenizer, spec))
        except _LineError as e:
            errors.append(DatasetError(record.line, str(e)))
    if errors:
        raise InvalidDatasetError(errors, _describe(path))
    return examples


def tokenize_record(
    record: Record, tokenizer: PreTrainedTokenizerBase, spec: DatasetSpec
) -> TokenizedExample:
    """Tokenize one checked record, applying spec's max_seq_len rule; raises ValueError if the
    record cannot be used."""
    rendered = _RENDERERS[record.format](record.data, tokenizer)
    input_ids, labels = _tokenize(rendered, tokenizer)
    truncated = len(input_ids) > spec.max_seq_len
    if truncated:
        if spec.overlong == "reject":
            raise _LineError(f"example is {len(input_ids)} tokens, over max_seq_len={spec.max_seq_len}; "
                             "shorten it, raise max_seq_len, or use overlong='truncate'")
        input_ids, labels = input_ids[: spec.max_seq_len], labels[: spec.max_seq_len]
    example = TokenizedExample(input_ids, labels)
    if example.num_loss_tokens == 0:
        where = f" in its first max_seq_len={spec.max_seq_len} tokens" if truncated else ""
        raise _LineError(f"example has no tokens to train on{where}")
    return example


def alpaca_prompt(instruction: str, input: str | None = None) -> str:
    """The Stanford Alpaca prompt, ending where the response begins; an empty input is no input."""
    if input:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def _check_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; set tokenizer.eos_token before loading data")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("loss masks need token offsets, which only fast tokenizers (tokenizer.json) give")


def _tokenize(rendered: _Rendered, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    encoding = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    # A token belongs to the span its first character falls in, so a token straddling a
    # prompt/completion boundary (rare: prompts usually end in a space, newline or marker)
    # counts as prompt.
    labels = [
        token if any(start <= first < end for start, end in rendered.loss_spans) else IGNORE_INDEX
        for token, (first, _) in zip(input_ids, encoding["offset_mapping"])
    ]
    if rendered.add_bos and tokenizer.bos_token_id is not None:
        input_ids.insert(0, tokenizer.bos_token_id)
        labels.insert(0, IGNORE_INDEX)
    if rendered.add_eos:
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return input_ids, labels


def _render_text(data: dict, tokenizer: PreTrainedTokenizerBase) -> _Rendered:
    return _Rendered(data["text"], [(0, len(data["text"]))], add_bos=True, add_eos=True)


def _render_prompt_completion(data: dict, tokenizer: PreTrainedTokenizerBase) -> _Rendered:
    return _with_completion(data["prompt"], data["completion"])


def _render_alpaca(data: dict, tokenizer: PreTrainedTokenizerBase) -> _Rendered:
    return _with_completion(alpaca_prompt(data["instruction"], data.get("input")), data["output"])


def _with_completion(prompt: str, completion: str) -> _Rendered:
    text = prompt + completion
    return _Rendered(text, [(len(prompt), len(text))], add_bos=True, add_eos=True)


def _render_chat(data: dict, tokenizer: PreTrainedTokenizerBase) -> _Rendered:
    """Each assistant turn's span runs from the end of the conversation before it (rendered with
    the generation prompt) to the end of the conversation through it, so it holds the content
    and the template's end-of-turn marker, and nothing a server would put in the prompt."""
    messages = [{"role": m["role"], "content": m["content"]} for m in data["messages"]]
    full = _apply_chat_template(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _apply_chat_template(tokenizer, messages[:i], add_generation_prompt=True)
        through = _apply_chat_template(tokenizer, messages[: i + 1], add_generation_prompt=False)
        # Templates that rewrite earlier turns once later ones follow (Qwen3 drops old
        # reasoning, for one) break this; say so rather than guess at the mask.
        if not (through.startswith(before) and full.startswith(through)):
            raise _LineError(f"the tokenizer's chat template renders messages[{i}] differently once later "
                             "messages follow, so its tokens cannot be located; put one assistant turn per "
                             "line, or use prompt/completion lines")
        spans.append((len(before), len(through)))
    return _Rendered(full, spans, add_bos=False, add_eos=False)


def _apply_chat_template(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool
) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except (jinja2.TemplateError, ValueError, TypeError) as e:
        # Templates raise on conversations they do not accept (e.g. roles that do not alternate).
        raise _LineError(f"the chat template rejected this conversation: {e}") from None


_RENDERERS = {
    "chat": _render_chat,
    "prompt_completion": _render_prompt_completion,
    "alpaca": _render_alpaca,
    "text": _render_text,
}
