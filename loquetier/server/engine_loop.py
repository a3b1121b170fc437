"""`AsyncEngine`: the engine and trainer on one dedicated thread, driven from asyncio.

The engine is not thread-safe. Its thread runs the step loop; anything else that touches it (adding
or aborting requests, loading adapters, starting or pausing jobs) is a command put on a queue and
run on that thread between steps, its result coming back through a future. Each step's outputs go
to per-group asyncio queues with one `call_soon_threadsafe`. With no work, the thread sleeps on an
event that the next command sets.

A step that raises fails the requests and training jobs it held and the loop goes on (a step whose
training rows ran out of memory is handled inside `Engine.step`: only its jobs fail). A device error
(a CUDA fault), or a second failed step in a row (the error outlived the work it was blamed on), is
fatal: every request fails, `fatal` is set, and the server exits so that its supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..engine.detokenizer import IncrementalText
from ..engine.engine import Engine, RequestOutput
from ..errors import AdapterNotFoundError, LoquetierError
from ..sampling_params import SamplingParams

log = logging.getLogger("loquetier.server")
TRAINING_SUFFIX = "@train"   # a job's adapter while it trains (TrainingJob.adapter); not servable
# A CUDA fault is sticky: every later launch in the process fails too and device memory can no longer
# be trusted. torch >= 2.8 raises torch.AcceleratorError; older versions a RuntimeError naming the API.
_DEVICE_ERROR_TYPES = tuple(getattr(torch, name) for name in ("AcceleratorError",) if hasattr(torch, name))
_DEVICE_ERROR_MARKERS = ("CUDA error", "CUDA driver error", "Triton Error [CUDA]")


def is_device_failure(error: BaseException) -> bool:
    """True when `error` means the device itself failed, so no later step can be trusted (running
    out of memory is not: the allocation failed, nothing was corrupted)."""
    if isinstance(error, torch.OutOfMemoryError):
        return False
    if _DEVICE_ERROR_TYPES and isinstance(error, _DEVICE_ERROR_TYPES):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in _DEVICE_ERROR_MARKERS)


class EngineFailure(LoquetierError):
    """A step failed while this request was in the batch; the engine went on without it."""

    status = 500
    code = "engine_error"


class EngineUnavailable(EngineFailure):
    """The engine takes no more work: the server is shutting down, or the engine stopped on a fatal
    error (its supervisor restarts it). Retrying, elsewhere or later, is the remedy."""

    status = 503

    def __init__(self, message: str, code: str = "engine_unavailable"):
        super().__init__(message)
        self.code = code


@dataclass
class GenerationRequest:
    """One sequence to generate: already tokenized, with its sampling parameters and adapter."""

    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: str | None = None


class RequestGroup:
    """Requests submitted together (prompts x n choices); their outputs arrive on one asyncio queue.

    Closing the group (or leaving `async with`) aborts whatever has not finished, which frees its KV
    blocks on the engine thread.
    """

    def __init__(self, engine: AsyncEngine, size: int):
        self._engine = engine
        self.size = size
        self.request_ids: list[str] = []
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished: set[int] = set()

    @property
    def done(self) -> bool:
        return len(self.finished) == self.size

    async def next_outputs(self) -> dict[int, RequestOutput]:
        """Wait for at least one output; return the newest output per index (outputs carry every
        token so far, so older ones queued behind a slow reader are simply skipped)."""
        items = [await self.queue.get()]
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        latest: dict[int, RequestOutput] = {}
        for index, item in items:
            if isinstance(item, BaseException):
                self.finished.add(index)
                self.close()
                raise item
            if index in self.finished:
                continue
            latest[index] = item
            if item.finished:
                self.finished.add(index)
        return latest

    async def results(self) -> list[RequestOutput]:
        """Wait until every request finished; their final outputs in index order."""
        final: dict[int, RequestOutput] = {}
        try:
            while not self.done:
                for index, out in (await self.next_outputs()).items():
                    if out.finished:
                        final[index] = out
        finally:
            self.close()
        return [final[i] for i in range(self.size)]

    def close(self) -> None:
        """Abort the unfinished requests (idempotent; the abort runs on the engine thread)."""
        pending = [rid for i, rid in enumerate(self.request_ids) if i not in self.finished]
        self.finished.update(range(self.size))
        if pending:
            self._engine.abort_nowait(pending)

    async def __aenter__(self) -> RequestGroup:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class IncrementalDetokenizer:
    """Text deltas of a growing output for streaming (engine/detokenizer.py decodes only the new
    tokens in their context).

    A trailing U+FFFD (a character whose bytes have not all arrived) is held back, and so are the
    last `len(longest stop string) - 1` characters, which a stop string may yet swallow.
    """

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.text = IncrementalText(tokenizer) if tokenizer is not None else None
        self.hold = max((len(s) for s in stop or []), default=1) - 1
        self.sent = ""

    def delta(self, out: RequestOutput) -> str:
        if out.finished:
            text = out.text
        elif self.text is None:   # token-id prompts to a model without a tokenizer: no text
            return ""
        else:
            text = self.text.update(out.token_ids, len(out.token_ids))
            if self.hold:
                text = text[:max(len(self.sent), len(text) - self.hold)]
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        new, self.sent = text[len(self.sent):], text
        return new


class AsyncEngine:
    """Owns the engine (and trainer) thread; every engine call goes through `call`/`submit`."""

    def __init__(self, engine: Engine, trainer=None):
        self.engine = engine
        self.trainer = trainer
        self.fatal: BaseException | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._streams: dict[str, tuple[RequestGroup, int]] = {}   # engine thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count()
        self._last_step_failed = False
        self._refusal: EngineUnavailable | None = None   # set by abort_all: new requests get it
        self._thread = threading.Thread(target=self._run, name="loquetier-engine", daemon=True)

    # ------------------------------------------------------------------ lifecycle
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start the engine thread; outputs are delivered on `loop` (default: the running loop)."""
        self._loop = loop or asyncio.get_running_loop()
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    async def stop_after(self, fn: Callable[[], Any]) -> Any:
        """Run `fn()` as the engine thread's last command (no step runs after it), then stop."""
        def last() -> Any:
            self._stopping = True
            return fn()
        result = await asyncio.wrap_future(self.submit(last))
        await asyncio.to_thread(self.stop)
        return result

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop outputs are delivered on (set by `start`)."""
        return self._loop

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.fatal is None

    # ------------------------------------------------------------------ commands
    def submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `fn()` on the engine thread between steps (thread-safe); its result in a future."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self.fatal is not None:
            fut.set_exception(self._dead_error())
            return fut
        if self._stopping:
            fut.set_exception(EngineUnavailable("the server is shutting down", "server_shutting_down"))
            return fut
        self._commands.put((fn, fut))
        self._wake.set()
        return fut

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Await `fn(*args, **kwargs)` run on the engine thread."""
        return await asyncio.wrap_future(self.submit(lambda: fn(*args, **kwargs)))

    def abort_nowait(self, request_ids: list[str]) -> None:
        """Abort requests (fire and forget); their blocks are freed before the next step."""
        self.submit(lambda: [self._abort(rid) for rid in request_ids])

    def abort_all(self, error: EngineUnavailable) -> int:
        """(engine thread) End every request with `error`, and refuse new ones with it; how many ended."""
        self._refusal = error
        ended = [(group, index, error) for group, index in self._streams.values()]
        for rid in list(self._streams):
            self._abort(rid)
        if ended:
            self._deliver(ended)
        return len(ended)

    # ------------------------------------------------------------------ requests
    async def add(self, requests: list[GenerationRequest]) -> RequestGroup:
        """Add the requests atomically (all or none); raises the engine's error (bad prompt, queue full)."""
        group = RequestGroup(self, len(requests))
        prefix = f"req{next(self._ids)}"

        def add_all() -> list[str]:
            if self._refusal is not None:
                raise self._refusal
            for name in {r.adapter for r in requests} - {None}:
                if name.endswith(TRAINING_SUFFIX) or not self.engine.has_adapter(name):
                    raise AdapterNotFoundError(f"model {name!r} does not exist; GET /v1/models lists the models "
                                               "served here")
            ids: list[str] = []
            try:
                for i, r in enumerate(requests):
                    rid = self.engine.add_request(r.prompt_token_ids, r.params, r.adapter, f"{prefix}-{i}")
                    ids.append(rid)
                    self._streams[rid] = (group, i)
            except BaseException:
                for rid in ids:
                    self._abort(rid)
                raise
            return ids

        fut = self.submit(add_all)
        try:
            group.request_ids = await asyncio.wrap_future(fut)
        except asyncio.CancelledError:   # the client left while we waited: undo if it ran anyway
            fut.add_done_callback(lambda f: None if f.cancelled() or f.exception() else self.abort_nowait(f.result()))
            raise
        return group

    def _abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self.engine.abort(request_id)

    # ------------------------------------------------------------------ the thread
    def _has_work(self) -> bool:
        return self.engine.has_unfinished() or (self.trainer is not None and self.trainer.has_work())

    def _run(self) -> None:
        try:
            while not self._stopping and self.fatal is None:
                self._wake.clear()
                self._run_commands()
                if self._stopping:
                    break
                if not self._has_work():
                    self._wake.wait(timeout=1.0)
                    continue
                steps = self.engine.stats.steps
                self._step()
                if self.engine.stats.steps == steps:   # nothing could run (e.g. waiting on slots)
                    self._wake.wait(timeout=0.005)
        except BaseException as e:  # a bug in the loop itself: fail everything loudly, keep the process up
            log.exception("engine thread died")
            self.fatal = e
        finally:
            self._fail_all(self._dead_error() if self.fatal is not None
                           else EngineUnavailable("the server is shutting down", "server_shutting_down"))

    def _dead_error(self) -> EngineUnavailable:
        return EngineUnavailable(f"the engine stopped on an unrecoverable error ({type(self.fatal).__name__}: "
                                 f"{self.fatal}); the server exits so that its supervisor restarts it", "engine_dead")

    def _run_commands(self) -> None:
        while True:
            try:
                fn, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                fut.set_exception(e)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # noqa: BLE001 - one bad request must not stop serving
            self._recover(e)
            return
        self._last_step_failed = False
        if outputs:
            batch = []
            for out in outputs:
                target = self._streams.get(out.request_id)
                if target is None:
                    continue
                if out.finished:
                    del self._streams[out.request_id]
                # a request the engine ended itself (e.g. its adapter could no longer be read)
                item = EngineFailure(out.error) if out.error else out
                batch.append((target[0], target[1], item))
            if batch:
                self._deliver(batch)

    def _recover(self, error: Exception) -> None:
        """A step raised: fail the requests and training jobs it held, or stop for good when the error
        is fatal. Failing the jobs too (rather than retrying them) keeps a job whose data trips a bug
        from failing every step after, which would be fatal: a restart would resume it into a loop."""
        if is_device_failure(error) or self._last_step_failed:
            log.critical("unrecoverable engine error%s", "" if is_device_failure(error) else
                         " (the step failed again after the work it held was failed)", exc_info=error)
            self.fatal = error
            return
        log.exception("engine step failed; failing the requests and jobs it held", exc_info=error)
        self._last_step_failed = True
        for job in [j for j in self.trainer.jobs.values() if j.in_flight] if self.trainer is not None else []:
            job.fail(f"training step failed: {type(error).__name__}: {error}")
        message = f"generation failed: {type(error).__name__}: {error}"
        failed = []
        for seq in self._requests_in_failed_step():
            target = self._streams.pop(seq.request_id, None)
            self.engine.abort(seq.request_id)
            if target is not None:
                failed.append((target[0], target[1], EngineFailure(message)))
        # a request that finished inside the failed step lost its last output: it must not wait forever
        for rid in [rid for rid in self._streams if rid not in self.engine.requests]:
            group, index = self._streams.pop(rid)
            failed.append((group, index, EngineFailure(message)))
        if failed:
            self._deliver(failed)

    def _requests_in_failed_step(self) -> list:
        """The sequences the failed step scheduled, plus any whose previous step is still in flight
        (asynchronous scheduling: their placeholder tokens were to be settled by this step)."""
        scheduler = self.engine.scheduler
        held = [s.seq for s in scheduler.last_output.scheduled] if scheduler.last_output is not None else []
        held += [seq for seq in scheduler.running
                 if seq.final_in_flight or (seq.output_token_ids and seq.output_token_ids[-1] < 0)]
        return list(dict.fromkeys(s for s in held if not s.is_finished))

    def _deliver(self, batch: list[tuple[RequestGroup, int, Any]]) -> None:
        def put() -> None:
            for group, index, item in batch:
                group.queue.put_nowait((index, item))
        try:
            self._loop.call_soon_threadsafe(put)
        except RuntimeError:   # the event loop is closed: nobody is listening any more
            pass

    def _fail_all(self, error: LoquetierError) -> None:
        pending = [(g, i, error) for g, i in self._streams.values()]
        self._streams.clear()
        if pending and self._loop is not None:
            self._deliver(pending)
        while True:
            try:
                _, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            if fut.set_running_or_notify_cancel():
                fut.set_exception(error)
