"""Trainer: drives fine-tuning jobs through the engine's mixed batches (one forward with inference)."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import torch

from ..engine.faults import is_device_failure, training_failure_message
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
        """Step the engine until every job and request is done (training alone or with traffic)."""
        for _ in (range(max_steps) if max_steps else itertools.count()):
            if not (self.has_work() or self.engine.has_unfinished()):
                return
            self.engine.step()

    # ------------------------------------------------------------------ step participant
    def next_segments(self, budget: int, num_inference_tokens: int):
        active = [j for j in self.jobs.values() if j.active and not j.in_flight]
        if not active:
            return []
        self._rr = (self._rr + 1) % len(active)
        segments, used = [], 0
        for job in active[self._rr:] + active[:self._rr]:
            need = job.peek_tokens()
            # work-conserving: a micro-batch larger than the budget still runs when it rides alone
            alone = not segments and num_inference_tokens == 0
            if used + need <= budget or alone:
                segments += job.next_segments()
                used += need
        self.scheduled_tokens += used
        return segments

    def grad_plan(self, segments):
        """For a step of only this trainer's training segments: each segment's weight in the total
        loss (1 / its job's window tokens, as `TrainingJob.train_loss`) and every trained parameter,
        job by job; None for any other step (the losses then come back through `on_losses`)."""
        jobs: dict[TrainingJob, None] = {}
        for seg in segments:
            if not (seg.train and isinstance(seg.owner, TrainingJob)):
                return None
            jobs[seg.owner] = None
        weights = [1.0 / max(1, seg.owner.window_tokens) for seg in segments]
        return weights, tuple(p for job in jobs for p in job.params)

    def on_grads(self, segments, sums: torch.Tensor, counts: torch.Tensor, grads) -> None:
        """A step planned by `grad_plan`: hand each job its loss and its parameters' gradients."""
        per_job, _ = _by_job(segments)
        offset = 0
        for job, idx in per_job.items():
            loss = _micro_loss(job, idx, segments, sums)
            n = len(job.params)
            try:
                job.add_grads(grads[offset:offset + n])
                job.after_backward(loss)
            except LoquetierError as e:
                job.fail(str(e))
            offset += n

    def on_step_failed(self, segments, message: str) -> None:
        for job in {seg.owner for seg in segments if isinstance(seg.owner, TrainingJob)}:
            job.fail(message)

    def on_losses(self, segments, sums: torch.Tensor, counts: torch.Tensor) -> None:
        per_job, evals = _by_job(segments)
        for job, idx in evals.items():
            job.eval_loss(float(sum(sums[i] for i in idx)), sum(segments[i].num_targets for i in idx))
        if not per_job:
            return
        losses = {job: _micro_loss(job, idx, segments, sums) for job, idx in per_job.items()}
        total = sum(losses.values())
        try:
            total.backward()
        except RuntimeError as e:  # keep serving: this job fails, the engine does not
            if is_device_failure(e):   # the device is lost: the engine's caller stops it
                raise
            for job in losses:
                job.fail(training_failure_message(e))
            return
        for job, loss in losses.items():
            try:
                job.after_backward(loss.detach())
            except LoquetierError as e:
                job.fail(str(e))


def _by_job(segments) -> tuple[dict[TrainingJob, list[int]], dict[TrainingJob, list[int]]]:
    """Indices of each job's training and evaluation segments (a caller's own segments are left out)."""
    train: dict[TrainingJob, list[int]] = {}
    evals: dict[TrainingJob, list[int]] = {}
    for i, seg in enumerate(segments):
        if isinstance(seg.owner, TrainingJob):
            (train if seg.train else evals).setdefault(seg.owner, []).append(i)
    return train, evals


def _micro_loss(job: TrainingJob, idx: list[int], segments, sums: torch.Tensor) -> torch.Tensor:
    # plain indexing and host-side token counts: no index tensors copied to the device here
    return job.train_loss(sum(sums[i] for i in idx), sum(segments[i].num_targets for i in idx))
