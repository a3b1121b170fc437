"""What every API body shares: ids, the request base class and its field types, OpenAI's error body.

Request bodies are strict. A field this server does not know gets a 400 that names it. Ignoring
a field could change what the client asked for without telling it. A known OpenAI field that is
not implemented gets a 400 with the reason (`unsupported`, `accepted_if`). A `null` sent for a
field means "use the default", and text the client sends must be valid Unicode.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, model_validator


def new_id(prefix: str) -> str:
    """An OpenAI-style id: `prefix-` followed by 24 random hex digits (e.g. `file-3f9a...`)."""
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    """Unix time in whole seconds, the timestamp unit of every API object."""
    return int(time.time())


def lone_surrogate_message(text: str) -> str | None:
    """Why `text` is not valid Unicode (a lone UTF-16 surrogate such as an unpaired "\\ud800" escape), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"holds a lone UTF-16 surrogate ({text[e.start]!r} at character {e.start}), which is not a Unicode "
                "character and cannot be tokenized; send the character itself or a complete surrogate pair")
    return None


def _check_unicode(value: Any, path: str) -> None:
    """FieldError at the first string (or key) under `value` that is not valid Unicode."""
    if isinstance(value, str):
        problem = lone_surrogate_message(value)
        if problem:
            raise FieldError(path, problem)
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and lone_surrogate_message(key):
                raise FieldError(path, "a key " + lone_surrogate_message(key))
            _check_unicode(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_unicode(item, f"{path}.{i}" if path else str(i))


class FieldError(ValueError):
    """A check that spans fields, reported against one of them (the error's `param`)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def accepted_if(ok: Callable[[Any], bool], reason: str) -> Any:
    """A field type for a known OpenAI field that is accepted only where `ok(value)` holds (where it
    asks for nothing this server would leave undone); other values get a 400 with `reason`."""
    def check(value: Any) -> Any:
        if not ok(value):
            raise ValueError(reason)
        return value
    return Annotated[Any, BeforeValidator(check)]


def unsupported(reason: str) -> Any:
    """A field type for a known OpenAI field this server does not implement: any value but null is a 400."""
    return accepted_if(lambda _: False, reason)


class OpenAIModel(BaseModel):
    """Base of response bodies (and of what we read back from our own store)."""

    model_config = ConfigDict(extra="ignore")


class RequestModel(BaseModel):
    """Base of request bodies and their parts: unknown fields are refused, `null` means the default,
    and every string in the body, however deep, must be valid Unicode."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls_and_check_text(cls, data: Any) -> Any:
        # Half a surrogate pair, sent as a JSON escape ("\ud800"), decodes to a str that UTF-8 and so
        # every tokenizer, the store and the metrics refuse. One walk covers every text field:
        # prompts, messages, stop strings, names, ids, metadata.
        _check_unicode(data, "")
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


T = TypeVar("T")


class ListPage(OpenAIModel, Generic[T]):
    """A page of a list endpoint; `first_id`/`last_id` are set where OpenAI has them (files, checkpoints)."""

    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


class ErrorInfo(OpenAIModel):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIModel):
    error: ErrorInfo


def _printable(text: str) -> str:
    # a message may quote client text; lone surrogates in it would make the body unencodable
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(message: str, type: str = "invalid_request_error",
               param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The JSON body OpenAI returns on an error: `{"error": {"message", "type", "param", "code"}}`."""
    info = ErrorInfo(message=_printable(message), type=type, param=None if param is None else _printable(param),
                     code=code)
    return ErrorResponse(error=info).model_dump()


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})
UNKNOWN_FIELD = ("unknown field: this server does not implement it, and ignoring it could change what you "
                 "asked for; remove it (the API docs list every accepted field)")


def validation_error_body(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """An OpenAI error body from pydantic/FastAPI validation errors (`exc.errors()`), one line per error."""
    lines: list[str] = []
    params: list[str] = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, FieldError):
            loc.extend(cause.field.split("."))
        # Union members add their type to the location ("stop.str", "stop.list[str]"): drop those.
        field = ".".join(p for p in loc if (p.isidentifier() and p not in _TYPE_TAGS) or p.isdigit())
        if err.get("type") == "extra_forbidden":
            field = ".".join(loc)   # the unknown name itself, whatever it is
            msg = UNKNOWN_FIELD
        else:
            msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        lines.append(f"{field}: {msg}" if field else msg)
        if field:
            params.append(field)
    param = params[0] if params else None
    return error_body("; ".join(dict.fromkeys(lines)) or "invalid request", param=param, code="invalid_value")
