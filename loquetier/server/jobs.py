"""Fine-tuning jobs of the API: OpenAI's job objects in the SQLite `Store`, training in the `Trainer`.

Creating a job checks and tokenizes its file (off the engine thread), builds a `TrainSpec` and
starts it on the engine thread; a listener on each `TrainingJob` writes its status, events and
checkpoints to the store. At start-up, `restore` makes every finished model and checkpoint servable
again (lazily, by path) and resumes the jobs that were in flight from their last checkpoint.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from pathlib import Path

import numpy as np

from ..errors import AdapterError, AdapterNotFoundError, LoquetierError, RequestError
from ..lora.adapter import LoraSpec
from ..training.checkpoint import CKPT_PREFIX, latest_checkpoint
from ..training.job import JobEvent, JobStatus, TrainingJob
from ..training.packing import steps_in_epoch
from ..training.spec import TrainSpec
from ..training.trainer import Trainer
from .config import ServerConfig
from .engine_loop import TRAINING_SUFFIX, AsyncEngine, EngineFailure
from .metrics import ServerMetrics
from .protocol import (
    TERMINAL_JOB_STATUSES,
    CreateFineTuningJobRequest,
    FineTuningJobError,
    Hyperparameters,
)
from .store import JobRecord, Page, RecordNotFound, Store

log = logging.getLogger("loquetier.server")

_API_STATUS = {JobStatus.RUNNING: "running", JobStatus.PAUSED: "paused", JobStatus.SUCCEEDED: "succeeded",
               JobStatus.FAILED: "failed", JobStatus.CANCELLED: "cancelled"}


SLOT_POLL_S = 0.2   # how often a queued job looks for a free adapter slot


class _NoFreeSlot(Exception):
    """Every adapter slot is pinned (by running requests or other jobs): the job stays queued."""


class NotFound(LoquetierError):
    """An unknown file, job or pagination cursor."""

    status = 404
    code = "not_found"


def fine_tuned_model_name(base: str, job_id: str, suffix: str | None) -> str:
    """OpenAI-style `ft:{base}:{suffix}:{short id}` (`ft:{base}:{short id}` without a suffix)."""
    short = job_id.split("-", 1)[-1][:8]
    return f"ft:{base}:{suffix}:{short}" if suffix else f"ft:{base}:{short}"


def split_batch(batch_size: int, max_micro: int) -> tuple[int, int]:
    """(micro_batch_size, grad_accum) with micro * accum == batch_size and micro <= max_micro."""
    micro = max(d for d in range(1, min(batch_size, max_micro) + 1) if batch_size % d == 0)
    return micro, batch_size // micro


def fetch_page(fetch):
    """A store listing, with an unknown `after` cursor as 404 and a bad limit as 400."""
    try:
        return fetch()
    except RecordNotFound as e:
        raise NotFound(str(e)) from None
    except ValueError as e:
        raise RequestError(str(e)) from None


class JobService:
    """The fine-tuning jobs API over the store (durable state) and the trainer (live state)."""

    def __init__(self, config: ServerConfig, store: Store, aengine: AsyncEngine, trainer: Trainer,
                 metrics: ServerMetrics | None = None):
        self.config, self.store, self.aengine, self.trainer = config, store, aengine, trainer
        self.engine = aengine.engine
        self.metrics = metrics
        self.jobs_dir = Path(store.data_dir) / "jobs"
        self._status: dict[str, str] = {}                       # last status written, per job
        self._rate: dict[str, tuple[float, int]] = {}           # (time, trained tokens) at the last step

    # ------------------------------------------------------------------ reads (any thread)
    def get(self, job_id: str) -> JobRecord:
        job = self.store.get_job(job_id)
        if job is None:
            raise NotFound(f"no fine-tuning job with id {job_id!r}")
        return job

    def list(self, after: str | None, limit: int) -> Page[JobRecord]:
        return fetch_page(lambda: self.store.list_jobs(after=after, limit=limit))

    def events(self, job_id: str, after: str | None, limit: int):
        self.get(job_id)
        return fetch_page(lambda: self.store.list_events(job_id, after=after, limit=limit))

    def checkpoints(self, job_id: str, after: str | None, limit: int):
        self.get(job_id)
        return fetch_page(lambda: self.store.list_checkpoints(job_id, after=after, limit=limit))

    # ------------------------------------------------------------------ create
    async def create(self, req: CreateFineTuningJobRequest) -> JobRecord:
        """Check the request and its files, tokenize, record the job and start it."""
        base_adapter = None
        if req.model != self.config.model_name:
            known = await self.aengine.call(self.engine.has_adapter, req.model)
            if not known or req.model.endswith(TRAINING_SUFFIX):
                raise AdapterNotFoundError(f"model {req.model!r} does not exist; fine-tune "
                                           f"{self.config.model_name!r} or one of its adapters (GET /v1/models)")
            base_adapter = req.model
        if req.seed is not None and not 0 <= req.seed < 2 ** 63:
            raise RequestError(f"seed must be in [0, 2**63), got {req.seed}")
        train_file = self._file(req.training_file, "training_file")
        eval_file = self._file(req.validation_file, "validation_file") if req.validation_file else None
        lora = req.lora
        if lora.r > self.config.max_lora_rank:
            raise RequestError(f"lora.r={lora.r} exceeds this server's max LoRA rank "
                               f"{self.config.max_lora_rank}; use a smaller rank or restart with --max-lora-rank")
        spec = TrainSpec(
            name="", train_file=str(train_file), output_dir="", eval_file=str(eval_file) if eval_file else None,
            base_adapter=base_adapter, seed=req.seed if req.seed is not None else random.randrange(2**31),
            max_seq_len=self.engine.max_model_len,
            lora=LoraSpec(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=list(lora.target_modules), use_rslora=lora.use_rslora))
        try:
            spec.lora.modules(self.engine.args, strict=True)
        except AdapterError as e:   # modules the model does not have: the request's fault, a 400
            raise AdapterError(str(e), param="lora.target_modules") from None
        # tokenizing may take a while: do it here, not on the engine thread
        data = await asyncio.to_thread(self.trainer.load_data, spec)
        train, _ = data
        hp = req.resolved_hyperparameters()
        epochs = self.config.default_epochs if hp.n_epochs == "auto" else hp.n_epochs
        batch = max(1, min(16, len(train) // 50)) if hp.batch_size == "auto" else hp.batch_size
        multiplier = 1.0 if hp.learning_rate_multiplier == "auto" else hp.learning_rate_multiplier
        spec.epochs, spec.learning_rate = epochs, self.config.base_learning_rate * multiplier
        if hp.micro_batch_tokens:
            spec.micro_batch_tokens = hp.micro_batch_tokens
            spec.grad_accum = 1 if hp.batch_size == "auto" else hp.batch_size
        else:
            spec.micro_batch_size, spec.grad_accum = split_batch(batch, self.config.max_micro_batch_size)
        steps_per_epoch = steps_in_epoch(spec, np.asarray([len(ex.input_ids) for ex in train]), 0)
        spec.checkpoint_interval = self.config.checkpoint_interval or steps_per_epoch
        spec.eval_interval = spec.checkpoint_interval if data[1] else None
        spec.validate()
        record = self.store.create_job(
            req.model, req.training_file,
            Hyperparameters(n_epochs=epochs, batch_size=batch, learning_rate_multiplier=multiplier,
                            micro_batch_tokens=hp.micro_batch_tokens),
            validation_file=req.validation_file, lora=req.lora, seed=spec.seed, suffix=req.suffix)
        spec.name = fine_tuned_model_name(self.config.short_model_name, record.id, req.suffix)
        spec.output_dir = str(self.jobs_dir / record.id)
        self.store.update_job(record.id, spec_json=json.dumps(spec.to_dict()), checkpoint_dir=spec.output_dir)
        self.store.add_event(record.id, f"created fine-tuning job {record.id}: {len(train)} examples, "
                                        f"{epochs} epochs, {steps_per_epoch * epochs} steps")
        self._status[record.id] = "queued"
        try:
            await self.aengine.call(self._start_or_queue, record.id, spec, data)
        except Exception as e:  # noqa: BLE001 - the job is recorded: it fails, with the reason
            if not isinstance(e, LoquetierError):
                log.exception("starting job %s failed", record.id)
            self._fail(record.id, str(e))
        return self.get(record.id)

    def _file(self, file_id: str, param: str) -> Path:
        rec = self.store.get_file(file_id)
        if rec is None:
            raise NotFound(f"{param}: no file with id {file_id!r}")
        return rec.path

    # ------------------------------------------------------------------ engine thread
    def _start_or_queue(self, job_id: str, spec: TrainSpec, data=None) -> None:
        """Start the job, or keep it queued until an adapter slot frees (then it starts by itself)."""
        try:
            self._start(job_id, spec, data)
        except _NoFreeSlot:
            self._status[job_id] = "queued"
            self.store.update_job_status(job_id, "queued")
            self.store.add_event(job_id, "every adapter slot is in use; the job starts when one is free")
            asyncio.run_coroutine_threadsafe(self._start_when_a_slot_frees(job_id, spec, data), self.aengine.loop)

    async def _start_when_a_slot_frees(self, job_id: str, spec: TrainSpec, data) -> None:
        while True:
            await asyncio.sleep(SLOT_POLL_S)
            record = self.store.get_job(job_id)
            if record is None or record.status != "queued":   # cancelled meanwhile
                return
            try:
                await self.aengine.call(self._start, job_id, spec, data)
                return
            except _NoFreeSlot:
                continue
            except EngineFailure:   # the engine stopped: a restarted server resumes the queued job
                return
            except Exception as e:  # noqa: BLE001 - the job is recorded: it fails, with the reason
                if not isinstance(e, LoquetierError):
                    log.exception("starting job %s failed", job_id)
                self._fail(job_id, str(e))
                return

    def _start(self, job_id: str, spec: TrainSpec, data=None) -> TrainingJob:
        if not self.engine.adapters.fits({spec.name + TRAINING_SUFFIX}):
            raise _NoFreeSlot
        if spec.base_adapter is not None:
            self.engine.ensure_adapter(spec.base_adapter)   # it may be known only by its path (after a restart)
        job = self.trainer.submit(spec, job_id, resume=True, data=data)
        for event in list(job.events):   # emitted inside submit (resume, finish) before we listened
            self._on_event(job, event)
        job.listeners.append(self._on_event)
        self._sync_status(job)
        return job

    def _on_event(self, job: TrainingJob, ev: JobEvent) -> None:
        try:
            if ev.kind == "metrics":
                self.store.add_event(job.id, ev.message, type="metrics", data=ev.data)
                self._observe(job, ev.data.get("train_loss"))
            elif ev.kind == "checkpoint":
                step = ev.data["step"]
                metrics = {"step": float(step)}
                # the losses of that step: the event comes once the files are written, maybe
                # a few steps later
                for key, losses in (("train_loss", job.losses), ("valid_loss", job.eval_losses)):
                    value = next((v for s, v in reversed(losses) if s == step), None)
                    if value is not None:
                        metrics[key] = value
                self.store.add_checkpoint(job.id, step, ev.data["name"], ev.data["path"], metrics)
                self.store.add_event(job.id, ev.message, data=ev.data)
            else:
                level = "error" if job.status == JobStatus.FAILED else "info"
                self.store.add_event(job.id, ev.message, level=level, data=ev.data or None)
            self._sync_status(job)
        except Exception:  # noqa: BLE001 - bookkeeping must never break a training step
            log.exception("recording event of job %s failed", job.id)

    def _sync_status(self, job: TrainingJob) -> None:
        status = _API_STATUS[job.status]
        if status == self._status.get(job.id):
            if job.status == JobStatus.RUNNING and job.step % 10 == 0:
                self.store.update_job(job.id, trained_tokens=job.trained_tokens)
            return
        self._status[job.id] = status
        fields: dict = {"status": status, "trained_tokens": job.trained_tokens}
        if job.status == JobStatus.SUCCEEDED:
            fields["fine_tuned_model"] = job.spec.name
            fields["result_files"] = [str(p) for _, _, p in job.checkpoints[-1:]]
        if job.status == JobStatus.FAILED:
            fields["error"] = FineTuningJobError(code="training_failed", message=job.error or "job failed")
        self.store.update_job(job.id, **fields)
        if status in TERMINAL_JOB_STATUSES and self.metrics is not None:
            self.metrics.remove_job(job.id)

    def _observe(self, job: TrainingJob, loss: float | None) -> None:
        if self.metrics is None:
            return
        now = time.monotonic()
        t0, tokens0 = self._rate.get(job.id, (job.started, 0))
        rate = (job.trained_tokens - tokens0) / max(1e-9, now - t0)
        self._rate[job.id] = (now, job.trained_tokens)
        self.metrics.set_job(job.id, rate, loss)

    def _fail(self, job_id: str, message: str) -> None:
        self._status[job_id] = "failed"
        self.store.update_job_status(job_id, "failed", FineTuningJobError(code="training_failed", message=message))
        self.store.add_event(job_id, f"job failed: {message}", level="error")

    # ------------------------------------------------------------------ cancel / pause / resume
    async def cancel(self, job_id: str) -> JobRecord:
        return await self._control(job_id, "cancel")

    async def pause(self, job_id: str) -> JobRecord:
        return await self._control(job_id, "pause")

    async def resume(self, job_id: str) -> JobRecord:
        return await self._control(job_id, "resume")

    async def _control(self, job_id: str, action: str) -> JobRecord:
        record = self.get(job_id)
        await self.aengine.call(self._control_on_engine, record, action)
        return self.get(job_id)

    def _control_on_engine(self, record: JobRecord, action: str) -> None:
        job = self.trainer.jobs.get(record.id)
        status = _API_STATUS[job.status] if job is not None else record.status
        allowed = {"cancel": ("queued", "running", "paused", "validating_files"),
                   "pause": ("running",), "resume": ("paused",)}[action]
        if status not in allowed:
            done = {"cancel": "cancelled", "pause": "paused", "resume": "resumed"}[action]
            raise RequestError(f"job {record.id} is {status}; only a job that is {' or '.join(allowed)} "
                               f"can be {done}")
        if job is not None:
            getattr(self.trainer, action)(record.id)
        elif action == "cancel":   # known only to the store (paused before a restart)
            self._status[record.id] = "cancelled"
            self.store.update_job_status(record.id, "cancelled")
            self.store.add_event(record.id, "job cancelled")
        elif action == "resume":   # paused before a restart: start it again from its checkpoint
            self._status[record.id] = "paused"
            self._start_or_queue(record.id, TrainSpec.from_dict(json.loads(record.spec_json)))

    def checkpoint_for_shutdown(self) -> list[str]:
        """(engine thread) Save every running job at its last finished optimizer step, so a restarted
        server resumes it there (a paused one resumes from its last checkpoint); the ids saved."""
        saved = []
        for job in self.trainer.jobs.values():
            if job.status != JobStatus.RUNNING:
                continue
            try:
                job.save_resume_point()
                saved.append(job.id)
            except Exception:  # noqa: BLE001 - one job's disk trouble must not stop the others' saves
                log.exception("checkpointing job %s at shutdown failed", job.id)
        return saved

    # ------------------------------------------------------------------ start-up
    def restore(self) -> None:
        """(engine thread) Serve every stored fine-tuned model and checkpoint again; resume in-flight jobs."""
        after = None
        while True:
            page = self.store.list_jobs(after=after, limit=100, order="asc")
            for record in page.items:
                self._register(record)
            if not page.has_more:
                break
            after = page.items[-1].id
        for record in self.store.jobs_to_resume():
            self._status[record.id] = record.status
            try:
                spec = TrainSpec.from_dict(json.loads(record.spec_json))
                self._start_or_queue(record.id, spec)
                self.store.add_event(record.id, "server restarted; job resumed")
            except Exception as e:  # noqa: BLE001 - one broken job must not stop the server
                log.exception("cannot resume job %s", record.id)
                self._fail(record.id, f"could not resume after a restart: {e}")

    def _register(self, record: JobRecord) -> None:
        """Make a job's checkpoints (and its final model) servable by name, read from disk when asked for."""
        if not record.spec_json or record.spec_json == "{}":
            return
        name = json.loads(record.spec_json)["name"]
        known = {c.adapter_name for c in self._all_checkpoints(record.id)}
        out = Path(record.checkpoint_dir) if record.checkpoint_dir else None
        if out is not None and out.is_dir():   # checkpoints saved just before a crash, not yet recorded
            for path in sorted(out.iterdir()):
                step = path.name[len(CKPT_PREFIX):]
                if path.name.startswith(CKPT_PREFIX) and step.isdigit() and (path / "trainer_state.json").is_file():
                    ckpt_name = f"{name}:step-{int(step)}"
                    if ckpt_name not in known:
                        self.store.add_checkpoint(record.id, int(step), ckpt_name, path, {"step": float(step)})
        for ckpt in self._all_checkpoints(record.id):
            if ckpt.path.is_dir() and not self.engine.has_adapter(ckpt.adapter_name):
                self.engine.adapter_paths[ckpt.adapter_name] = (ckpt.path, name)
        if record.status == "succeeded" and record.fine_tuned_model and out is not None:
            last = latest_checkpoint(out)
            if last is not None and not self.engine.has_adapter(record.fine_tuned_model):
                self.engine.adapter_paths[record.fine_tuned_model] = (last, None)

    def _all_checkpoints(self, job_id: str):
        return self.store.list_checkpoints(job_id, limit=10_000, order="asc").items
