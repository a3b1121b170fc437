"""Request bodies of /v1/completions and /v1/chat/completions: OpenAI's fields plus vLLM's sampling extras.

Every field either works or is refused with a 400 that says why; the API docs list them all.
"""

# no `from __future__ import annotations`: the field types below are calls, evaluated here
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ...sampling_params import MAX_LOGIT_BIAS
from .base import FieldError, RequestModel, accepted_if, unsupported

MAX_LOGPROBS = 20
MAX_N = 16
METADATA_MAX_PAIRS = 16   # OpenAI's limits on `metadata`
METADATA_MAX_KEY, METADATA_MAX_VALUE = 64, 512


def _is_token_id(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def check_metadata(v: dict[str, str]) -> dict[str, str]:
    """OpenAI's shape of `metadata`: at most 16 string pairs, keys up to 64 and values up to 512 characters."""
    if len(v) > METADATA_MAX_PAIRS:
        raise ValueError(f"metadata holds at most {METADATA_MAX_PAIRS} pairs, got {len(v)}")
    for key, value in v.items():
        if len(key) > METADATA_MAX_KEY or len(value) > METADATA_MAX_VALUE:
            raise ValueError(f"metadata keys are at most {METADATA_MAX_KEY} and values at most "
                             f"{METADATA_MAX_VALUE} characters; {key[:80]!r} is longer")
    return v


class StreamOptions(RequestModel):
    include_usage: bool = False
    include_obfuscation: accepted_if(lambda v: v is False, "include_obfuscation=true is not supported: this "
                                     "server's stream chunks carry no obfuscation padding") = None


class JsonSchemaFormat(RequestModel):
    """`response_format.json_schema`: the output must validate against `schema`. `name` and
    `description` only label it; the schema is always enforced, whatever `strict` says."""

    name: str
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestModel):
    """OpenAI's `response_format`: free text, any JSON object, or JSON that follows a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _check_schema(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema (with its 'schema') is required with type 'json_schema' and only there")
        return self


class SamplingRequest(RequestModel):
    """Sampling fields shared by /v1/completions and /v1/chat/completions."""

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = None  # vLLM extra; None, -1 and 0 all mean "off" (normalized to None)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    logit_bias: dict[str, float] | None = None   # token id (a string, as JSON keys are) -> bias
    response_format: ResponseFormat | None = None
    # no effect on the output: OpenAI uses it for abuse monitoring
    user: str | None = None

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _check_logit_bias(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            raise ValueError("logit_bias must be an object mapping token ids to biases")
        for token, bias in v.items():
            if not (isinstance(token, str) and token.isascii() and token.isdigit()):
                raise ValueError(f"logit_bias keys must be token ids (strings of non-negative integers), "
                                 f"got {token!r}")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not abs(bias) <= MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {bias!r} for token {token}")
        return v

    @property
    def token_biases(self) -> dict[int, float] | None:
        """`logit_bias` keyed by integer token id."""
        return {int(t): b for t, b in self.logit_bias.items()} if self.logit_bias else None

    @field_validator("top_k")
    @classmethod
    def _check_top_k(cls, v: int | None) -> int | None:
        if v is None or v in (-1, 0):
            return None
        if v < 1:
            raise ValueError(f"top_k must be -1 or 0 (off) or at least 1, got {v}")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _check_stop_ids(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(t < 0 for t in v):
            raise ValueError("token ids must be non-negative")
        return v

    @model_validator(mode="after")
    def _check_stream_options(self) -> "SamplingRequest":
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "stream_options is only allowed when stream is true")
        return self

    @property
    def stop_list(self) -> list[str]:
        """`stop` as a list of non-empty strings."""
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return [s for s in stops if s]

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage-only chunk."""
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingRequest):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: accepted_if(lambda v: v is False, "echo=true is not supported; send echo=false and prepend the "
                      "prompt yourself") = False
    best_of: int | None = Field(None, ge=1, le=MAX_N)   # only best_of == n: no candidates are ranked
    suffix: accepted_if(lambda v: v == "", "suffix is not supported: this server does not insert text "
                        "between a prompt and a suffix") = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, v: Any) -> Any:
        # Checked before the union so a wrong shape gets one clear message, not one per union member.
        shape = ("prompt must be a string, a list of strings, a list of token ids "
                 "or a list of lists of token ids")
        if isinstance(v, str):
            return v
        if not isinstance(v, list):
            raise ValueError(shape)
        if not v:
            raise ValueError("prompt must not be an empty list")
        if all(isinstance(p, str) for p in v):
            return v
        rows = [v] if all(_is_token_id(t) for t in v) else v
        if not all(isinstance(r, list) and all(_is_token_id(t) for t in r) for r in rows):
            raise ValueError(shape)
        if any(not r for r in rows):
            raise ValueError("prompt must not contain an empty list of token ids")
        if any(t < 0 for r in rows for t in r):
            raise ValueError("prompt token ids must be non-negative")
        return v

    @model_validator(mode="after")
    def _check_best_of(self) -> "CompletionRequest":
        if self.best_of is not None and self.best_of != self.n:
            raise FieldError("best_of", f"best_of={self.best_of} with n={self.n} is not supported: this server "
                                        "returns every sampled choice and ranks none; send best_of equal to n")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(t, int) for t in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ContentPart(RequestModel):
    """One part of a message's content; only text parts are supported (text-only models)."""

    type: Literal["text"]
    text: str


