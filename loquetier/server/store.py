"""Durable server state in SQLite: uploaded files, fine-tuning jobs, their events and checkpoints.

One connection in WAL mode, guarded by a lock, so any thread may call any method. File bytes live
under `data_dir/files/`, written atomically (temp file + fsync + rename) before their row exists.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Generic, Literal, TypeVar, get_args

from loquetier.server.protocol import (
    TERMINAL_JOB_STATUSES,
    CheckpointMetrics,
    FileObject,
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobError,
    FineTuningJobEvent,
    Hyperparameters,
    JobStatus,
    LoraParams,
    new_id,
    now,
)

SCHEMA_VERSION = 1
DB_NAME = "loquetier.db"
JOB_STATUSES: tuple[str, ...] = get_args(JobStatus)
RESUMABLE_STATUSES = ("validating_files", "queued", "running")

_SCHEMA = """
CREATE TABLE files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, filename TEXT NOT NULL,
    purpose TEXT NOT NULL, bytes INTEGER NOT NULL, created_at INTEGER NOT NULL,
    status TEXT NOT NULL, path TEXT NOT NULL);
CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, model TEXT NOT NULL,
    created_at INTEGER NOT NULL, finished_at INTEGER, status TEXT NOT NULL,
    training_file TEXT NOT NULL, validation_file TEXT, hyperparameters TEXT NOT NULL,
    lora TEXT, seed INTEGER, suffix TEXT, fine_tuned_model TEXT, error TEXT,
    trained_tokens INTEGER, result_files TEXT NOT NULL DEFAULT '[]',
    spec_json TEXT NOT NULL DEFAULT '{}', checkpoint_dir TEXT);
CREATE INDEX jobs_status ON jobs(status);
CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL, level TEXT NOT NULL, message TEXT NOT NULL, type TEXT NOT NULL,
    data TEXT);
CREATE INDEX events_job ON events(job_id, seq);
CREATE TABLE checkpoints (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL, step INTEGER NOT NULL, adapter_name TEXT NOT NULL,
    path TEXT NOT NULL, metrics TEXT NOT NULL);
CREATE INDEX checkpoints_job ON checkpoints(job_id, seq);
"""

R = TypeVar("R")
Order = Literal["asc", "desc"]


class RecordNotFound(LookupError):
    """A file, job or pagination cursor id that the store does not hold."""


class SchemaVersionError(RuntimeError):
    """The database was written by a newer loquetier than this one."""


@dataclass
class Page(Generic[R]):
    """One page of a listing; `has_more` says whether another page follows."""

    items: list[R]
    has_more: bool


@dataclass
class FileRecord:
    """An uploaded file; `path` is where its bytes are on disk."""

    id: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    status: str
    path: Path

    def to_api(self) -> FileObject:
        return FileObject(id=self.id, bytes=self.bytes, created_at=self.created_at,
                          filename=self.filename, purpose=self.purpose, status=self.status)


@dataclass
class JobRecord:
    """A fine-tuning job: the API object's fields plus the internal spec and checkpoint directory."""

    id: str
    model: str
    created_at: int
    status: str
    training_file: str
    hyperparameters: Hyperparameters
    validation_file: str | None = None
    lora: LoraParams | None = None
    seed: int | None = None
    suffix: str | None = None
    finished_at: int | None = None
    fine_tuned_model: str | None = None
    error: FineTuningJobError | None = None
    trained_tokens: int | None = None
    result_files: list[str] = field(default_factory=list)
    spec_json: str = "{}"
    checkpoint_dir: str | None = None

    def to_api(self) -> FineTuningJob:
        return FineTuningJob(
            id=self.id, model=self.model, created_at=self.created_at, finished_at=self.finished_at,
            fine_tuned_model=self.fine_tuned_model, status=self.status, training_file=self.training_file,
            validation_file=self.validation_file, hyperparameters=self.hyperparameters, seed=self.seed,
            suffix=self.suffix, error=self.error, trained_tokens=self.trained_tokens,
            result_files=self.result_files, lora=self.lora)


