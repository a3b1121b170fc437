"""Request and response bodies of the HTTP API, in OpenAI's shapes (plus the vLLM extras we accept).

Unknown fields are ignored, as OpenAI does; a `null` sent for a field means "use the default".
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_LOGPROBS = 20
MAX_N = 16

JobStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled", "paused"]
TERMINAL_JOB_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
FinishReason = Literal["stop", "length", "abort"]


def new_id(prefix: str) -> str:
    """An OpenAI-style id: `prefix-` followed by 24 random hex digits (e.g. `file-3f9a...`)."""
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    """Unix time in whole seconds, the timestamp unit of every API object."""
    return int(time.time())


def _is_token_id(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


class OpenAIModel(BaseModel):
    """Base of every API body: unknown fields are ignored, never rejected."""

    model_config = ConfigDict(extra="ignore")


class RequestModel(OpenAIModel):
    """Base of request bodies: a top-level `null` means the field's default."""

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


# ---------------------------------------------------------------------------------------------
# Completions and chat completions: requests
# ---------------------------------------------------------------------------------------------


class StreamOptions(OpenAIModel):
    include_usage: bool = False


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
    user: str | None = None

    @field_validator("top_k")
    @classmethod
    def _check_top_k(cls, v: int | None) -> int | None:
        if v is None or v in (-1, 0):
            return None
        if v < 1:
            raise ValueError(f"top_k must be -1 or 0 (off) or at least 1, got {v}")
        return v

    @model_validator(mode="after")
    def _check_stream_options(self) -> SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
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
    echo: bool = False

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

    @field_validator("echo")
    @classmethod
    def _check_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo=true is not supported; send echo=false and prepend the prompt yourself")
        return v

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(t, int) for t in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ContentPart(OpenAIModel):
    """One part of a message's content; only text parts are supported (text-only models)."""

    type: Literal["text"]
    text: str


class ChatMessage(OpenAIModel):
    """One message of a conversation."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

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


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # deprecated by OpenAI, still sent by many clients
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _check_top_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        """The generation limit: max_completion_tokens, else max_tokens; None means up to the context."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---------------------------------------------------------------------------------------------
# Completions and chat completions: responses and stream chunks
# ---------------------------------------------------------------------------------------------


