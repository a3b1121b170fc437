"""User-facing exceptions. Every error a user can cause is one of these; internal invariants are asserts."""


class LoquetierError(Exception):
    """Base class of every error a user can cause. `status` is the HTTP status the server maps it to."""

    status: int = 400
    code: str = "invalid_request"
    param: str | None = None   # the request field at fault, where there is one (OpenAI's error `param`)

    def __init__(self, *args, param: str | None = None):
        super().__init__(*args)
        if param is not None:
            self.param = param


class ModelLoadError(LoquetierError):
    """The base model checkpoint cannot be read or is not a supported architecture."""

    code = "model_load_error"


class AdapterError(LoquetierError):
    """An adapter cannot be loaded: missing/unsafe files, shapes that do not fit, too large a rank..."""

    code = "invalid_adapter"


class AdapterNotFoundError(LoquetierError):
    """A request names an adapter that is not loaded."""

    status = 404
    code = "model_not_found"


class AdapterInUseError(LoquetierError):
    """The adapter is pinned (training, or every slot busy) and cannot be detached or evicted now."""

    status = 409
    code = "adapter_in_use"


class JobNotFoundError(LoquetierError):
    """A request names a fine-tuning job that does not exist."""

    status = 404
    code = "job_not_found"


class RequestError(LoquetierError):
    """A generation request is invalid (prompt too long, bad sampling parameters...). `param` names
    the request field at fault, when there is one (the `param` of OpenAI's error body)."""

    code = "invalid_request"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class CapacityError(LoquetierError):
    """The engine cannot take more work right now (waiting queue full)."""

    status = 429
    code = "capacity_exceeded"


class PlotUnavailableError(LoquetierError):
    """A loss plot was asked for, and matplotlib (the `plot` extra) is not installed."""

    code = "plot_unavailable"
