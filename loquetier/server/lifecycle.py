"""Graceful shutdown: on SIGTERM the server drains, checkpoints its fine-tuning jobs and exits 0.

Draining (as vLLM's `--shutdown-timeout`): new work (any /v1 request that is not a GET) gets 503,
`/health` answers 503 so load balancers stop routing here, and the requests already in flight run to
the end for up to `shutdown_timeout` seconds; whatever is still running then is aborted with an
error. Then every running job saves a checkpoint at its last finished optimizer step, the
engine thread stops, and uvicorn closes. A restarted server resumes those jobs from there. A second
signal exits at once. When the engine stops on a fatal error the server exits with status 1, so a
supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator

import uvicorn

from .engine_loop import AsyncEngine, EngineUnavailable
from .jobs import JobService

log = logging.getLogger("loquetier.server")


class Lifecycle:
    """Serving or draining; counts the in-flight requests that do work (the ones a drain waits for)."""

    def __init__(self, aengine: AsyncEngine, jobs: JobService):
        self.aengine, self.jobs = aengine, jobs
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def engine_failed(self) -> bool:
        return self.aengine.fatal is not None

    @contextlib.contextmanager
    def tracking(self) -> Iterator[None]:
        """Count one request in flight for as long as the block runs (its whole response)."""
        self.in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def _wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def drain(self, timeout: float) -> None:
        """Stop admitting work, let in-flight requests finish (abort them after `timeout` s), then
        checkpoint every live job and stop the engine thread."""
        self.draining = True
        log.warning("shutting down: refusing new work; waiting up to %gs for %d request(s) in flight",
                    timeout, self.in_flight)
        if not await self._wait_idle(timeout) and not self.engine_failed:
            ended = await self.aengine.call(self.aengine.abort_all, EngineUnavailable(
                f"the server is shutting down and this request did not finish within the shutdown timeout "
                f"({timeout:g}s)", "server_shutting_down"))
            log.warning("aborted %d request(s) still running after %gs", ended, timeout)
            await self._wait_idle(5.0)   # their responses end with that error
        if self.engine_failed:
            return   # nothing trustworthy to checkpoint: jobs resume from their last checkpoint
        saved = await self.aengine.stop_after(self.jobs.checkpoint_for_shutdown)
        log.warning("checkpointed %d fine-tuning job(s); a restarted server resumes them", len(saved))


class GracefulServer(uvicorn.Server):
    """uvicorn's server whose first SIGTERM/SIGINT drains the app (`Lifecycle.drain`) before it exits,
    and which exits when the engine stops on a fatal error."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, shutdown_timeout: float):
        super().__init__(config)
        self.lifecycle, self.shutdown_timeout = lifecycle, shutdown_timeout
        self._signals = 0
        self._drain: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame) -> None:
        # runs in the signal handler: only set flags; on_tick starts the drain on the event loop.
        # Not recording the signal (as uvicorn does) keeps it from being re-raised after shutdown,
        # which would turn a clean drain into death by SIGTERM.
        self._signals += 1
        if self._signals > 1:
            log.warning("second %s: exiting now", signal.Signals(sig).name)
            self.should_exit = self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self._signals and self._drain is None:
            self._drain = asyncio.create_task(self._drain_then_exit())
        if self.lifecycle.engine_failed and not self.should_exit:
            log.critical("the engine stopped on a fatal error: exiting with status 1")
            self.should_exit = True
        return await super().on_tick(counter)

    async def _drain_then_exit(self) -> None:
        try:
            await self.lifecycle.drain(self.shutdown_timeout)
        except Exception:  # noqa: BLE001 - a failed drain must still let the process exit
            log.exception("graceful shutdown failed")
        self.should_exit = True