@dataclass
class EventRecord:
    """One entry of a job's append-only log; `seq` increases with every event of the store."""

    seq: int
    id: str
    job_id: str
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None

    def to_api(self) -> FineTuningJobEvent:
        return FineTuningJobEvent(id=self.id, created_at=self.created_at, level=self.level,
                                  message=self.message, type=self.type, data=self.data)


@dataclass
class CheckpointRecord:
    """A saved adapter of a job at a training step; `adapter_name` is `NAME:step-K`."""

    id: str
    job_id: str
    created_at: int
    step: int
    adapter_name: str
    path: Path
    metrics: dict[str, float]

    def to_api(self) -> FineTuningJobCheckpoint:
        return FineTuningJobCheckpoint(
            id=self.id, created_at=self.created_at, fine_tuned_model_checkpoint=self.adapter_name,
            step_number=self.step, metrics=CheckpointMetrics(**self.metrics), fine_tuning_job_id=self.job_id)


_UNSET: Any = object()


def _check_status(status: str) -> str:
    if status not in JOB_STATUSES:
        raise ValueError(f"unknown job status {status!r}; expected one of {', '.join(JOB_STATUSES)}")
    return status


class Store:
    """SQLite-backed state under `data_dir`; reopening the same directory gives back the same data."""

    def __init__(self, data_dir: str | Path):
        self.data_dir = Path(data_dir)
        self.files_dir = self.data_dir / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self.data_dir / DB_NAME, check_same_thread=False,
                                     isolation_level=None, timeout=30.0)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._migrate()

    def _migrate(self) -> None:
        with self._lock:
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise SchemaVersionError(
                    f"{self.data_dir / DB_NAME} has schema version {version}, newer than this loquetier's "
                    f"{SCHEMA_VERSION}; upgrade loquetier or use another --data-dir")
            if version == 0:
                self._conn.executescript(f"BEGIN; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
            # Future versions: `if version == 1: ALTER TABLE ...; PRAGMA user_version = 2`.

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def _page(self, table: str, where: str, args: tuple, after: str | None, limit: int,
              order: Order) -> tuple[list[sqlite3.Row], bool]:
        """Rows of `table` matching `where`, after the cursor id `after`, in `order` of insertion."""
        assert order in ("asc", "desc") and table in ("files", "jobs", "events", "checkpoints")
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        with self._lock:
            if after is not None:
                row = self._conn.execute(f"SELECT seq FROM {table} WHERE id = ?", (after,)).fetchone()
                if row is None:
                    raise RecordNotFound(f"no {table[:-1]} with id {after!r} (the `after` cursor)")
                where += " AND seq > ?" if order == "asc" else " AND seq < ?"
                args = (*args, row["seq"])
            rows = self._conn.execute(
                f"SELECT * FROM {table} WHERE {where} ORDER BY seq {order.upper()} LIMIT ?",
                (*args, limit + 1)).fetchall()
        return rows[:limit], len(rows) > limit

    # -- files ----------------------------------------------------------------------------------

    def create_file(self, filename: str, purpose: str, content: bytes | BinaryIO,
                    status: str = "processed") -> FileRecord:
        """Store an upload: bytes are written atomically under `files/`, then the row is added."""
        file_id = new_id("file")
        path = self.files_dir / file_id
        fd, tmp = tempfile.mkstemp(prefix=f".{file_id}.", suffix=".tmp", dir=self.files_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                if isinstance(content, (bytes, bytearray, memoryview)):
                    f.write(content)
                else:
                    shutil.copyfileobj(content, f, 1 << 20)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        record = FileRecord(id=file_id, filename=filename, purpose=purpose, bytes=path.stat().st_size,
                            created_at=now(), status=status, path=path)
        try:
            with self._lock:
                self._conn.execute(
                    "INSERT INTO files (id, filename, purpose, bytes, created_at, status, path)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (file_id, filename, purpose, record.bytes, record.created_at, status,
                     str(path.relative_to(self.data_dir))))
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return record

    def _file(self, row: sqlite3.Row) -> FileRecord:
        return FileRecord(id=row["id"], filename=row["filename"], purpose=row["purpose"], bytes=row["bytes"],
                          created_at=row["created_at"], status=row["status"], path=self.data_dir / row["path"])

    def get_file(self, file_id: str) -> FileRecord | None:
        rows = self._query("SELECT * FROM files WHERE id = ?", (file_id,))
        return self._file(rows[0]) if rows else None

    def read_file(self, file_id: str) -> bytes:
        """The bytes of an uploaded file."""
        record = self.get_file(file_id)
        if record is None:
            raise RecordNotFound(f"no file with id {file_id!r}")
        return record.path.read_bytes()

    def list_files(self, after: str | None = None, limit: int = 20, purpose: str | None = None,
                   order: Order = "desc") -> Page[FileRecord]:
        """Files, newest first by default, optionally of one purpose."""
        where, args = ("purpose = ?", (purpose,)) if purpose is not None else ("1", ())
        rows, more = self._page("files", where, args, after, limit, order)
        return Page([self._file(r) for r in rows], more)

    def delete_file(self, file_id: str) -> bool:
        """Remove a file's row and bytes; False if there was no such file."""
        with self._lock:
            record = self.get_file(file_id)
            if record is None:
                return False
            self._conn.execute("DELETE FROM files WHERE id = ?", (file_id,))
        record.path.unlink(missing_ok=True)
        return True

    # -- jobs -----------------------------------------------------------------------------------

    def create_job(self, model: str, training_file: str, hyperparameters: Hyperparameters, *,
                   validation_file: str | None = None, lora: LoraParams | None = None,
                   seed: int | None = None, suffix: str | None = None, spec_json: str = "{}",
                   checkpoint_dir: str | None = None, status: str = "queued") -> JobRecord:
        """Add a job (by default `queued`, so a restart resumes it)."""
        job = JobRecord(id=new_id("ftjob"), model=model, created_at=now(), status=_check_status(status),
                        training_file=training_file, hyperparameters=hyperparameters,
                        validation_file=validation_file, lora=lora, seed=seed, suffix=suffix,
                        spec_json=spec_json, checkpoint_dir=checkpoint_dir)
        with self._lock:
            self._conn.execute(
                "INSERT INTO jobs (id, model, created_at, status, training_file, validation_file,"
                " hyperparameters, lora, seed, suffix, spec_json, checkpoint_dir)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job.id, model, job.created_at, status, training_file, validation_file,
                 hyperparameters.model_dump_json(), lora.model_dump_json() if lora else None,
                 seed, suffix, spec_json, checkpoint_dir))
        return job

    @staticmethod
    def _job(row: sqlite3.Row) -> JobRecord:
        return JobRecord(
            id=row["id"], model=row["model"], created_at=row["created_at"], status=row["status"],
            training_file=row["training_file"],
            hyperparameters=Hyperparameters.model_validate_json(row["hyperparameters"]),
            validation_file=row["validation_file"],
            lora=LoraParams.model_validate_json(row["lora"]) if row["lora"] else None,
            seed=row["seed"], suffix=row["suffix"], finished_at=row["finished_at"],
            fine_tuned_model=row["fine_tuned_model"],
            error=FineTuningJobError.model_validate_json(row["error"]) if row["error"] else None,
            trained_tokens=row["trained_tokens"], result_files=json.loads(row["result_files"]),
            spec_json=row["spec_json"], checkpoint_dir=row["checkpoint_dir"])

    def get_job(self, job_id: str) -> JobRecord | None:
        rows = self._query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return self._job(rows[0]) if rows else None

    def list_jobs(self, after: str | None = None, limit: int = 20, order: Order = "desc") -> Page[JobRecord]:
        """Jobs, newest first by default."""
        rows, more = self._page("jobs", "1", (), after, limit, order)
        return Page([self._job(r) for r in rows], more)

    def update_job(self, job_id: str, *, status: str = _UNSET, fine_tuned_model: str | None = _UNSET,
                   error: FineTuningJobError | None = _UNSET, trained_tokens: int | None = _UNSET,
                   finished_at: int | None = _UNSET, result_files: list[str] = _UNSET,
                   spec_json: str = _UNSET, checkpoint_dir: str | None = _UNSET) -> JobRecord:
        """Set the given fields of a job. Entering a terminal status stamps `finished_at` if not given."""
        values: dict[str, Any] = {}
        if status is not _UNSET:
            values["status"] = _check_status(status)
            if status in TERMINAL_JOB_STATUSES and finished_at is _UNSET:
                finished_at = now()
        if fine_tuned_model is not _UNSET:
            values["fine_tuned_model"] = fine_tuned_model
        if error is not _UNSET:
            values["error"] = error.model_dump_json() if error is not None else None
        if trained_tokens is not _UNSET:
            values["trained_tokens"] = trained_tokens
        if finished_at is not _UNSET:
            values["finished_at"] = finished_at
        if result_files is not _UNSET:
            values["result_files"] = json.dumps(result_files)
        if spec_json is not _UNSET:
            values["spec_json"] = spec_json
        if checkpoint_dir is not _UNSET:
            values["checkpoint_dir"] = checkpoint_dir
        with self._lock:
            if values:
                sets = ", ".join(f"{k} = ?" for k in values)
                self._conn.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*values.values(), job_id))
            job = self.get_job(job_id)
        if job is None:
            raise RecordNotFound(f"no fine-tuning job with id {job_id!r}")
        return job

    def update_job_status(self, job_id: str, status: str,
                          error: FineTuningJobError | None = None) -> JobRecord:
        """Move a job to `status` (with `error` when it failed)."""
        if error is None:
            return self.update_job(job_id, status=status)
        return self.update_job(job_id, status=status, error=error)

    def jobs_to_resume(self) -> list[JobRecord]:
        """Jobs that were in flight (validating_files/queued/running) when the process stopped, oldest first."""
        marks = ", ".join("?" for _ in RESUMABLE_STATUSES)
        rows = self._query(f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY seq", RESUMABLE_STATUSES)
        return [self._job(r) for r in rows]

    # -- events ---------------------------------------------------------------------------------

    def add_event(self, job_id: str, message: str, level: str = "info", type: str = "message",
                  data: dict[str, Any] | None = None) -> EventRecord:
        """Append an event to a job's log."""
        event_id, created_at = new_id("ftevent"), now()
        with self._lock:
            cur = self._conn.execute(
                "INSERT INTO events (id, job_id, created_at, level, message, type, data)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (event_id, job_id, created_at, level, message, type,
                 json.dumps(data) if data is not None else None))
            seq = cur.lastrowid
        return EventRecord(seq, event_id, job_id, created_at, level, message, type, data)

    def list_events(self, job_id: str, after: str | None = None, limit: int = 20,
                    order: Order = "desc") -> Page[EventRecord]:
        """A job's events, newest first by default (as OpenAI lists them); `order="asc"` to tail a log."""
        rows, more = self._page("events", "job_id = ?", (job_id,), after, limit, order)
        return Page([EventRecord(r["seq"], r["id"], r["job_id"], r["created_at"], r["level"], r["message"],
                                 r["type"], json.loads(r["data"]) if r["data"] else None)
                     for r in rows], more)

    # -- checkpoints ----------------------------------------------------------------------------

    def add_checkpoint(self, job_id: str, step: int, adapter_name: str, path: str | Path,
                       metrics: dict[str, float] | None = None) -> CheckpointRecord:
        """Record a checkpoint saved at `path` and served as `adapter_name` (`NAME:step-K`)."""
        ckpt = CheckpointRecord(id=new_id("ftckpt"), job_id=job_id, created_at=now(), step=step,
                                adapter_name=adapter_name, path=Path(path), metrics=dict(metrics or {}))
        with self._lock:
            self._conn.execute(
                "INSERT INTO checkpoints (id, job_id, created_at, step, adapter_name, path, metrics)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (ckpt.id, job_id, ckpt.created_at, step, adapter_name, str(ckpt.path), json.dumps(ckpt.metrics)))
        return ckpt

    def list_checkpoints(self, job_id: str, after: str | None = None, limit: int = 10,
                         order: Order = "desc") -> Page[CheckpointRecord]:
        """A job's checkpoints, newest first by default."""
        rows, more = self._page("checkpoints", "job_id = ?", (job_id,), after, limit, order)
        return Page([CheckpointRecord(r["id"], r["job_id"], r["created_at"], r["step"], r["adapter_name"],
                                      Path(r["path"]), json.loads(r["metrics"])) for r in rows], more)
