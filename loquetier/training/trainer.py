"""Trainer: drives fine-tuning jobs through the engine's mixed batches (one forward with inference)."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import torch

from ..errors import JobNotFoundError, LoquetierError, RequestError
from ..lora.adapter import load_peft_adapter
from .checkpoint import latest_checkpoint
from .data import load_dataset
from .job import JobStatus, TrainingJob
from .spec import TrainSpec


class Trainer:
    """Registers itself as the engine's step participant; owns every job's lifecycle."""

    def __init__(self, engine):
        self.engine = engine
        self.jobs: dict[str, TrainingJob] = {}
        self._rr = 0
        self._ids = itertools.count(1)
        self.scheduled_tokens = 0   # training/eval tokens handed to the engine so far (throughput)
        engine.participant = self

    # ------------------------------------------------------------------ jobs
    def load_data(self, spec: TrainSpec):
        tok = self.engine.tokenizer
        if tok is None:
            raise RequestError("fine-tuning needs a tokenizer in the model directory")
        train = load_dataset(spec.train_file, tok, spec.max_seq_len, spec.overlong)
        evals = load_dataset(spec.eval_file, tok, spec.max_seq_len, spec.overlong) if spec.eval_file else []
        if not evals and spec.eval_split > 0 and len(train) > 1:
            n_eval = max(1, int(round(len(train) * spec.eval_split)))
            order = list(range(len(train)))
            random.Random(spec.seed).shuffle(order)
            evals = [train[i] for i in sorted(order[:n_eval])]
            train = [train[i] for i in sorted(order[n_eval:])]
        return train, evals

    def submit(self, spec: TrainSpec, job_id: str | None = None, resume: bool = True,
               data: tuple[list, list] | None = None) -> TrainingJob:
        """Validate data and start a job; with `resume`, continue from its newest checkpoint if any.
        `data` is `load_data(spec)`'s result when the caller tokenized already (off the engine thread)."""
        spec.validate()
        job_id = job_id or f"job-{next(self._ids)}"
        if job_id in self.jobs and self.jobs[job_id].status in (JobStatus.RUNNING, JobStatus.PAUSED):
            raise RequestError(f"job {job_id} is already running")
        train, evals = data if data is not None else self.load_data(spec)
        ckpt = latest_checkpoint(Path(spec.output_dir)) if resume else None
        initial = None
        if ckpt is not None:
            initial = load_peft_adapter(ckpt, self.engine.args, self.engine.config.lora.max_lora_rank)
            initial.spec = spec.lora
        elif spec.base_adapter:
            initial = self.engine.adapters.snapshot(spec.base_adapter)
        job = TrainingJob(job_id, spec, train, evals, self.engine, initial)
        if ckpt is not None:
            job.restore(ckpt)
            if job.step >= job.total_steps:
                job.finish()
        self.jobs[job_id] = job
        return job

    def get(self, job_id: str) -> TrainingJob:
        if job_id not in self.jobs:
            raise JobNotFoundError(f"no fine-tuning job {job_id!r}")
        return self.jobs[job_id]

    def pause(self, job_id: str) -> None:
        job = self.get(job_id)
        if job.status == JobStatus.RUNNING:
            job.status = JobStatus.PAUSED
            job._event("status", "job paused")

    def resume(self, job_id: str) -> None:
        job = self.get(job_id)
        if job.status == JobStatus.PAUSED:
            job.status = JobStatus.RUNNING
            job._event("status", "job resumed")

    def cancel(self, job_id: str) -> None:
        self.get(job_id).cancel()

    def has_work(self) -> bool:
        return any(j.active for j in self.jobs.values())

    def run(self, max_steps: int | None = None) -> None:
        """Step the engine until every job and request is done (training alone or with traffic).
        The jobs' checkpoints are on disk when it returns."""
        for _ in (range(max_steps) if max_steps else itertools.count()):
            if not (self.has_work() or self.engine.has_unfinished()):
                break
            self.engine.step()
        for job in self.jobs.values():
            job.wait_for_checkpoints()

    # ------------------------------------------------------------------ step participant
    def next_segments(self, budget: int, num_inference_tokens: int):
        """Each running job's next examples that fit the step's training `budget`, jobs in turn."""
        for job in self.jobs.values():
            job.poll_checkpoints()   # paused jobs too: their last checkpoints' events
        active = [j for j in self.jobs.values() if j.active]
        if not active:
            return []
        self._rr = (self._rr + 1) % len(active)
        segments, used = [], 0
        for job in active[self._rr:] + active[:self._rr]:
            # work-conserving: a micro-batch larger than the budget still runs when it rides alone
            alone = not segments and num_inference_tokens == 0
            got = job.next_segments(budget - used, alone)
            segments += got
            used += sum(len(s.token_ids) for s in got)
        self.scheduled_tokens += used
        return segments

    def on_step(self, segments, sums: torch.Tensor, counts: torch.Tensor) -> None:
        """The engine ran a step holding these segments: each job gets its share of the loss sums
        (still on the device; a job's segments are adjacent in the step, training before eval)."""
        start = 0
        for i in range(1, len(segments) + 1):
            if i < len(segments) and segments[i].owner is segments[start].owner \
                    and segments[i].train == segments[start].train:
                continue
            job = segments[start].owner
            if isinstance(job, TrainingJob) and job.state is not None:
                try:
                    job.on_step(sums, start, i, sum(s.num_targets for s in segments[start:i]), segments[start].train)
                except LoquetierError as e:
                    job.fail(str(e))
            start = i

    def on_step_failed(self, segments, message: str) -> None:
        for job in {seg.owner for seg in segments if isinstance(seg.owner, TrainingJob)}:
            if job.active:
                job.fail(message)
