"""TrainingJob: one adapter's fine-tuning — data order, accumulation, AdamW, LR schedule, checkpoints.

A job never runs a forward itself: it hands examples (as `LossSegment`s) to the trainer, which
packs them into the engine's mixed batch; the engine's backward accumulates their gradients into
the adapter's buffers (lora/trainable.py) and hands their summed losses back, on the device.

An optimizer step covers one window: `grad_accum` micro-batches of the epoch's plan
(training/packing.py). Its loss is the token cross entropy summed over the window's examples over
the window's target tokens, so how the window's examples are spread over engine steps (whole
micro-batches when training alone, a few examples at a time beside traffic) does not change the
step. Nothing here reads the device on the hot path: losses come back to the host by a
non-blocking copy and are logged once they have arrived.
"""

from __future__ import annotations

import copy
import enum
import math
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

import numpy as np

from ..engine.batch import IGNORE_INDEX, LossSegment
from ..kernels.lora_dropout import MASK32, mix32
from ..lora.adapter import AdapterWeights, new_adapter
from .checkpoint import checkpoint_path, host_copy, load_checkpoint_state, optimizer_state_from, save_checkpoint_later
from .data import TokenizedExample
from .packing import epoch_plan, first_fit, total_steps
from .spec import TrainSpec


class JobStatus(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass
class JobEvent:
    time: float
    kind: str        # "metrics" | "checkpoint" | "eval" | "status"
    message: str
    data: dict = field(default_factory=dict)


def lr_lambda(spec: TrainSpec, total_steps: int):
    warmup = spec.warmup_steps or int(math.ceil(spec.warmup_ratio * total_steps))

    def factor(step: int) -> float:  # HF get_{linear,cosine,constant}_schedule_with_warmup
        if step < warmup:
            return step / max(1, warmup)
        if spec.lr_schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if spec.lr_schedule == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    return factor


class _Examples:
    """A dataset as arrays, converted once: token ids, shifted targets, lengths and loss tokens."""

    def __init__(self, examples: list[TokenizedExample]):
        self.ids = [np.asarray(ex.input_ids, dtype=np.int64) for ex in examples]
        # targets[t] = labels[t+1]: the loss of predicting token t+1 at position t
        self.targets = [np.append(np.asarray(ex.labels[1:], dtype=np.int64), IGNORE_INDEX) for ex in examples]
        self.lengths = np.asarray([len(x) for x in self.ids], dtype=np.int64)
        self.num_targets = np.asarray([int((t != IGNORE_INDEX).sum()) for t in self.targets], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ids)


class _PendingLoss:
    """A device scalar on its way to the host (a pinned buffer and an event on CUDA)."""

    def __init__(self, value: torch.Tensor):
        if value.is_cuda:
            self.host = torch.empty((), dtype=value.dtype, pin_memory=True)
            self.host.copy_(value, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host, self.event = value.detach().clone(), None

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def get(self) -> float:
        if self.event is not None:
            self.event.synchronize()
        return float(self.host)


class TrainingJob:
    """State of one fine-tuning run; resumable from any checkpoint with the same loss curve."""

    def __init__(self, job_id: str, spec: TrainSpec, train: list[TokenizedExample],
                 evals: list[TokenizedExample], engine, initial: AdapterWeights | None = None):
        self.id, self.spec, self.engine = job_id, spec, engine
        self.train_data, self.eval_data = _Examples(train), _Examples(evals)
        self.adapter = f"{spec.name}@train"
        self.total_steps = total_steps(spec, self.train_data.lengths)
        weights = initial or new_adapter(spec.lora, engine.args, engine.config.lora.max_lora_rank, spec.seed)
        engine.add_adapter(self.adapter, weights)
        engine.runner.drop_train_graphs()
        self.state = engine.adapters.make_trainable(self.adapter)
        # one flat fp32 master tensor: AdamW is one (fused, on CUDA) kernel, clipping three ops
        self.optimizer = torch.optim.AdamW([self.state.master], lr=spec.learning_rate, betas=spec.betas,
                                           eps=spec.eps, weight_decay=spec.weight_decay,
                                           fused=engine.device.type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(spec, self.total_steps))
        self.status = JobStatus.RUNNING
        self.step = 0                 # optimizer steps done
        self.epoch, self.pos = 0, 0   # data position: micro-batches of this epoch's plan taken so far
        self._plan: tuple[int, list[np.ndarray]] | None = None   # (epoch, its micro-batches)
        self.pending: list[list[int]] = []   # examples of the current window not handed out, by micro-batch
        self.window_tokens = 0        # target tokens of the current window
        self.window_loss: torch.Tensor | float = 0.0
        self.in_flight = False        # examples handed to a step that has not run yet
        self._closes_window = False   # the last examples handed out end the window
        self.trained_tokens = 0
        self.losses: list[tuple[int, float]] = []       # (step, train loss)
        self.eval_losses: list[tuple[int, float]] = []
        self.eval_queue: list[np.ndarray] = []
        self.eval_sum: torch.Tensor | float = 0.0
        self.eval_count = 0
        self._logs: list[tuple[int, dict, _PendingLoss]] = []   # optimizer steps whose loss is on its way
        self.events: list[JobEvent] = []
        self.checkpoints: list[tuple[int, str, Path]] = []   # (step, served name, path)
        self._saving: list[tuple[int, str, Future]] = []     # checkpoints on their way to the disk
        self.error: str | None = None
        self.started = time.monotonic()
        self.listeners: list = []   # callables(job, event) e.g. the server's store

    # ------------------------------------------------------------------ data order
    def epoch_plan(self, epoch: int) -> list[np.ndarray]:
        """The epoch's micro-batches (example indices); the current epoch's is kept."""
        if self._plan is None or self._plan[0] != epoch:
            self._plan = (epoch, epoch_plan(self.spec, self.train_data.lengths, epoch))
        return self._plan[1]

    def windows(self, epoch: int) -> list[list[np.ndarray]]:
        """The epoch's optimizer steps, each a list of `grad_accum` micro-batches."""
        plan, k = self.epoch_plan(epoch), self.spec.grad_accum
        return [plan[i:i + k] for i in range(0, len(plan), k)]

    def _fill_window(self) -> None:
        plan = self.epoch_plan(self.epoch)
        if self.pos >= len(plan):
            self.epoch, self.pos = self.epoch + 1, 0
            plan = self.epoch_plan(self.epoch)
        chosen = plan[self.pos:self.pos + self.spec.grad_accum]   # a window never crosses an epoch boundary
        self.pos += len(chosen)
        self.pending = [mb.tolist() for mb in chosen]
        self.window_tokens = int(sum(self.train_data.num_targets[mb].sum() for mb in chosen))
        self.window_loss = 0.0

    # ------------------------------------------------------------------ trainer interface
    @property
    def active(self) -> bool:
        return self.status == JobStatus.RUNNING

    def next_segments(self, budget: int, alone: bool) -> list[LossSegment]:
        """Examples for one engine step: this window's next micro-batch if it fits `budget` tokens
        (or the step has nothing else: `alone`), else as many of its examples as fit."""
        self.flush_logs(wait=False)
        if self.eval_queue:
            idx = self.eval_queue[0]
            if int(self.eval_data.lengths[idx].sum()) > budget and not alone:
                return []
            self.eval_queue.pop(0)
            self.in_flight = True
            return [LossSegment(self.eval_data.ids[i], self.eval_data.targets[i], self.adapter, False, self,
                                num_targets=int(self.eval_data.num_targets[i])) for i in idx]
        if not self.pending:
            self._fill_window()
        micro = self.pending[0]
        lengths = self.train_data.lengths
        if alone or int(lengths[micro].sum()) <= budget:
            take = list(micro)
        else:   # beside traffic: the examples of this micro-batch that fit, first fit
            take, room = [], budget
            for i in micro:
                if lengths[i] <= room:
                    take.append(i)
                    room -= int(lengths[i])
            if not take:
                return []
        taken = set(take)
        micro[:] = [i for i in micro if i not in taken]
        if not micro:
            self.pending.pop(0)
        self.in_flight = True
        self._closes_window = not self.pending
        weight = 1.0 / max(1, self.window_tokens)
        return [LossSegment(self.train_data.ids[i], self.train_data.targets[i], self.adapter, True, self, weight,
                            self._dropout_seed(i), int(self.train_data.num_targets[i])) for i in take]

    def _dropout_seed(self, example: int) -> int:
        """Keys the example's LoRA dropout masks: fresh at every optimizer step, the same on resume."""
        return int(mix32((self.spec.seed * 0x9E3779B1 + self.step * 0x85EBCA6B + example) & MASK32))

    def on_step(self, sums: torch.Tensor, lo: int, hi: int, num_targets: int, train: bool) -> None:
        """The engine ran this job's segments `lo:hi` of a step (their loss sums on the device)."""
        self.in_flight = False
        loss = sums[lo:hi].sum()
        if not train:
            self.eval_sum = self.eval_sum + loss
            self.eval_count += num_targets
            if not self.eval_queue:
                self._eval_done()
            return
        self.trained_tokens += num_targets
        self.window_loss = self.window_loss + loss / max(1, self.window_tokens)
        if self._closes_window:
            self._closes_window = False
            self._optimizer_step()

    def _optimizer_step(self) -> None:
        """Clip, step AdamW and the LR schedule, publish the weights to the slot table: all launched
        on the device, no host read. The loss is logged once its copy has arrived (`flush_logs`)."""
        st, spec = self.state, self.spec
        st.gather_grads()
        with torch.no_grad():
            if st.master_grad is not st.grad:
                st.master_grad.copy_(st.grad)
            if spec.max_grad_norm:   # clip_grad_norm_ over the adapter: one flat tensor
                norm = torch.linalg.vector_norm(st.master_grad)
                st.master_grad.mul_((spec.max_grad_norm / (norm + 1e-6)).clamp_(max=1.0))
            self.optimizer.step()
            self.scheduler.step()
            st.publish()
            self.engine.adapters.weights_changed(self.adapter)   # K/V cached with the old weights go stale
            st.zero_grad()
        self.step += 1
        data = {"step": self.step, "lr": self.scheduler.get_last_lr()[0], "epoch": self.epoch}
        self._logs.append((self.step, data, _PendingLoss(torch.as_tensor(self.window_loss))))
        self.window_loss = 0.0
        done = self.step >= self.total_steps
        if spec.eval_interval and len(self.eval_data) and (self.step % spec.eval_interval == 0 or done):
            self._queue_eval()
        if done or (spec.checkpoint_interval and self.step % spec.checkpoint_interval == 0):
            if not self.eval_queue:
                self.checkpoint()

    def flush_logs(self, wait: bool) -> None:
        """Log the optimizer steps whose loss has reached the host (all of them with `wait`)."""
        while self._logs and (wait or self._logs[0][2].ready()):
            step, data, pending = self._logs.pop(0)
            loss = pending.get()
            if not math.isfinite(loss):
                self.fail(f"loss became {loss} at step {step}")
                return
            self.losses.append((step, loss))
            self._event("metrics", f"step {step}/{self.total_steps}: loss {loss:.4f}", {**data, "train_loss": loss})

    def _eval_done(self) -> None:
        value = float(self.eval_sum) / max(1, self.eval_count)   # one host read per evaluation
        self.eval_losses.append((self.step, value))
        self._event("eval", f"step {self.step}: eval loss {value:.4f}", {"step": self.step, "eval_loss": value})
        spec = self.spec
        if self.step >= self.total_steps or (spec.checkpoint_interval and self.step % spec.checkpoint_interval == 0):
            self.checkpoint()

    def _queue_eval(self) -> None:
        n = len(self.eval_data)
        order = np.arange(n)
        if self.spec.micro_batch_tokens:
            self.eval_queue = first_fit(self.eval_data.lengths, order, self.spec.micro_batch_tokens)
        else:
            mbs = self.spec.micro_batch_size
            self.eval_queue = [order[i:i + mbs] for i in range(0, n, mbs)]
        self.eval_sum, self.eval_count = 0.0, 0

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, wait: bool = False) -> Path | None:
        """Save the job at this optimizer step and serve its adapter as `NAME:step-K` at once. The
        step's tensors are copied here; the files are written on the checkpoint thread (about 0.5 GB
        for an 8B-shape rank-16 adapter and its AdamW state, which serving would otherwise wait
        for), and the "checkpoint" event follows once they are on disk. The last step, and
        `wait`, write before returning."""
        self.flush_logs(wait=True)   # the state holds the loss curve up to this step
        if not self.active:
            return None
        weights = self.engine.adapters.snapshot(self.adapter)
        state = copy.deepcopy({"job_id": self.id, "step": self.step, "epoch": self.epoch, "pos": self.pos,
                               "pos_unit": "micro_batches", "trained_tokens": self.trained_tokens,
                               "losses": self.losses, "eval_losses": self.eval_losses,
                               "scheduler": self.scheduler.state_dict(), "spec": self.spec.to_dict()})
        opt = host_copy(self.optimizer.state_dict())
        out = Path(self.spec.output_dir)
        path, served = checkpoint_path(out, self.step), f"{self.spec.name}:step-{self.step}"
        self._saving.append((self.step, served,
                             save_checkpoint_later(out, self.step, weights, opt, state, self.engine.config.model)))
        if not self.engine.has_adapter(served):
            self.engine.add_adapter(served, weights, parent=self.spec.name, source=path)
        self.checkpoints.append((self.step, served, path))
        last = self.step >= self.total_steps
        if wait or last:
            self.wait_for_checkpoints()
        else:
            self.poll_checkpoints()
        if last and self.active:
            self.finish()
        return path

    def poll_checkpoints(self) -> None:
        """The "checkpoint" events of checkpoints now on disk, in order (engine thread)."""
        while self._saving and self._saving[0][2].done():
            step, served, future = self._saving.pop(0)
            try:
                path = future.result()
            except Exception as e:  # noqa: BLE001 - a full disk, say: the job fails, serving goes on
                self._saving.clear()
                if self.active:
                    self.fail(f"checkpoint at step {step} could not be written: {e}")
                return
            self._event("checkpoint", f"checkpoint at step {step} saved; served as {served}",
                        {"step": step, "name": served, "path": str(path)})

    def wait_for_checkpoints(self) -> None:
        for _, _, future in list(self._saving):
            future.exception()   # waits; the error, if any, is handled by poll_checkpoints
        self.poll_checkpoints()

    def save_resume_point(self) -> Path | None:
        """Checkpoint the last finished optimizer step, so that a restart resumes there; a window
        still accumulating is dropped (its gradients zeroed) and runs again. None: nothing new to save.
        Checkpoints still being written are on disk when it returns."""
        self.wait_for_checkpoints()
        if self.pending:   # mid-window: back to its first micro-batch (windows start at multiples of grad_accum)
            self.pos = (self.pos - 1) // self.spec.grad_accum * self.spec.grad_accum
            self.pending, self.in_flight, self._closes_window, self.window_loss = [], False, False, 0.0
            self.state.zero_grad()
        if self.step == 0 or (self.checkpoints and self.checkpoints[-1][0] == self.step) or not self.active:
            return None
        return self.checkpoint(wait=True)

    def restore(self, path: Path) -> None:
        """Continue from a checkpoint written by `checkpoint` (weights were passed as `initial`)."""
        state, tensors = load_checkpoint_state(path)
        self.optimizer.load_state_dict(self._flat_optimizer_state(optimizer_state_from(state, tensors)))
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.pos = state["step"], state["epoch"], state["pos"]
        if state.get("pos_unit") != "micro_batches":   # older checkpoints counted examples
            self.pos = math.ceil(self.pos / self.spec.micro_batch_size)
        self.trained_tokens = state["trained_tokens"]
        self.losses = [tuple(x) for x in state["losses"]]
        self.eval_losses = [tuple(x) for x in state["eval_losses"]]
        self.pending, self.eval_queue = [], []
        self._event("status", f"resumed from {path.name}", {"step": self.step})

    def _flat_optimizer_state(self, saved: dict) -> dict:
        """Older checkpoints hold one AdamW state per module matrix (by layer and module, A then
        B): lay them out in the flat master's order."""
        if len(saved["state"]) <= 1:
            return saved
        master = self.state.master
        flat: dict = {}
        for idx, per_param in saved["state"].items():
            for key, value in per_param.items():
                if key == "step":
                    flat[key] = value
                    continue
                if key not in flat:
                    flat[key] = torch.zeros(master.shape, dtype=value.dtype)
                    flat[key + ".views"] = [v for _, pair in sorted(self.state.module_views(flat[key]).items())
                                            for v in pair]
                view = flat[key + ".views"][idx]
                view.copy_(value.view_as(view))
        flat = {k: v for k, v in flat.items() if not k.endswith(".views")}
        groups = [{**g, "params": [0]} for g in saved["param_groups"][:1]]
        return {"state": {0: flat}, "param_groups": groups}

    # ------------------------------------------------------------------ lifecycle
    def finish(self) -> None:
        """Hand the trained adapter over to serving under `spec.name` and release training state."""
        mgr = self.engine.adapters
        weights = mgr.snapshot(self.adapter)
        self.release()
        if self.engine.has_adapter(self.spec.name):
            self.engine.unload_adapter(self.spec.name)
        last = self.checkpoints[-1][2] if self.checkpoints and self.checkpoints[-1][0] == self.step else None
        self.engine.add_adapter(self.spec.name, weights, source=last)
        self.status = JobStatus.SUCCEEDED
        self._event("status", f"job succeeded; serving {self.spec.name}", {"fine_tuned_model": self.spec.name})

    def release(self) -> None:
        """Free the training slot and optimizer memory."""
        mgr = self.engine.adapters
        self.engine.runner.drop_train_graphs()   # captured with this job's parameters
        if self.adapter in mgr:
            mgr.freeze(self.adapter)
            mgr.remove(self.adapter)
        self.optimizer.state.clear()
        self.state = None

    def cancel(self) -> None:
        self.wait_for_checkpoints()   # their events first: a cancelled job keeps its checkpoints
        if self.status in (JobStatus.RUNNING, JobStatus.PAUSED):
            self.release()
            self.status = JobStatus.CANCELLED
            self._event("status", "job cancelled")

    def fail(self, message: str) -> None:
        self.release()
        self.status, self.error = JobStatus.FAILED, message
        self._event("status", f"job failed: {message}")

    def _event(self, kind: str, message: str, data: dict | None = None) -> None:
        ev = JobEvent(time.time(), kind, message, data or {})
        self.events.append(ev)
        for listener in self.listeners:
            listener(self, ev)