class UsageInfo(OpenAIModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> UsageInfo:
        """Usage with `total_tokens` filled in."""
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class CompletionLogprobs(OpenAIModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(OpenAIModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # vLLM extra: the stop string or token id that matched


class CompletionResponse(OpenAIModel):
    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class CompletionStreamResponse(OpenAIModel):
    """One SSE chunk of a streamed completion; the usage-only last chunk has no choices."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice] = Field(default_factory=list)
    usage: UsageInfo | None = None


class TopLogprob(OpenAIModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(OpenAIModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(OpenAIModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None


class ChatChoice(OpenAIModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(OpenAIModel):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class DeltaMessage(OpenAIModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(OpenAIModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionStreamResponse(OpenAIModel):
    """One SSE chunk of a streamed chat completion; the usage-only last chunk has no choices."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatStreamChoice] = Field(default_factory=list)
    usage: UsageInfo | None = None


SSE_DONE = "data: [DONE]\n\n"


def sse_data(body: BaseModel) -> str:
    """One server-sent event carrying `body` as JSON."""
    return f"data: {body.model_dump_json()}\n\n"


# ---------------------------------------------------------------------------------------------
# Models, files, fine-tuning jobs, adapters
# ---------------------------------------------------------------------------------------------

T = TypeVar("T")


class ListPage(OpenAIModel, Generic[T]):
    """A page of a list endpoint; `first_id`/`last_id` are set where OpenAI has them (files, checkpoints)."""

    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


class ModelCard(OpenAIModel):
    """An entry of GET /v1/models: the base model (root) or an adapter (parent = base model)."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "loquetier"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


class FileObject(OpenAIModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: str | None = None


class FileDeleted(OpenAIModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


def _auto_or_range(v: Any, name: str, lo: float, hi: float, strict_lo: bool = False) -> Any:
    if v == "auto":
        return v
    if (v <= lo if strict_lo else v < lo) or v > hi:
        bound = f"greater than {lo}" if strict_lo else f"at least {lo}"
        raise ValueError(f"{name} must be 'auto' or {bound} and at most {hi}, got {v}")
    return v


class Hyperparameters(RequestModel):
    """OpenAI's supervised fine-tuning hyperparameters; "auto" lets the trainer choose."""

    n_epochs: Literal["auto"] | int = "auto"
    batch_size: Literal["auto"] | int = "auto"
    learning_rate_multiplier: Literal["auto"] | float = "auto"
    # our extension: pack examples first-fit into micro-batches of this many tokens (no padding);
    # batch_size then counts such micro-batches per optimizer step ("auto": 1)
    micro_batch_tokens: int | None = Field(None, ge=1, le=1 << 20)

    @field_validator("n_epochs")
    @classmethod
    def _check_epochs(cls, v: Any) -> Any:
        return _auto_or_range(v, "n_epochs", 1, 50)

    @field_validator("batch_size")
    @classmethod
    def _check_batch(cls, v: Any) -> Any:
        return _auto_or_range(v, "batch_size", 1, 256)

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _check_lr(cls, v: Any) -> Any:
        return _auto_or_range(v, "learning_rate_multiplier", 0, 10, strict_lo=True)


class LoraParams(RequestModel):
    """Our extension of a fine-tuning job: the shape of the LoRA adapter to train."""

    r: int = Field(16, ge=1, le=1024)
    alpha: float = Field(32.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)
    use_rslora: bool = False


class SupervisedMethod(RequestModel):
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class FineTuneMethod(RequestModel):
    """OpenAI's `method` field; only supervised fine-tuning is supported."""

    type: str = "supervised"
    supervised: SupervisedMethod | None = None

    @field_validator("type")
    @classmethod
    def _check_type(cls, v: str) -> str:
        if v != "supervised":
            raise ValueError(f"only method type 'supervised' is supported, got {v!r}")
        return v


class CreateFineTuningJobRequest(RequestModel):
    """POST /v1/fine_tuning/jobs."""

    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None
    method: FineTuneMethod | None = None
    suffix: str | None = Field(None, min_length=1, max_length=64)
    seed: int | None = None
    lora: LoraParams = Field(default_factory=LoraParams)

    @field_validator("suffix")
    @classmethod
    def _check_suffix(cls, v: str | None) -> str | None:
        if v is not None and not all(c.isalnum() or c in "._-" for c in v):
            raise ValueError(f"suffix may only contain letters, digits, '.', '_' and '-', got {v!r}")
        return v

    def resolved_hyperparameters(self) -> Hyperparameters:
        """`method.supervised.hyperparameters` if given, else the top-level (legacy) `hyperparameters`."""
        if self.method is not None and self.method.supervised is not None:
            return self.method.supervised.hyperparameters
        return self.hyperparameters or Hyperparameters()


class FineTuningJobError(OpenAIModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(OpenAIModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    model: str
    created_at: int
    finished_at: int | None = None
    fine_tuned_model: str | None = None
    organization_id: str = "org-loquetier"
    status: JobStatus
    training_file: str
    validation_file: str | None = None
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    seed: int | None = None
    suffix: str | None = None
    error: FineTuningJobError | None = None
    trained_tokens: int | None = None
    result_files: list[str] = Field(default_factory=list)
    estimated_finish: int | None = None
    lora: LoraParams | None = None  # our extension


class FineTuningJobEvent(OpenAIModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"] = "info"
    message: str
    type: Literal["message", "metrics"] = "message"
    data: dict[str, Any] | None = None


class CheckpointMetrics(OpenAIModel):
    """Metrics at a checkpoint; extra metrics beyond OpenAI's are kept."""

    model_config = ConfigDict(extra="allow")

    step: float | None = None
    train_loss: float | None = None
    train_mean_token_accuracy: float | None = None
    valid_loss: float | None = None
    valid_mean_token_accuracy: float | None = None
    full_valid_loss: float | None = None
    full_valid_mean_token_accuracy: float | None = None


class FineTuningJobCheckpoint(OpenAIModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    step_number: int
    metrics: CheckpointMetrics = Field(default_factory=CheckpointMetrics)
    fine_tuning_job_id: str


FileList = ListPage[FileObject]
FineTuningJobList = ListPage[FineTuningJob]
FineTuningJobEventList = ListPage[FineTuningJobEvent]
FineTuningJobCheckpointList = ListPage[FineTuningJobCheckpoint]


class LoadLoRAAdapterRequest(RequestModel):
    """vLLM's POST /v1/load_lora_adapter."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoRAAdapterRequest(RequestModel):
    """vLLM's POST /v1/unload_lora_adapter."""

    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


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


def error_body(message: str, type: str = "invalid_request_error",
               param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The JSON body OpenAI returns on an error: `{"error": {"message", "type", "param", "code"}}`."""
    return ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code)).model_dump()


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def validation_error_body(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """An OpenAI error body from pydantic/FastAPI validation errors (`exc.errors()`), one line per error."""
    lines: list[str] = []
    params: list[str] = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        # Union members add their type to the location ("stop.str", "stop.list[str]"): drop those.
        field = ".".join(p for p in loc if (p.isidentifier() and p not in _TYPE_TAGS) or p.isdigit())
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        lines.append(f"{field}: {msg}" if field else msg)
        if field:
            params.append(field)
    param = params[0] if params else None
    return error_body("; ".join(dict.fromkeys(lines)) or "invalid request", param=param, code="invalid_value")