class ChatMessage(RequestModel):
    """One message of a conversation; every field is handed to the model's chat template."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None   # an earlier assistant turn's calls, as history

    @field_validator("content", mode="before")
    @classmethod
    def _check_content(cls, v: Any) -> Any:
        if v is None or isinstance(v, str):
            return v
        if not isinstance(v, list):
            raise ValueError("content must be a string or a list of content parts")
        for part in v:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text content parts ({{'type': 'text', 'text': ...}}) are supported, "
                                 f"got {kind!r}")
        return v

    def text(self) -> str:
        """The content as one string (text parts concatenated)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def for_template(self) -> dict[str, Any]:
        """The message as HF chat templates read it ("developer" is a system message to them)."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        for key in ("name", "tool_call_id", "tool_calls"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


NO_TOOLS = "tool calling is not supported by this server (no tool-call parsing); describe tools in a message"


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # deprecated by OpenAI, still sent by many clients
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    tools: unsupported(NO_TOOLS) = None
    functions: unsupported(NO_TOOLS) = None
    tool_choice: accepted_if(lambda v: v == "none", NO_TOOLS + "; only tool_choice='none' is accepted") = None
    function_call: accepted_if(lambda v: v == "none", NO_TOOLS + "; only function_call='none' is accepted") = None
    parallel_tool_calls: bool | None = None   # no effect: there are never tools to call
    audio: unsupported("audio output is not supported: the models served are text-only") = None
    modalities: accepted_if(lambda v: v == ["text"], "only modalities=['text'] is supported") = None
    prediction: unsupported("predicted outputs are not supported") = None
    web_search_options: unsupported("web search is not supported") = None
    reasoning_effort: unsupported("reasoning_effort is not supported by this server's models") = None
    verbosity: unsupported("verbosity is not supported by this server's models") = None
    moderation: unsupported("moderation is not supported") = None
    store: accepted_if(lambda v: v is False, "store=true is not supported: this server keeps no completions "
                       "to retrieve later") = None
    service_tier: accepted_if(lambda v: v in ("auto", "default"), "this server has one service tier: send "
                              "service_tier 'auto' or 'default', or leave it out") = None
    # no effect on the output: OpenAI's storage labels, cache routing hints and end-user id
    metadata: dict[str, str] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return None if v is None else check_metadata(v)

    @model_validator(mode="after")
    def _check_top_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldError("top_logprobs", "top_logprobs requires logprobs=true")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        """The generation limit: max_completion_tokens, else max_tokens; None means up to the context."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
