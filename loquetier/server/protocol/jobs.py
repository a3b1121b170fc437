"""Bodies of the models, files, fine-tuning jobs and adapter routes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from .base import FieldError, ListPage, OpenAIModel, RequestModel, now
from .requests import check_metadata

JobStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled", "paused"]
TERMINAL_JOB_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})


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
    integrations: list[Any] | None = None
    metadata: dict[str, str] | None = None
    lora: LoraParams = Field(default_factory=LoraParams)   # our extension

    @field_validator("integrations")
    @classmethod
    def _check_integrations(cls, v: list[Any] | None) -> list[Any] | None:
        if v:
            raise ValueError("integrations (Weights and Biases...) are not supported; follow a job with its "
                             "events and /metrics instead")
        return v

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v:
            check_metadata(v)
            raise ValueError("metadata is not stored on fine-tuning jobs by this server; leave it out")
        return v

    @model_validator(mode="after")
    def _check_one_hyperparameter_source(self) -> CreateFineTuningJobRequest:
        if self.hyperparameters is not None and self.method is not None and self.method.supervised is not None:
            raise FieldError("hyperparameters", "send the hyperparameters once: in method.supervised.hyperparameters "
                                                "or (legacy) at the top level, not both")
        return self

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

    @field_validator("lora_int_id")
    @classmethod
    def _check_int_id(cls, v: int | None) -> int | None:
        if v is not None:
            raise ValueError("this server names adapters only by lora_name; leave lora_int_id out")
        return v

